"""The personal-model API over HTTP with a tiny model: ask, choose, learn, delete, and what attackers and
careless users send."""

import json
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.personal import store
from rlhfkit.personal.api import PersonalSettings, include_personal
from rlhfkit.personal.models import PersonalModels, user_owner
from rlhfkit.personal.train import PersonalDPOConfig

PROMPT = "how do i fix bike"


@pytest.fixture
def server(tmp_path):
    app = create_app(str(tmp_path / "feedback.db"))
    models = PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters")
    settings = PersonalSettings(train_every=2, max_new_tokens=8, dpo=PersonalDPOConfig(epochs=1, lr=1e-2))
    queue = include_personal(app, models, settings)
    with app.state.sessions() as db:
        for name in ("ann", "bob"):
            service.create_user(db, name, password=f"{name}-password")
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
    assert ann.delete("/api/personal/data").json() == {"deleted_choices": 2, "adapters": []}
    with app.state.sessions() as db:
        assert db.scalars(select(store.PersonalChoice).where(store.PersonalChoice.user_id == ann_id)).all() == []
    assert not (models.folder / owner).exists()
    assert not [n for n in models.adapter_names() if n.startswith(f"{owner}-")]
    assert ann.get("/api/personal/learned").json()["choices"] == []
    assert models.adapter(user_owner(user_id(app, "bob"))) is not None  # bob's is untouched


@pytest.mark.parametrize("body, status, says", [
    (b'{"prompt": ""}', 422, "at least 1 character"),
    (b'{"prompt": "   "}', 422, "blank"),
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
    eos = models.tokenizer.eos_token_id

    def never_end(_module, _inputs, logits):
        logits[..., eos] = -float("inf")
        return logits

    with models.model.get_output_embeddings().register_forward_hook(never_end):
        ask_and_choose(login(app, "ann"), "b")
    with app.state.sessions() as db:
        [row] = store.user_choices(db, user_id(app, "ann"))
        [pair] = store.preference_pairs([row])
    assert row.as_dict()["truncated"] == [True, True] and all(len(a.split()) == 8 for a in row.as_dict()["answers"])
    assert pair.chosen_truncated and pair.rejected_truncated
