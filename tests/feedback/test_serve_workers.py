"""`rlhfkit feedback serve --workers N`: several server processes start on a fresh database, share the
admin account, the session key and the sessions, on SQLite and PostgreSQL."""

import importlib.util
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from conftest import make_completions
from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.feedback import service
from rlhfkit.feedback.db import Setting, User, session_factory

spec = importlib.util.spec_from_file_location("feedback_load", Path(__file__).parents[2] / "benchmarks" /
                                              "feedback_load.py")
load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load)


def worker_processes(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]


@pytest.mark.slow
def test_two_workers_start_once_and_serve_one_session_on_every_connection(db_url):
    sessions = session_factory(db_url)
    with sessions() as session:
        service.create_project(session, "w", "helpfulness", make_completions("p0", 2))
    port = load.free_port()
    server = load.start_server(db_url, port, workers=2)
    try:
        assert len(worker_processes(server.pid)) == 2
        url = f"http://127.0.0.1:{port}"
        login = httpx.post(f"{url}/api/login", json={"username": "admin", "password": load.PASSWORD})
        assert login.status_code == 200, login.text
        for _ in range(20):  # a new connection each time: uvicorn's workers take turns accepting them
            response = httpx.get(f"{url}/api/admin/stats", params={"project": "w"}, cookies=login.cookies)
            assert response.status_code == 200, response.text
    finally:
        assert load.stop_server(server) is None
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(User).where(User.role == "admin")) == 1
        assert session.scalar(select(func.count()).select_from(Setting)) <= 1  # one session key, if any
    sessions.kw["bind"].dispose()
