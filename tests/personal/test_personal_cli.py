"""`rlhfkit personal train`: a version per user from the command line; mistakes end in one line."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import invoke, save_tiny_policy
from rlhfkit.feedback import db as feedback_db
from rlhfkit.feedback import service
from rlhfkit.personal import store
from rlhfkit.personal.cli import _models
from rlhfkit.personal.models import user_owner
from rlhfkit.personal.train import PersonalDPOConfig, train_user


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


def test_train_with_the_kl_term_records_its_coefficient_and_per_step_kl(setup):
    db, policy, adapters, ann_id = setup
    result = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, "--user", "ann",
                    "--epochs", 1, "--kl-coef", 2, "--no-chat-template")
    assert result.exit_code == 0, result.output
    info = json.loads((adapters / f"user-{ann_id}" / "v1" / "version.json").read_text())
    assert info["config"]["kl_coef"] == 2.0 and info["final"]["kl"] >= 0


@pytest.mark.parametrize("args, says", [
    (["--user", "nobody"], "no user named 'nobody'"),
    ([], "say whose model to train"),
    (["--user", "ann", "--all"], "give one of them"),
    (["--user", "ann", "--lr", "0"], "lr"),
    (["--user", "ann", "--kl-coef", "-1"], "kl_coef"),
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


def test_train_in_another_process_waits_for_a_training_of_the_same_user_here_and_its_versions_are_served_here(setup):
    """`personal train` beside a serving process on the same folder: its training of ann waits for the one
    running here (a lock file per owner), and each process starts from and serves what the other published."""
    db, policy, adapters, ann_id = setup
    models = _models(str(policy), adapters, chat_template=False, lora_r=8)  # as `personal serve` loads them
    owner, sessions = user_owner(ann_id), feedback_db.session_factory(db)
    command = [sys.executable, "-m", "rlhfkit.cli", "personal", "train", "--policy", policy, "--db", db, "--adapters",
               adapters, "--population", "--user", "ann", "--epochs", 1, "--no-chat-template"]
    with models.training_of(owner):  # a training of ann here
        other = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})  # it reports on stderr
        said = ""
        while "population: version 1" not in said and other.poll() is None:
            said = other.stderr.readline()  # the population first: the other process is past its start-up
        time.sleep(2)
        assert other.poll() is None, said  # its training of ann waits for this one
        with sessions() as session:
            assert train_user(models, session, ann_id, PersonalDPOConfig(epochs=1)) == 1
    said = " ".join((said + other.communicate(timeout=120)[1]).split())
    assert other.returncode == 0 and "ann: version 2 on 2 pairs (from population-v1)" in said, said
    assert models.version_info(owner, 1)["start"] == "population-v1"  # published there, started from here
    assert models.adapter(owner) == f"user-{ann_id}-v2"  # published there, served here
    assert models.answer("how do i fix bike", models.adapter(owner), max_new_tokens=4, seed=0).text


def test_train_reports_a_version_that_a_deletion_in_the_serving_process_removed_right_after_it_was_published(
        setup, capsys):
    from rlhfkit.personal.cli import _report
    from rlhfkit.personal.models import POPULATION
    from rlhfkit.personal.train import train_population

    db, policy, adapters, ann_id = setup
    models = _models(str(policy), adapters, chat_template=False, lora_r=8)
    with feedback_db.session_factory(db)() as session:
        version = train_population(models, session, PersonalDPOConfig(epochs=1))
    _models(str(policy), adapters, chat_template=False, lora_r=8).forget(ann_id)  # `personal serve` deletes ann
    capsys.readouterr()  # the models' loading
    _report(models, POPULATION, "population", version)
    said = " ".join(capsys.readouterr().err.split())  # the console writes to stderr
    assert said == ("population: version 1 was removed right after it was published (trained on the pairs of a "
                    "user who deleted their data)")


def test_train_on_an_adapters_folder_where_lock_files_cannot_be_made_ends_in_one_line(setup):
    db, policy, adapters, _ = setup
    adapters.mkdir()
    (adapters / ".locks").write_text("")
    result = invoke("personal", "train", "--policy", policy, "--db", db, "--adapters", adapters, "--user", "ann")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"error: {adapters / '.locks'}: cannot make lock files there (File exists): the adapters folder must be " \
           "writable" in said
