"""Load on the labeling app: N concurrent labelers label through the HTTP API of a real server process.

    python benchmarks/feedback_load.py                      # 200 labelers, SQLite and PostgreSQL, kill -9 runs
    python benchmarks/feedback_load.py --db postgresql --labelers 50 --workers 1 --think 0 --kill-after 0
    python benchmarks/feedback_load.py --db postgresql://u@host/db   # an existing (empty) database

``--db postgresql`` starts a throwaway PostgreSQL server (initdb + pg_ctl, as the tests do); a URL or a
file path uses that database, which must be empty. Everything listens on 127.0.0.1 only.

Every labeler logs in (timed apart from the load), then loops: GET /api/next → think → POST /api/labels,
sending 10% of submissions twice (a double click must return the same label). Labelers stop when the
queue is empty or take no new item after ``--seconds``. The think time is drawn uniformly from [0.5, 1.5] × ``--think``.
By Little's law the labelers in flight N, the label rate X and the time per label satisfy
N = X · (think + latency of next + latency of submit): with ``--think 0`` every labeler waits on the
server all the time, so latency is N / X and only the rate measures the server; with a think time the
latency is the server's answer time under an offered load of at most N / think labels per second. Each
run states that offered load next to the rate it achieved (``offered_labels_per_second``, and a line on
stderr); ``--think 1 1.5`` runs once per think time (the default is one run at 1 s).

Afterwards the label rows are read back from the database and counted (``audit``): labels per
(labeler, item) above one are duplicates, items with more than k labels are over-filled, acknowledged
label ids missing from the table are lost. With ``--kill-after S`` a second run per database gets
SIGKILL to the server's whole process group S seconds into the load, restarts the server on the same
database (migrations and start-up must survive) and runs the same counts.

Writes the results to a new timestamped JSON file in benchmarks/results/ (never an existing file), with
the load average of the machine before and after each run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil
from sqlalchemy import select

from rlhfkit.data.records import Completion
from rlhfkit.feedback import service
from rlhfkit.feedback.db import Label, User, session_factory

PASSWORD = "load-test-password"
RESULTS = Path(__file__).parent / "results"
TESTS = Path(__file__).parents[1] / "tests"
LOGINS_AT_ONCE = 10  # under the app's per-address throttle (service.LOGIN_THROTTLE["ip"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, workers: int = 1, log: Path | None = None,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    """`rlhfkit feedback serve` in a child process (its own process group, so that a kill reaches every
    worker), its output in ``log``; returns once it answers."""
    env = {**os.environ, "RLHFKIT_ADMIN_PASSWORD": PASSWORD}
    log = log or Path(tempfile.mkstemp(prefix="rlhfkit-server-", suffix=".log")[1])
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "feedback", "serve", "--db", db, "--port",
                                    str(port), "--workers", str(workers), *extra], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
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
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"the server did not start within 60 s: {log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> str | None:
    """SIGTERM, then SIGKILL to the whole group after 30 s; returns a complaint if it needed the kill."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "the server did not stop within 30 s of SIGTERM"
    return None


def prepare(db: str, labelers: int, prompts: int, overlap: int) -> None:
    """A project of ``prompts`` items × 4 completions and ``labelers`` accounts (one scrypt hash, shared)."""
    sessions = session_factory(db)
    with sessions() as session:
        completions = [Completion(id=f"p{i}-{j}", prompt_id=f"p{i}", prompt=f"question {i}", text=f"answer {j}",
                                  index=j) for i in range(prompts) for j in range(4)]
        service.create_project(session, "load", "helpfulness", completions, overlap=overlap)
        first = service.create_user(session, "load-0", password=PASSWORD)
        session.add_all(User(username=f"load-{i}", role="labeler", password_hash=first.password_hash)
                        for i in range(1, labelers))
        session.commit()
    sessions.kw["bind"].dispose()


def stored_labels(db: str) -> list[tuple[int, int, int]]:
    """(label id, user id, item id) of every row of the labels table."""
    sessions = session_factory(db)
    with sessions() as session:
        rows = [tuple(row) for row in session.execute(select(Label.id, Label.user_id, Label.item_id))]
    sessions.kw["bind"].dispose()
    return rows


