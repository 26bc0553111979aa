"""The personal-model API over HTTP with a tiny model: ask, choose, learn, delete, and what attackers and
careless users send."""

import json
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_personal_models import first_training_held
from test_personal_rerank import tiny_encoder

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.personal import store
from rlhfkit.personal.api import PersonalSettings, include_personal
from rlhfkit.personal.models import POPULATION, PersonalModels, user_owner
from rlhfkit.personal.rerank import RerankConfig
from rlhfkit.personal.train import PersonalDPOConfig, train_population

PROMPT = "how do i fix bike"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("encoder"))


def serve(folder, encoder, train_every=2, min_pairs=4):
    app = create_app(str(folder / "feedback.db"))
    models = PersonalModels(build_tiny_causal(), word_tokenizer(), folder / "adapters")
    settings = PersonalSettings(train_every=train_every, max_new_tokens=8, dpo=PersonalDPOConfig(epochs=1, lr=1e-2),
                                rerank=RerankConfig(min_pairs=min_pairs, encoder=encoder))
    queue = include_personal(app, models, settings)
    with app.state.sessions() as db:
        for name in ("ann", "bob"):
            service.create_user(db, name, password=f"{name}-password")
    return app, models, queue


@pytest.fixture
def server(tmp_path, encoder):
    app, models, queue = serve(tmp_path, encoder)
    yield app, models, queue
    queue.shutdown()


@pytest.fixture
def cold_start(tmp_path, encoder):
    """Training every 3 pairs, reranking from 2: one question in the cold-start window."""
    app, models, queue = serve(tmp_path, encoder, train_every=3, min_pairs=2)
    yield app, models, queue
    queue.shutdown()


def login(app, name):
    client = TestClient(app)
    r = client.post("/api/login", json={"username": name, "password": f"{name}-password"})
    client.headers["X-CSRF-Token"] = r.json()["csrf"]
    return client


def user_id(app, name):
    with app.state.sessions() as db:
        return db.scalar(select(service.User.id).where(service.User.username == name))


def ask_and_choose(client, choice="a", reason=None):
    asked = client.post("/api/personal/ask", json={"prompt": PROMPT})
    assert asked.status_code == 200, asked.text
    chosen = client.post("/api/personal/choose", json={"question_id": asked.json()["question_id"], "choice": choice,
                                                       "reason": reason})
    assert chosen.status_code == 200, chosen.text
    return asked.json(), chosen.json()


def test_the_page_and_every_call_need_a_session_and_state_changes_need_the_csrf_token(server):
    app, _, _ = server
    anonymous = TestClient(app)
    for method, url in [("post", "/api/personal/ask"), ("post", "/api/personal/choose"),
                        ("get", "/api/personal/learned"), ("delete", "/api/personal/data")]:
        assert getattr(anonymous, method)(url).status_code == 401
    ann = login(app, "ann")
    forged = ann.post("/api/personal/ask", json={"prompt": PROMPT}, headers={"X-CSRF-Token": "forged"})
    assert forged.status_code == 403
    page = ann.get("/personal", headers={"accept": "text/html"})
    assert page.status_code == 200 and '<script src="/personal/static/personal.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"] and "<script>" not in page.text
    assert ann.get("/personal/static/personal.js").status_code == 200


def test_two_answers_are_shown_with_their_models_and_the_choice_is_stored_as_shown(server):
    app, _, _ = server
    ann = login(app, "ann")
    asked, chosen = ask_and_choose(ann, "b", "shorter")
    assert len(asked["answers"]) == 2 and sorted(asked["models"]) == ["base", "base τ=0.7"]
    assert chosen == {"question_id": asked["question_id"], "pairs": 1, "training_queued": False}
    learned = ann.get("/api/personal/learned").json()
    assert learned["counts"] == {"a": 0, "b": 1, "both_fine": 0, "both_bad": 0} and learned["versions"] == []
    (row,) = learned["choices"]
    assert row["models"] == asked["models"] and row["reason"] == "shorter"
    assert [a.strip() for a in row["answers"]] == asked["answers"]


