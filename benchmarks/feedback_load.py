"""Load on the labeling app: N concurrent labelers label through the HTTP API of a real server process.

    python benchmarks/feedback_load.py --labelers 50                       # SQLite
    python benchmarks/feedback_load.py --labelers 50 --db postgresql://u@host/db
    python benchmarks/feedback_load.py --labelers 50 --kill-after 3        # kill -9 the server mid-load

Every labeler logs in and loops next item → submit (10% of submissions are sent twice, as a double
click would). Afterwards the database is checked: every label that got a success response is there,
no (item, labeler) has two labels, and no item has more than k labels. With ``--kill-after`` the
server gets SIGKILL during the load, is restarted on the same database, and the same checks run.
Prints the numbers and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from rlhfkit.data.records import Completion
from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Label, session_factory

PASSWORD = "load-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, log: Path | None = None) -> subprocess.Popen:
    """`rlhfkit feedback serve` in a child process, its output in ``log``; returns once it answers."""
    env = {**os.environ, "RLHFKIT_ADMIN_PASSWORD": PASSWORD}
    log = log or Path(tempfile.mkstemp(prefix="rlhfkit-server-", suffix=".log")[1])
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "feedback", "serve", "--db", db, "--port",
                                    str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    process.log = log
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 60 s")


def prepare(db: str, labelers: int, prompts: int, overlap: int) -> None:
    """A project of ``prompts`` items × 4 completions and ``labelers`` accounts."""
    sessions = session_factory(db)
    with sessions() as session:
        completions = [Completion(id=f"p{i}-{j}", prompt_id=f"p{i}", prompt=f"question {i}", text=f"answer {j}",
                                  index=j) for i in range(prompts) for j in range(4)]
        service.create_project(session, "load", "helpfulness", completions, overlap=overlap)
        for i in range(labelers):
            service.create_user(session, f"load-{i}", password=PASSWORD)
    sessions.kw["bind"].dispose()


def label_until_done(url: str, name: str, acknowledged: list, errors: list, stop: threading.Event,
                     rng: random.Random) -> None:
    client = None
    try:
        client = FeedbackClient(url, name, PASSWORD, timeout=60)
        while not stop.is_set():
            item = client.next_item("load")
            if item is None:
                return
            ids = [c["id"] for c in item["completions"]]
            rng.shuffle(ids)
            groups = [[i] for i in ids]
            result = client.submit(item["item_id"], groups)
            acknowledged.append((name, item["item_id"], result["label_id"]))
            if rng.random() < 0.1:  # a double click: must come back as the same label
                again = client.submit(item["item_id"], groups)
                if not again["duplicate"] or again["label_id"] != result["label_id"]:
                    errors.append(f"{name}: resubmission stored a second label")
    except (httpx.HTTPError, RuntimeError) as exc:
        if not stop.is_set():
            errors.append(f"{name}: {exc}")
    finally:
        if client is not None:
            client.close()


def run(db: str, labelers: int = 50, prompts: int = 200, overlap: int = 3, kill_after: float | None = None,
        seed: int = 0) -> dict:
    prepare(db, labelers, prompts, overlap)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(db, port)
    acknowledged: list[tuple[str, int, int]] = []
    errors: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=label_until_done, args=(url, f"load-{i}", acknowledged, errors, stop,
                                                               random.Random(seed + i))) for i in range(labelers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    killed = False
    if kill_after is not None:
        time.sleep(kill_after)
        stop.set()
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed = True
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if killed:  # restart on the same database: migrations and state must survive
        server = start_server(db, port)
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        errors.append("the server did not stop within 30 s of SIGTERM")
    sessions = session_factory(db)
    with sessions() as session:
        stored = {(label.user_id, label.item_id): label.id for label in session.query(Label).all()}
        by_id = {label_id for label_id in stored.values()}
        per_item: dict[int, int] = {}
        for _, item_id in stored:
            per_item[item_id] = per_item.get(item_id, 0) + 1
    sessions.kw["bind"].dispose()
    lost = [a for a in acknowledged if a[2] not in by_id]
    return {
        "database": db.split("://")[0] if "://" in db else "sqlite",
        "labelers": labelers, "items": prompts, "overlap": overlap, "killed": killed,
        "seconds": round(elapsed, 2), "acknowledged": len(acknowledged), "stored": len(stored),
        "labels_per_second": round(len(acknowledged) / elapsed, 1),
        "lost": len(lost), "over_filled_items": sum(n > overlap for n in per_item.values()),
        "errors": errors[:10], "error_count": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--kill-after", type=float)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/feedback_load.json"))
    args = parser.parse_args()
    db = args.db or str(Path(tempfile.mkdtemp()) / "load.db")
    result = run(db, args.labelers, args.prompts, args.overlap, args.kill_after)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