def audit(rows: Iterable[tuple[int, int, int]], acknowledged: Iterable[int], overlap: int) -> dict:
    """What the database holds against what the server acknowledged.

    rows: (label id, user id, item id) per stored label; acknowledged: the label ids of success responses.
    duplicated = Σ over (user, item) of max(0, labels − 1); over_filled_items = #{item : labels > k};
    lost = #{acknowledged ids not stored}.
    """
    rows = list(rows)
    per_pair = Counter((user, item) for _, user, item in rows)
    per_item = Counter(item for _, _, item in rows)
    ids = {label_id for label_id, _, _ in rows}
    return {"stored": len(rows), "lost": len(set(acknowledged) - ids),
            "duplicated": sum(n - 1 for n in per_pair.values()),
            "over_filled_items": sum(n > overlap for n in per_item.values())}


def latency_ms(seconds: list[float]) -> dict:
    """p50 / p95 / max of a list of durations, in milliseconds (None when nothing was timed)."""
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    p50, p95 = np.percentile(seconds, [50, 95]) * 1000
    return {"n": len(seconds), "p50": round(float(p50), 1), "p95": round(float(p95), 1),
            "max": round(max(seconds) * 1000, 1)}


class Labelers:
    """N labelers as asyncio tasks, each with its own HTTP session (cookies) and random generator.

    aiohttp (C HTTP parser) rather than httpx: the client runs on the same cores as the server, and
    httpx took 3.6 ms of CPU per label against aiohttp's 1.1 (benchmarks/README.md)."""

    def __init__(self, url: str, count: int, think: float, seed: int, ramp: float = 0.0) -> None:
        self.url, self.count, self.think, self.seed, self.ramp = url, count, think, seed, ramp
        self.timings: dict[str, list[float]] = {"login": [], "next": [], "submit": []}
        self.acknowledged: list[int] = []
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def _request(self, kind: str | None, client: aiohttp.ClientSession, method: str, path: str,
                       **kwargs) -> tuple[int, dict | None]:
        """(status, JSON body or None for 204); timed under ``kind``; a status ≥ 400 raises."""
        started = time.perf_counter()
        async with client.request(method, path, **kwargs) as response:
            body = await response.read()
        if kind:
            self.timings[kind].append(time.perf_counter() - started)
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {body[:200]!r}")
        return response.status, json.loads(body) if body else None

    async def _label(self, client: aiohttp.ClientSession, name: str, rng: random.Random, deadline: float) -> None:
        await asyncio.sleep(rng.uniform(0, self.ramp))  # each labeler starts at a moment of their own
        while not self.stop.is_set() and time.perf_counter() < deadline:
            status, item = await self._request("next", client, "GET", "/api/next", params={"project": "load"})
            if status == 204:
                return
            ids = [c["id"] for c in item["completions"]]
            rng.shuffle(ids)
            body = {"item_id": item["item_id"], "groups": [[i] for i in ids], "flagged": []}
            if self.think:
                with contextlib.suppress(TimeoutError):  # a kill ends the thinking at once
                    await asyncio.wait_for(self.stop.wait(), self.think * rng.uniform(0.5, 1.5))
                if self.stop.is_set():
                    return
            _, result = await self._request("submit", client, "POST", "/api/labels", json=body)
            self.acknowledged.append(result["label_id"])
            if rng.random() < 0.1:  # a double click: must come back as the same label
                _, again = await self._request(None, client, "POST", "/api/labels", json=body)
                if not again.get("duplicate") or again.get("label_id") != result["label_id"]:
                    self.errors.append(f"{name}: resubmission of item {item['item_id']} answered {again}")

    async def run(self, seconds: float, kill_after: float | None, kill, cpu) -> tuple[float, dict]:
        """Log everyone in, then label; returns the seconds of labeling (login excluded) and the CPU
        seconds that ``cpu()`` counted meanwhile (before a kill)."""
        # one connection per labeler; idle ones are dropped by the client before uvicorn's 5 s keep-alive
        # can close them under a request (the wait for everyone's login is longer than that)
        clients = [aiohttp.ClientSession(self.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         timeout=aiohttp.ClientTimeout(total=60),
                                         connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=2))
                   for _ in range(self.count)]
        try:
            # The app counts a login in flight as a failure of the client address until its password
            # checks out, and throttles an address with 20 of them: all labelers come from 127.0.0.1.
            logging_in = asyncio.Semaphore(LOGINS_AT_ONCE)

            async def login(i: int) -> None:
                async with logging_in:
                    _, answer = await self._request("login", clients[i], "POST", "/api/login",
                                                    json={"username": f"load-{i}", "password": PASSWORD})
                clients[i].headers["X-CSRF-Token"] = answer["csrf"]

            started = time.perf_counter()
            await asyncio.gather(*(login(i) for i in range(self.count)))
            print(f"{self.count} labelers logged in in {time.perf_counter() - started:.1f} s; labeling",
                  file=sys.stderr, flush=True)
            started, cpu_started = time.perf_counter(), cpu()

            async def labeler(i: int) -> None:
                try:
                    await self._label(clients[i], f"load-{i}", random.Random(self.seed + i), started + seconds)
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    if not self.stop.is_set():
                        self.errors.append(f"load-{i}: {type(exc).__name__}: {exc}")

            tasks = [asyncio.create_task(labeler(i)) for i in range(self.count)]
            if kill_after is not None:
                await asyncio.wait(tasks, timeout=kill_after)
                cpu_used = {k: v - cpu_started[k] for k, v in cpu().items()}
                self.stop.set()
                kill()
            await asyncio.gather(*tasks)
            if kill_after is None:
                cpu_used = {k: v - cpu_started[k] for k, v in cpu().items()}
            return time.perf_counter() - started, cpu_used
        finally:
            await asyncio.gather(*(c.close() for c in clients))