def test_every_k_pairs_a_new_version_is_trained_in_the_background_and_then_answers(server):
    app, _, queue = server
    ann = login(app, "ann")
    ask_and_choose(ann, "both_fine")  # no pair: no count towards training
    assert not ask_and_choose(ann, "a")[1]["training_queued"]
    assert ask_and_choose(ann, "b")[1]["training_queued"]
    queue.wait()
    learned = ann.get("/api/personal/learned").json()
    assert [v["version"] for v in learned["versions"]] == [1] and learned["versions"][0]["pairs"] == 2
    assert learned["current_model"] == f"user-{user_id(app, 'ann')}-v1" and learned["training_error"] is None
    asked, _ = ask_and_choose(ann, "a")
    assert sorted(asked["models"]) == ["base", f"user-{user_id(app, 'ann')}-v1"]
    sample = ann.get("/api/personal/sample").json()
    assert sample["prompt"] == PROMPT and sample["models"] == ["base", f"user-{user_id(app, 'ann')}-v1"]
    assert isinstance(sample["before"], str) and isinstance(sample["after"], str)
    bob = login(app, "bob")  # bob still gets the starting point only
    assert sorted(ask_and_choose(bob, "a")[0]["models"]) == ["base", "base τ=0.7"]
    assert bob.get("/api/personal/sample").status_code == 404


