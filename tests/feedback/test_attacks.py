"""The labeling app against hostile and careless input found by attacking a running server: every
request a client can send gets a 4xx with its reason, never a 500, on SQLite and PostgreSQL."""

import json
import re

import pytest
from fastapi.testclient import TestClient
from test_app import login, setup_project

from conftest import make_completions
from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.data.records import Completion
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app

NUL = "a\x00b"


def page_csrf(response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', response.text).group(1)


def completions_file(text: str = "an answer") -> bytes:
    return "".join(json.dumps({"schema": Completion.schema_name(), **c.model_dump(mode="json"), "text": text}) + "\n"
                   for c in make_completions("z", 2)).encode()


def test_nul_characters_and_lone_surrogates_are_refused_on_every_endpoint(db_url):
    app = create_app(db_url)
    setup_project(app)
    anonymous = TestClient(app, raise_server_exceptions=False)
    ann = login(TestClient(app, raise_server_exceptions=False), "ann")
    admin = login(TestClient(app, raise_server_exceptions=False), "admin", "admin-pass")
    requests = {
        "login": anonymous.post("/api/login", json={"username": NUL, "password": "x"}),
        "next": ann.get("/api/next", params={"project": NUL}),
        "progress": ann.get("/api/progress", params={"project": NUL}),
        "undo": ann.post("/api/undo", json={"project": NUL}),
        "invite page": anonymous.get("/invite/a%00b"),
        "invite": anonymous.post("/api/invite/a%00b", json={"password": "long-enough-password"}),
        "disable": admin.post("/api/admin/users/a%00b/disable", json={}),
        "reset": admin.post("/api/admin/users/a%00b/reset"),
        "export": admin.get("/admin/export/pairs", params={"project": NUL}),
        "stats": admin.get("/api/admin/stats", params={"project": NUL}),
        "admin page": admin.get("/admin", params={"project": NUL}),
        "create user": admin.post("/api/admin/users", json={"username": NUL}),
    }
    for name, body in (("surrogate login", b'{"username": "ann", "password": "\\ud800"}'),
                       ("surrogate password", b'{"old": "\\ud800", "new": "\\udfff-long-enough"}')):
        path = "/api/login" if "login" in name else "/api/password"
        requests[name] = (ann if "password" in name else anonymous).post(
            path, content=body, headers={"content-type": "application/json"})
    form = {"csrf": page_csrf(admin.get("/admin")), "criterion": "helpfulness", "name": "n"}
    for field, value in (("criterion", NUL), ("instructions", NUL)):
        requests[f"project {field}"] = admin.post("/admin/projects", data=form | {field: value},
                                                  files={"completions": ("c.jsonl", completions_file())})
    requests["project completion text"] = admin.post(
        "/admin/projects", data=form, files={"completions": ("c.jsonl", completions_file("t\x00t"))})
    for name, response in requests.items():
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    assert "surrogate" in requests["surrogate login"].text
    if db_url.startswith("postgresql"):  # SQLite stores NUL and simply finds no such project
        assert "NUL" in requests["next"].json()["detail"]


def test_a_project_refuses_an_overlap_or_gold_rate_out_of_range(db_url):
    app = create_app(db_url)
    setup_project(app)
    admin = login(TestClient(app, raise_server_exceptions=False), "admin", "admin-pass")
    form = {"csrf": page_csrf(admin.get("/admin")), "criterion": "helpfulness"}
    # 10**8 labelers per item once made every /api/next enumerate 10**8 slots (40 s, GBs of memory)
    for i, (field, value) in enumerate((("overlap", "0"), ("overlap", "100000000"), ("overlap", str(2**40)),
                                        ("gold_rate", "nan"), ("gold_rate", "-5"), ("gold_rate", "1.5"))):
        refused = admin.post("/admin/projects", data=form | {"name": f"p{i}", field: value},
                             files={"completions": ("c.jsonl", completions_file())}, follow_redirects=False)
        assert refused.status_code == 422, (field, value, refused.status_code)
    with app.state.sessions() as db, pytest.raises(service.FeedbackError, match="overlap"):
        service.create_project(db, "big", "helpfulness", make_completions("q", 2), overlap=service.MAX_OVERLAP + 1)