def cpu_seconds(server: subprocess.Popen, db: str) -> dict:
    """CPU seconds used so far by this client process, the server (all its worker processes), the
    PostgreSQL backends serving ``db`` (on this machine), and the whole machine (every process, ours or not)."""
    def process_tree(pid: int) -> float:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid)
            return sum(_cpu(p) for p in [parent, *parent.children(recursive=True)])
        return 0.0

    machine = psutil.cpu_times()
    seconds = {"client": time.process_time(), "server": process_tree(server.pid),
               "machine": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)}
    if db.startswith("postgresql"):  # a backend's title is "postgres: USER DATABASE ADDRESS STATE"
        database = db.rsplit("/", 1)[1]
        seconds["postgresql"] = sum(_cpu(p) for p in psutil.process_iter(["cmdline"])
                                    if database in " ".join(p.info["cmdline"] or []).split())
    return seconds


def _cpu(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        return times.user + times.system
    return 0.0


def run(db: str, labelers: int = 50, prompts: int = 200, overlap: int = 3, kill_after: float | None = None,
        workers: int = 1, think: float = 0.0, seconds: float = 120.0, seed: int = 0, threads: int = 8,
        ramp: float = 0.0) -> dict:
    """One load run on an empty database ``db``; the counts of ``audit`` and the timings."""
    prepare(db, labelers, prompts, overlap)
    port = free_port()
    load_before = os.getloadavg()
    server = start_server(db, port, workers, extra=["--threads", str(threads)])
    crowd = Labelers(f"http://127.0.0.1:{port}", labelers, think, seed, ramp)

    def kill() -> None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    try:
        elapsed, cpu_used = asyncio.run(crowd.run(seconds, kill_after, kill, lambda: cpu_seconds(server, db)))
        if kill_after is not None:  # restart on the same database: migrations and state must survive
            server = start_server(db, port, workers, extra=["--threads", str(threads)])
    finally:
        complaint = stop_server(server)
    if complaint:
        crowd.errors.append(complaint)
    counts = audit(stored_labels(db), crowd.acknowledged, overlap)
    return {
        "database": db.split("://")[0] if "://" in db else "sqlite",
        "labelers": labelers, "items": prompts, "overlap": overlap, "workers": workers, "threads": threads,
        "think_seconds": think, "ramp_seconds": ramp,
        # N / mean think: the most labels per second these labelers ask for (with no latency at all)
        "offered_labels_per_second": round(labelers / think, 1) if think else None,
        "killed": kill_after is not None, "seconds": round(elapsed, 2), "acknowledged": len(crowd.acknowledged),
        **counts, "labels_per_second": round(len(crowd.acknowledged) / elapsed, 1),
        "latency_ms": {kind: latency_ms(values) for kind, values in crowd.timings.items()},
        # cores used while labeling (CPU seconds / seconds; until the kill in a kill run): where the 2 went
        "cores_used": {k: round(v / (kill_after or elapsed), 2) for k, v in cpu_used.items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "errors": crowd.errors[:10], "error_count": len(crowd.errors),
    }


def summary(result: dict) -> str:
    """One line: the offered load (labelers / think) next to the achieved rate, and the latencies."""
    offered = (f"offered ≤ {result['offered_labels_per_second']} labels/s ({result['labelers']} labelers / "
               f"{result['think_seconds']} s think)" if result["think_seconds"] else
               f"{result['labelers']} labelers, no think time (closed loop: the rate measures the server)")
    latency = result["latency_ms"]
    killed = ", killed mid-load" if result["killed"] else ""
    return (f"{result['database']}{killed}: {offered}; achieved {result['labels_per_second']} labels/s; "
            f"p50 / p95 next {latency['next']['p50']} / {latency['next']['p95']} ms, "
            f"submit {latency['submit']['p50']} / {latency['submit']['p95']} ms")


@contextlib.contextmanager
def databases(kind: str) -> Iterator:
    """A function that returns a new empty database URL for each run: ``sqlite`` (a temporary file),
    ``postgresql`` (a throwaway local server), or one given URL / file path (one run only)."""
    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="rlhfkit-load-"))
        count = iter(range(1_000_000))
        yield lambda: str(folder / f"load-{next(count)}.db")
    elif kind == "postgresql":
        sys.path.insert(0, str(TESTS))
        import pytest

        from feedback_postgres import fresh_database, postgres_server

        try:
            with postgres_server() as server:
                yield lambda: fresh_database(server)
        except pytest.skip.Exception as exc:
            raise SystemExit(f"--db postgresql: {exc.msg}") from None
    else:
        yield lambda: kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"],
                        help="sqlite, postgresql (a throwaway server), or an empty database URL / file path")
    parser.add_argument("--labelers", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=1000, help="items to label (× --overlap labels)")
    parser.add_argument("--overlap", type=int, default=3, help="labelers per item (k)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="requests per worker that run database work at once")
    parser.add_argument("--think", type=float, nargs="+", default=[1.0],
                        help="mean seconds a labeler reads before submitting; several: one run per value")
    parser.add_argument("--seconds", type=float, default=60.0, help="take no new item after this long")
    parser.add_argument("--ramp", type=float, help="labelers start at random moments over this many seconds "
                                                   "[default: the think time; 0: all at once]")
    parser.add_argument("--kill-after", type=float, default=5.0,
                        help="also run once with kill -9 this many seconds into the load (0: no kill run)")
    parser.add_argument("--out", type=Path, help="results file [default: results/feedback_load-TIMESTAMP.json]")
    args = parser.parse_args()
    out = args.out or RESULTS / f"feedback_load-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    if out.exists():
        sys.exit(f"{out} exists: choose another --out (results are never overwritten)")
    if any(think < 0 for think in args.think):
        sys.exit(f"--think {min(args.think)}: a think time is 0 seconds or more")
    runs = [(think, kill_after) for think in args.think
            for kill_after in [None] + ([args.kill_after] if args.kill_after > 0 else [])]
    given = [kind for kind in args.db if kind not in ("sqlite", "postgresql")]
    if given and len(runs) > 1:
        sys.exit(f"--db {given[0]}: a given database serves one run; add --kill-after 0 and give one --think")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for kind in args.db:
        with databases(kind) as new_database:
            for think, kill_after in runs:
                try:
                    result = run(new_database(), args.labelers, args.prompts, args.overlap, kill_after,
                                 args.workers, think, args.seconds, threads=args.threads,
                                 ramp=think if args.ramp is None else args.ramp)
                except service.FeedbackError as exc:
                    sys.exit(f"--db {kind}: {exc.message} (the benchmark needs an empty database)")
                print(json.dumps(result), flush=True)
                print(summary(result), file=sys.stderr, flush=True)
                results.append(result)
                out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                           "runs": results}, indent=1))  # after each run: a failure keeps them
    print(f"written to {out}")
    failed = [r for r in results if r["lost"] or r["duplicated"] or r["over_filled_items"] or r["error_count"]]
    if failed:
        sys.exit(f"{len(failed)} run(s) lost, duplicated or over-filled labels, or had errors: see {out}")


if __name__ == "__main__":
    main()