def test_a_failed_background_training_is_reported_and_the_previous_version_keeps_answering(server, monkeypatch):
    app, models, queue = server
    ann = login(app, "ann")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    monkeypatch.setattr(models, "publish", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    learned = ann.get("/api/personal/learned").json()
    assert learned["training_error"] == "OSError: disk full" and [v["version"] for v in learned["versions"]] == [1]
    assert learned["current_model"].endswith("-v1") and not [n for n in models.adapter_names() if n.endswith("-v2")]


def test_another_users_question_is_not_answerable_readable_or_deletable(server):
    app, models, queue = server
    ann, bob = login(app, "ann"), login(app, "bob")
    ask_and_choose(ann), ask_and_choose(ann)
    queue.wait()
    question = ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"]
    stolen = bob.post("/api/personal/choose", json={"question_id": question, "choice": "a"})
    assert stolen.status_code == 404 and stolen.json() == {"detail": f"question {question}: no such question of yours"}
    assert bob.get("/api/personal/learned").json()["choices"] == []
    assert bob.delete("/api/personal/data").json()["deleted_choices"] == 0
    assert len(ann.get("/api/personal/learned").json()["choices"]) == 2
    assert models.versions(user_owner(user_id(app, "ann"))) == [1]


def test_deleting_my_data_leaves_no_choice_file_or_adapter_of_mine(server):
    app, models, queue = server
    ann, bob = login(app, "ann"), login(app, "bob")
    for client in (ann, ann, bob, bob):
        ask_and_choose(client)
    queue.wait()
    ann_id, owner = user_id(app, "ann"), user_owner(user_id(app, "ann"))
    assert models.adapter(owner) is not None
    assert ann.delete("/api/personal/data").json() == {
        "deleted_choices": 2, "adapters": [], "population_versions_removed": [],
        "said": "Deleted 2 choices and your personal model."}
    with app.state.sessions() as db:
        assert db.scalars(select(store.PersonalChoice).where(store.PersonalChoice.user_id == ann_id)).all() == []
    assert not (models.folder / owner).exists()
    assert not [n for n in models.adapter_names() if n.startswith(f"{owner}-")]
    assert ann.get("/api/personal/learned").json()["choices"] == []
    assert models.adapter(user_owner(user_id(app, "bob"))) is not None  # bob's is untouched


def test_deleting_my_data_leaves_none_of_my_words_in_the_database_files(server):
    """SQLite keeps a deleted row's bytes in the free pages of the database file, and in the write-ahead log
    until a checkpoint: the deleted user's questions and reasons could still be read off the disk."""
    app, models, queue = server
    ann = login(app, "ann")
    asked = ann.post("/api/personal/ask", json={"prompt": "my diagnosis is xyzzy-secret, what now"}).json()
    assert ann.post("/api/personal/choose", json={"question_id": asked["question_id"], "choice": "a",
                                                  "reason": "plugh-private"}).status_code == 200
    queue.wait()
    assert ann.delete("/api/personal/data").json()["deleted_choices"] == 1
    files = sorted(models.folder.parent.glob("feedback.db*"))
    assert files and not [f.name for f in files if b"xyzzy-secret" in f.read_bytes() or b"plugh-private" in
                          f.read_bytes()]


def test_deleting_my_data_removes_the_population_versions_that_learned_from_it_and_trains_them_again(server):
    """Population v1 learned from ann's and bob's pairs, bob's v2 started from it. Ann deletes: both are
    removed, the page says so, and the queue trains the population on bob's pairs, then bob's next version
    from it; nothing on disk or in memory was trained on ann's pairs."""
    app, models, queue = server
    ann, bob = login(app, "ann"), login(app, "bob")
    ann_id, bob_id = user_id(app, "ann"), user_id(app, "bob")
    for client in (ann, ann, bob, bob):
        ask_and_choose(client)
    queue.wait()
    with app.state.sessions() as db:
        assert train_population(models, db, PersonalDPOConfig(epochs=1, lr=1e-2)) == 1
    ask_and_choose(bob), ask_and_choose(bob)
    queue.wait()
    assert models.version_info(user_owner(bob_id), 2)["start"] == "population-v1"

    deleted = ann.delete("/api/personal/data").json()
    assert deleted["population_versions_removed"] == [1]
    assert deleted["said"] == (
        "Deleted 2 choices and your personal model. The shared population model had learned from your choices: its "
        "version(s) v1 and 1 adapter version(s) of other users that started from them were deleted; they are being "
        "trained again without your data (meanwhile the answers start from the base model).")
    queue.wait()
    assert models.versions(POPULATION) == [2] and models.version_info(POPULATION, 2)["users"] == [bob_id]
    learned = bob.get("/api/personal/learned").json()
    assert [(v["version"], v["start"], v["pairs"]) for v in learned["versions"]] == [(1, "base", 2),
                                                                                     (3, "population-v2", 4)]
    assert learned["removed_versions"] == [{"version": 2, "removed": "started from population-v1, trained on the "
                                                                     "pairs of a user who deleted their data"}]
    assert learned["current_model"] == f"user-{bob_id}-v3" and learned["population_training_error"] is None
    for saved in models.folder.glob("*/v*/version.json"):
        info = json.loads(saved.read_text())
        assert ann_id not in info.get("users", []) and info["start"] in ("base", "population-v2"), saved
    removed = ("population-v1", f"user-{ann_id}-", f"user-{bob_id}-v2")
    assert not [n for n in models.adapter_names() if n.startswith(removed)]


def test_from_min_pairs_until_the_first_version_the_personal_answer_is_the_reranked_best_of_n(cold_start,
                                                                                             monkeypatch):
    app, _, queue = cold_start
    ann, ann_id = login(app, "ann"), user_id(app, "ann")
    reranker, ranked = app.state.personal_reranker, []

    def best_is_last(head, prompt, candidates):  # the head's choice, recorded: the last of the samples
        ranked.append((head.pairs, candidates))
        return len(candidates) - 1, 0.0

    monkeypatch.setattr(reranker, "best_of_n", best_is_last)
    ask_and_choose(ann, "both_fine")  # a tie: no pair
    assert sorted(ask_and_choose(ann, "a")[0]["models"]) == ["base", "base τ=0.7"]  # 0 pairs when asked
    assert sorted(ask_and_choose(ann, "b")[0]["models"]) == ["base", "base τ=0.7"]  # 1 pair: below min_pairs
    assert ann.get("/api/personal/learned").json()["current_model"] == "base best-of-4 reranked"
    asked, chosen = ask_and_choose(ann, "a")  # 2 pairs: the head answers
    assert sorted(asked["models"]) == ["base best-of-4 reranked", "base τ=0.7"]
    ((pairs, candidates),) = ranked
    assert pairs == 2 and len(candidates) == 4
    assert asked["answers"][asked["models"].index("base best-of-4 reranked")] == candidates[-1].strip()
    assert chosen["training_queued"]
    queue.wait()
    asked, _ = ask_and_choose(ann, "a")  # the first version exists: the adapter answers, not the head
    assert sorted(asked["models"]) == ["base", f"user-{ann_id}-v1"]
    assert ann.get("/api/personal/learned").json()["current_model"] == f"user-{ann_id}-v1"


def test_deleting_my_data_in_the_cold_start_removes_my_preference_head(cold_start):
    app, _, _ = cold_start
    ann, bob = login(app, "ann"), login(app, "bob")
    for client in (ann, ann, bob, bob):
        ask_and_choose(client)
    for client in (ann, bob):  # asked, not answered: 2 pairs each, no training queued
        assert "base best-of-4 reranked" in client.post("/api/personal/ask", json={"prompt": PROMPT}).json()["models"]
    reranker = app.state.personal_reranker
    ann_id, bob_id = user_id(app, "ann"), user_id(app, "bob")
    assert reranker.has_head(ann_id) and reranker.has_head(bob_id)
    assert ann.delete("/api/personal/data").json()["deleted_choices"] == 3
    assert not reranker.has_head(ann_id) and reranker.has_head(bob_id)
    assert sorted(ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["models"]) == ["base", "base τ=0.7"]
    assert not reranker.has_head(ann_id)


@pytest.mark.parametrize("body, status, says", [
    (b'{"prompt": ""}', 422, "at least 1 character"),
    (b'{"prompt": "   "}', 422, "blank"),
    ('{"prompt": "\u200b\u2060 \ufeff"}'.encode(), 422, "blank"),  # only invisible format characters
    (b'{"prompt": "' + b"x" * (store.MAX_PROMPT + 1) + b'"}', 422, "at most 2000 characters"),
    (b'{"prompt": "\xff\xfe fix"}', 422, "invalid"),
    (b'{"prompt": "' + b"bike " * 200 + b'"}', 422, "prompt: prompt"),  # longer than the model's positions
    (b'{"prompt": "' + b"x" * (2 * 2**20) + b'"}', 413, "over the limit"),
])
def test_careless_prompts_get_one_4xx_answer(server, body, status, says):
    app, _, _ = server
    ann = login(app, "ann")
    r = ann.post("/api/personal/ask", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and says in r.text, r.text


def test_careless_choices_get_one_4xx_answer(server):
    app, _, _ = server
    ann = login(app, "ann")
    question = ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"]
    for body, says in [({"question_id": question, "choice": "c"}, "'a', 'b', 'both_fine' or 'both_bad'"),
                       ({"question_id": question, "choice": "a", "reason": "x" * 201}, "at most 200 characters"),
                       ({"question_id": question, "choice": "a", "reason": "\ud800"}, "Invalid JSON"),
                       ({"question_id": 0, "choice": "a"}, "greater than or equal to 1")]:
        r = ann.post("/api/personal/choose", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422 and says in r.text, r.text
    assert ann.post("/api/personal/choose", json={"question_id": question, "choice": "a"}).status_code == 200
    assert ann.post("/api/personal/choose", json={"question_id": question, "choice": "b"}).status_code == 409


def test_concurrent_choices_of_one_user_are_all_stored(server):
    app, _, queue = server
    ann = login(app, "ann")
    questions = [ann.post("/api/personal/ask", json={"prompt": PROMPT}).json()["question_id"] for _ in range(6)]
    answers = []

    def choose(question):
        answers.append(ann.post("/api/personal/choose", json={"question_id": question, "choice": "a"}).status_code)

    threads = [threading.Thread(target=choose, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.wait()
    assert answers == [200] * 6
    assert sorted(c["id"] for c in ann.get("/api/personal/learned").json()["choices"]) == questions


def test_the_answers_shown_are_stored_with_whether_each_was_cut(server):
    """With EOS never sampled, both 8-token answers are cut: the question row and its pair say so."""
    app, models, _ = server
    specials = models.tokenizer.all_special_ids  # EOS, and the tokens a decoding drops (8 words stay 8)

    def never_end(_module, _inputs, logits):
        logits[..., specials] = -float("inf")
        return logits

    with models.model.get_output_embeddings().register_forward_hook(never_end):
        ask_and_choose(login(app, "ann"), "b")
    with app.state.sessions() as db:
        [row] = store.user_choices(db, user_id(app, "ann"))
        [pair] = store.preference_pairs([row])
    assert row.as_dict()["truncated"] == [True, True] and all(len(a.split()) == 8 for a in row.as_dict()["answers"])
    assert pair.chosen_truncated and pair.rejected_truncated


def test_two_users_deleting_at_once_while_the_population_trains_on_both_leave_nothing_of_either(server, monkeypatch):
    """Ann and bob (bob twice, two tabs) delete while a population training on both their pairs runs: each
    deletion waits for it; its version goes once, and nothing of theirs is left on disk or in memory."""
    app, models, queue = server
    ann, bob = login(app, "ann"), login(app, "bob")
    for client in (ann, ann, bob, bob):
        ask_and_choose(client)
    queue.wait()
    started, release = first_training_held(monkeypatch)
    queue.submit(POPULATION)
    assert started.wait(30)  # it read both users' pairs
    deleted = {}
    deletions = [threading.Thread(target=lambda c=client, n=name: deleted.setdefault(n, c.delete("/api/personal/data")))
                 for name, client in (("ann", ann), ("bob", bob), ("bob again", bob))]
    for deletion in deletions:
        deletion.start()
    deletions[0].join(0.5)
    assert all(deletion.is_alive() for deletion in deletions)
    release.set()
    for deletion in deletions:
        deletion.join(60)
    queue.wait()
    assert {name: r.status_code for name, r in deleted.items()} == {"ann": 200, "bob": 200, "bob again": 200}
    assert sorted(v for r in deleted.values() for v in r.json()["population_versions_removed"]) == [1]
    assert models.versions(POPULATION) == [] and not [p for p in models.folder.iterdir() if p.name.startswith("user-")]
    assert not [n for n in models.adapter_names() if n.startswith(("population-v", "user-"))]
    assert sorted(p.name for p in (models.folder / ".locks").iterdir()) == ["population.lock", "versions.lock"]
