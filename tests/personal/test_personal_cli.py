"""`rlhfkit personal train`: a version per user from the command line; mistakes end in one line."""

import pytest

from conftest import invoke, save_tiny_policy
from rlhfkit.feedback import db as feedback_db
from rlhfkit.feedback import service
from rlhfkit.personal import store


@pytest.fixture
def setup(tmp_path):
    db = str(tmp_path / "feedback.db")
    with feedback_db.session_factory(db)() as session:
        ann = service.create_user(session, "ann", password="ann-password")
        service.create_user(session, "bob", password="bob-password")
        for prompt in ("how do i fix bike", "how do i bake cake"):
            row = store.record_question(session, ann, prompt, ("thanks glad to help", "you idiot"), ("base", "base"))
            store.record_choice(session, ann, row.id, "a")
    return db, save_tiny_policy(tmp_path / "policy"), tmp_path / "adapters", ann.id


def test_train_writes_the_users_next_version_and_says_what_it_trained_on(setup):
    db, policy, adapters, ann_id = setup
    result = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, "--user", "ann",
                    "--epochs", 1, "--no-chat-template")
    assert result.exit_code == 0, result.output
    assert "ann: version 1 on 2 pairs (from base)" in result.output
    assert (adapters / f"user-{ann_id}" / "v1" / "adapter_model.safetensors").is_file()
    everyone = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, "--all",
                      "--population", "--epochs", 1, "--no-chat-template")
    assert everyone.exit_code == 0, everyone.output
    assert "population: version 1 on 2 pairs (from base)" in everyone.output
    assert "ann: version 2 on 2 pairs (from population-v1)" in everyone.output and "bob" not in everyone.output
    nothing = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, "--user", "bob")
    assert nothing.exit_code == 0 and "bob: no preference pairs" in nothing.output


@pytest.mark.parametrize("args, says", [
    (["--user", "nobody"], "no user named 'nobody'"),
    ([], "say whose model to train"),
    (["--user", "ann", "--all"], "give one of them"),
    (["--user", "ann", "--lr", "0"], "lr"),
])
def test_train_mistakes_end_in_one_line(setup, args, says):
    db, policy, adapters, _ = setup
    result = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, *args)
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_puts_the_personal_page_in_the_feedback_app_on_the_same_accounts(setup, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    db, policy, adapters, _ = setup
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    result = invoke("personal", "serve", "--policy", policy, "--db", db, "--adapters", adapters, "--port", 8123,
                    "--train-every", 3, "--no-chat-template", "--rerank-n", 3, "--rerank-min-pairs", 2)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "http://127.0.0.1:8123/personal" in said and "(2 accounts;" in said
    client = TestClient(served["app"])
    client.headers["X-CSRF-Token"] = client.post("/api/login", json={"username": "ann",
                                                                     "password": "ann-password"}).json()["csrf"]
    learned = client.get("/api/personal/learned").json()
    assert learned["pairs"] == 2 and learned["train_every"] == 3
    assert learned["current_model"] == "base best-of-3 reranked"  # no version yet, 2 pairs: the head answers


@pytest.mark.parametrize(("args", "says"), [
    (["--rerank-n", 1], "field 'n': must be 0 (no reranking) or at least 2"),
    (["--rerank-encoder", "no/such/encoder"], "encoder: Path no/such/encoder not found (give a sentence-transformers"),
])
def test_serve_refuses_a_reranking_it_cannot_do_in_one_line(setup, args, says):
    db, policy, adapters, _ = setup
    result = invoke("personal", "serve", "--policy", policy, "--db", db, "--adapters", adapters, *args)
    assert result.exit_code == 1 and says in " ".join(result.output.split()) and "Traceback" not in result.output
