"""Attacks on the personal models and careless use of them: what a hostile or hurried user sends, what two
tabs do at once, and what must be left after a deletion."""

import sqlite3
import threading
import time

import pytest
import torch
from sqlalchemy import select
from test_personal_api import PROMPT, ask_and_choose, cold_start, encoder, login, server, user_id  # noqa: F401
from test_personal_rerank import LONG, MEDIUM, SHORT, pair, reranker  # noqa: F401

from conftest import build_tiny_causal, invoke, save_tiny_policy, word_tokenizer
from rlhfkit.feedback import db as feedback_db
from rlhfkit.feedback import service
from rlhfkit.personal import store
from rlhfkit.personal.models import user_owner


def while_answers_are_sampled(app, models, request, meanwhile=lambda: None):
    """``request()``'s response, sent with the model's sampling held until ``meanwhile()`` ran and another
    connection has taken and released SQLite's write lock (which fails, "database is locked", while a
    transaction holds it)."""
    sampling, release = threading.Event(), threading.Event()
    answer = models.answer

    def held_answer(*args, **kwargs):
        sampling.set()
        release.wait(10)
        return answer(*args, **kwargs)

    models.answer, done = held_answer, []
    thread = threading.Thread(target=lambda: done.append(request()))
    thread.start()
    try:
        assert sampling.wait(10)
        meanwhile()
        other = sqlite3.connect(app.state.sessions.kw["bind"].url.database, timeout=0.2, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
    finally:
        release.set()
        thread.join(10)
        models.answer = answer
    return done[0]


def test_an_ask_in_the_cold_start_does_not_hold_the_database_write_lock_while_it_samples(cold_start):
    """An ask reads the user's pairs for their head; kept open through the sampling, that read's transaction
    (SQLite: BEGIN IMMEDIATE) made every other write of the app (labels, logins, choices) wait for it."""
    app, models, _ = cold_start
    ann = login(app, "ann")
    asked = while_answers_are_sampled(app, models, lambda: ann.post("/api/personal/ask", json={"prompt": PROMPT}))
    assert asked.status_code == 200, asked.text


def test_a_before_after_sample_does_not_hold_the_database_write_lock_while_it_samples(server):
    app, models, queue = server
    ann = login(app, "ann")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    sample = while_answers_are_sampled(app, models, lambda: ann.get("/api/personal/sample"))
    assert sample.status_code == 200, sample.text


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A database with one user and the tiny policy's folder, for `rlhfkit personal serve` with uvicorn
    replaced: what the command would serve, or its error."""
    folder = tmp_path_factory.mktemp("serve")
    db = str(folder / "feedback.db")
    with feedback_db.session_factory(db)() as session:
        service.create_user(session, "ann", password="ann-password")
    return db, save_tiny_policy(folder / "policy"), folder


def serve_command(served, monkeypatch, *args):
    import uvicorn

    db, policy, folder = served
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    return invoke("personal", "serve", "--policy", policy, "--db", db, "--adapters", folder / "adapters",
                  "--no-chat-template", *args)


def policy_without_padding(folder) -> str:
    """A causal LM folder whose tokenizer has no padding token (as GPT-2's): a model, not a sentence encoder."""
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    build_tiny_causal().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(("args", "says"), [
    (["--rerank-n", 10_000], "field 'n': must be at most 32"),
    (["--lora-r", 0], "'--lora-r'"),
    (["--port", 70_000], "'--port'"),
    (["--rerank-encoder", "EMPTY"], "encoder: Unrecognized model in"),
    (["--rerank-encoder", "CAUSAL"], "encoder: "),
])
def test_serve_refuses_options_it_cannot_serve_with_before_loading_anything(served, monkeypatch, tmp_path, args,
                                                                            says):
    """Every mistake in one line (or typer's box naming the option), non-zero, no traceback; an encoder that
    cannot encode a batch (a causal LM with no padding token) is refused at startup, not at a user's ask."""
    (tmp_path / "empty").mkdir()
    paths = {"EMPTY": tmp_path / "empty", "CAUSAL": policy_without_padding(tmp_path / "causal")}
    result = serve_command(served, monkeypatch, *[paths.get(a, a) for a in args])
    output = " ".join(result.output.split())
    assert result.exit_code != 0 and says in output and "Traceback" not in output, result.output


@pytest.mark.parametrize("mine", ["server", "cold_start"])  # answered by my adapter, or reranked by my head
def test_an_ask_answered_by_my_model_while_i_delete_my_data_leaves_nothing_of_mine(request, mine):
    """Two tabs: one asks (the answers come from my adapter, or my head picks one), the other deletes
    everything meanwhile. The question the ask would store after the deletion holds answers of a deleted
    model: it is not stored, and the ask says why (409)."""
    app, models, queue = request.getfixturevalue(mine)
    ann, ann_id = login(app, "ann"), user_id(app, "ann")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    sampling, release, answer = threading.Event(), threading.Event(), models.answer

    def held_answer(*args, **kwargs):
        sampling.set()
        release.wait(10)
        return answer(*args, **kwargs)

    models.answer, responses = held_answer, {}
    asking = threading.Thread(target=lambda: responses.update(ask=ann.post("/api/personal/ask",
                                                                           json={"prompt": PROMPT})))
    asking.start()
    assert sampling.wait(10)
    deleting = threading.Thread(target=lambda: responses.update(delete=ann.delete("/api/personal/data")))
    deleting.start()
    for _ in range(200):  # the deletion removed the rows and now waits for the model (held by the ask)
        if not my_rows(app, ann_id):
            break
        time.sleep(0.05)
    release.set()
    asking.join(10), deleting.join(10)
    models.answer = answer
    assert not app.state.personal_reranker.has_head(ann_id)
    assert responses["delete"].status_code == 200, responses["delete"].text
    assert responses["ask"].status_code == 409 and "deleted" in responses["ask"].text, responses["ask"].text
    assert my_rows(app, ann_id) == [] and not (models.folder / user_owner(ann_id)).exists()
    assert ann.post("/api/personal/ask", json={"prompt": PROMPT}).status_code == 200  # asking again works


def my_rows(app, user: int) -> list:
    with app.state.sessions() as db:
        return db.scalars(select(store.PersonalChoice).where(store.PersonalChoice.user_id == user)).all()


def test_a_question_id_is_never_reused_after_a_deletion_so_a_stale_tab_cannot_answer_a_new_question(server):
    """A tab still shows question q when another deletes everything and asks again: had the new question
    taken q's id (SQLite reuses the largest freed rowid), the stale tab's choice would land on answers it
    never showed."""
    app, _, _ = server
    ann = login(app, "ann")
    stale = [ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"] for _ in range(2)]
    assert ann.delete("/api/personal/data").json()["deleted_choices"] == 2
    fresh = ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"]
    assert fresh > max(stale)
    assert ann.post("/api/personal/choose", json={"question_id": stale[-1], "choice": "a"}).status_code == 404


HOSTILE_BODIES = [  # (endpoint, raw body): wrong types, wrong shapes, wrong encodings, out-of-range ids
    ("ask", b'{"prompt": 5}'), ("ask", b'{"prompt": ["how", "do"]}'), ("ask", b'{"prompt": null}'), ("ask", b"[]"),
    ("ask", b"null"), ("ask", b"not json"), ("ask", b""), ("ask", b'{"prompt": "fix \\u0000 bike"}'),
    ("ask", b'{"prompt": "\\ud800 bike"}'), ("ask", "{\"prompt\": \"fix bike\"}".encode("utf-16")),
    ("choose", b'{"question_id": "one", "choice": "a"}'), ("choose", b'{"question_id": 1.5, "choice": "a"}'),
    ("choose", b'{"question_id": 1099511627776, "choice": "a"}'), ("choose", b'{"question_id": -1, "choice": "a"}'),
    ("choose", b'{"question_id": 1, "choice": null}'), ("choose", b'{"question_id": 1, "choice": "A"}'),
    ("choose", b'{"question_id": 1, "choice": "a", "reason": 5}'), ("choose", b'{"question_id": 1}'),
    ("choose", b'{"question_id": 1, "choice": "a", "reason": "\\u0000"}'),
]


def test_hostile_bodies_get_one_line_4xx_answers_and_store_nothing(server):
    app, _, _ = server
    ann = login(app, "ann")
    for endpoint, body in HOSTILE_BODIES:
        r = ann.post(f"/api/personal/{endpoint}", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (404, 422), (body, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str | list) and "Traceback" not in r.text and "\n" not in str(detail), (body, r.text)
    assert my_rows(app, user_id(app, "ann")) == []


def test_control_characters_and_markup_are_stored_as_sent_and_given_back_as_text(server):
    app, _, _ = server
    ann = login(app, "ann")
    prompt, reason = "fix bike \x1b[2J\x07\t<script>alert(1)</script>", "<img src=x onerror=alert(1)>\x1b[31m"
    question = ann.post("/api/personal/ask", json={"prompt": prompt}).json()["question_id"]
    chosen = ann.post("/api/personal/choose", json={"question_id": question, "choice": "a", "reason": reason})
    assert chosen.status_code == 200, chosen.text
    [row] = ann.get("/api/personal/learned").json()["choices"]
    assert (row["prompt"], row["reason"]) == (prompt, reason)


def test_logged_out_disabled_and_after_delete_calls_are_refused(server):
    app, _, _ = server
    ann, bob = login(app, "ann"), login(app, "bob")
    question = ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"]
    assert ann.delete("/api/personal/data").json()["deleted_choices"] == 1
    after = ann.post("/api/personal/choose", json={"question_id": question, "choice": "a"})
    assert after.status_code == 404 and "no such question" in after.text
    assert ann.post("/api/logout").status_code == 200
    assert ann.post("/api/personal/ask", json={"prompt": PROMPT}).status_code == 401
    with app.state.sessions() as db:
        service.create_user(db, "root", "admin", password="root-password")
        service.set_disabled(db, "bob", True, service.get_user(db, "root"))
    for method, url in (("post", "/api/personal/ask"), ("get", "/api/personal/learned"),
                        ("get", "/api/personal/sample"), ("delete", "/api/personal/data")):
        r = getattr(bob, method)(url, **({"json": {"prompt": PROMPT}} if method == "post" else {}))
        assert r.status_code == 401, (url, r.status_code, r.text)


def test_pairs_of_identical_answers_teach_the_head_nothing_and_it_keeps_the_first_sample(reranker):
    head = reranker.fit([pair(SHORT, SHORT, 0), pair(LONG, LONG, 1)])  # a user who clicked A on equal answers
    assert torch.equal(head.weights, torch.zeros_like(head.weights))
    assert reranker.best_of_n(head, PROMPT, [LONG, SHORT, MEDIUM]) == (0, 0.0)


def test_a_user_who_only_says_both_bad_gets_no_head_and_plain_answers(cold_start):
    app, _, _ = cold_start
    ann = login(app, "ann")
    for _ in range(3):
        asked, chosen = ask_and_choose(ann, "both_bad")
        assert sorted(asked["models"]) == ["base", "base τ=0.7"] and chosen["pairs"] == 0
    learned = ann.get("/api/personal/learned").json()
    assert learned["current_model"].startswith("none yet") and learned["counts"]["both_bad"] == 3
    assert not app.state.personal_reranker.has_head(user_id(app, "ann"))



def test_what_was_learned_is_read_without_holding_the_database_write_lock_while_another_user_is_answered(
        server, monkeypatch):
    """The page reads /learned after every choice; that read waited for the model (held by another user's
    sampling, or a training step) inside its transaction, so it held SQLite's write lock all that time."""
    app, models, _ = server
    ann, bob = login(app, "ann"), login(app, "bob")
    read, user_choices, learned = threading.Event(), store.user_choices, []

    def read_then_signal(*args):
        rows = user_choices(*args)
        read.set()
        return rows

    monkeypatch.setattr(store, "user_choices", read_then_signal)
    reading = threading.Thread(target=lambda: learned.append(ann.get("/api/personal/learned")))

    def ann_reads_meanwhile():
        reading.start()
        assert read.wait(10)
        time.sleep(0.3)  # ann's request now waits for the model, which bob's sampling holds

    asked = while_answers_are_sampled(app, models, lambda: bob.post("/api/personal/ask", json={"prompt": PROMPT}),
                                      meanwhile=ann_reads_meanwhile)
    reading.join(10)
    assert asked.status_code == 200 and learned[0].status_code == 200, learned[0].text


def test_two_tabs_ask_and_choose_while_my_training_runs_and_every_choice_is_kept(server):
    app, models, queue = server
    ann = login(app, "ann")
    publishing, release, publish = threading.Event(), threading.Event(), models.publish

    def held_publish(*args):
        publishing.set()
        release.wait(30)
        return publish(*args)

    models.publish = held_publish
    ask_and_choose(ann), ask_and_choose(ann)  # the 2nd pair queues a training, held before it publishes
    assert publishing.wait(30)
    results = []

    def tab():
        for _ in range(3):
            asked, chosen = ask_and_choose(ann, "b")
            results.append((asked["models"], chosen["training_queued"]))

    tabs = [threading.Thread(target=tab) for _ in range(2)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(60)
    release.set()
    queue.wait()
    models.publish = publish
    assert len(results) == 6 and not any(queued for _, queued in results)  # one training of a user at a time
    assert not [m for shown, _ in results for m in shown if m.startswith("user-")]  # v1 not published yet
    learned = ann.get("/api/personal/learned").json()
    assert learned["pairs"] == 8 and [v["pairs"] for v in learned["versions"]] == [2]


@pytest.mark.parametrize(("args", "says"), [
    (["--preset", "personnal"], "preset: unknown 'personnal'; choose from toy, smollm2, personal, personal-smollm2"),
    (["--preset", "personal", "--seeds", 2], "--preset personal: takes --run-dir and --eval-prompts only"),
    (["--preset", "personal-smollm2", "--ppo-steps", 1], "--preset personal-smollm2: takes --run-dir and"),
    (["--preset", "personal", "--eval-prompts", 0], "eval_prompts: must be at least 4, got 0"),
])
def test_the_personal_demo_refuses_bad_options_in_one_line_before_writing_anything(tmp_path, args, says):
    result = invoke("demo", "--run-dir", tmp_path / "run", *args)
    assert result.exit_code == 1 and says in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("call", ["learned", "choose"])
def test_a_deletion_between_listing_my_versions_and_reading_them_answers_without_them(server, call):
    """Two tabs: one reads what was learned (or chooses, which reads the latest version's pairs) while the other
    deletes everything: the version folder listed a moment before is gone when it is read."""
    app, models, queue = server
    ann, ann_id = login(app, "ann"), user_id(app, "ann")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    question = ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"]
    versions = models.versions

    def listed_then_deleted(owner):
        found = versions(owner)
        models.versions = versions  # once: the deletion lists versions too
        models.forget(ann_id)  # the other tab's deletion lands here
        return found

    models.versions = listed_then_deleted
    try:
        r = (ann.get("/api/personal/learned") if call == "learned" else
             ann.post("/api/personal/choose", json={"question_id": question, "choice": "a"}))
    finally:
        models.versions = versions
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == [] if call == "learned" else r.json()["pairs"] == 3
