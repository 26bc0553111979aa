"""The app as a real server process: labeling through HTTP under concurrency, kill -9 durability, and
the feedback commands (project, simulate, export)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_completions
from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import PreferencePair, Ranking

spec = importlib.util.spec_from_file_location("feedback_load", Path(__file__).parents[2] / "benchmarks" /
                                              "feedback_load.py")
load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load)


@pytest.mark.slow
def test_concurrent_labelers_lose_and_duplicate_nothing(db_url):
    result = load.run(db_url, labelers=16, prompts=30, overlap=3)
    print(result)
    assert result["error_count"] == 0, result["errors"]
    assert result["acknowledged"] == result["stored"] == 30 * 3  # every item reached k, nothing twice
    assert result["lost"] == 0 and result["over_filled_items"] == 0


@pytest.mark.slow
def test_every_acknowledged_label_survives_kill_9(db_url):
    result = load.run(db_url, labelers=16, prompts=200, overlap=3, kill_after=2.5)
    print(result)
    assert result["killed"] and result["acknowledged"] > 0
    assert result["lost"] == 0 and result["over_filled_items"] == 0
    assert result["stored"] >= result["acknowledged"]  # a label may be stored whose answer was cut off


@pytest.mark.slow
def test_feedback_commands_with_simulated_labelers_over_http(tmp_path):
    db = str(tmp_path / "app.db")
    completions = [c.model_copy(update={"text": f"my answer is {c.index}"}) for p in range(8)
                   for c in make_completions(f"p{p}", 4)]
    write_records(tmp_path / "completions.jsonl", completions)
    write_records(tmp_path / "gold.jsonl", [Ranking(prompt_id="p7", labeler_id="gold",
                                                    groups=[["p7-3"], ["p7-2"], ["p7-1"], ["p7-0"]])])
    (tmp_path / "instructions.md").write_text("Rank by **the number** at the end: higher is better.")
    cli = [sys.executable, "-m", "rlhfkit.cli", "feedback"]
    created = subprocess.run([*cli, "project", "--db", db, "--name", "numbers", "--criterion", "bigger number",
                              "--completions", tmp_path / "completions.jsonl", "--overlap", "4", "--gold",
                              tmp_path / "gold.jsonl", "--gold-rate", "0.3", "--instructions",
                              tmp_path / "instructions.md"], capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    port = load.free_port()
    server = load.start_server(db, port)
    try:
        quality = "python:feedback_quality:last_number"
        env = {**os.environ, "RLHFKIT_ADMIN_PASSWORD": load.PASSWORD,
               "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        simulated = subprocess.run([*cli, "simulate", "--url", f"http://127.0.0.1:{port}", "--labelers",
                                    "good,good,tie-happy,adversarial", "--quality", quality],
                                   capture_output=True, text=True, env=env)
        assert simulated.returncode == 0, simulated.stderr
        assert "flagged as poor: sim-adversarial-3" in simulated.stderr.replace("\n", " ")
    finally:
        server.terminate()
        server.wait(timeout=30)
    exported = subprocess.run([*cli, "export", "--db", db, "--project", "numbers", "--rankings",
                               tmp_path / "rankings.jsonl", "--pairs", tmp_path / "pairs.jsonl"],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    rankings = read_records(tmp_path / "rankings.jsonl", Ranking)
    assert {r.prompt_id for r in rankings} == {f"p{i}" for i in range(7)}  # gold items are not exported
    assert all("adversarial" not in r.labeler_id for r in rankings)
    pairs = read_records(tmp_path / "pairs.jsonl", PreferencePair)
    right = sum(int(p.chosen.split()[-1]) > int(p.rejected.split()[-1]) for p in pairs)
    assert right / len(pairs) > 0.9, json.dumps([p.model_dump() for p in pairs[:3]])
