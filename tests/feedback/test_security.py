"""The labeling app against an attacker: sanitised instructions, security headers, body limits, login
throttling, server-side sessions, account administration, password policy, and requests that used to
end in a 500."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from test_app import login, setup_project
from typer.testing import CliRunner

from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app, sanitised_markdown
from rlhfkit.feedback.db import LoginFailures, now

HOSTILE = """# Guide
<script>fetch('/api/admin/users', {method: 'POST'})</script>
<img src="x" onerror="alert(1)">
[click](javascript:alert(1)) <iframe src="https://evil.example"></iframe>
<a href="https://example.com" onclick="alert(1)">fine link</a> **bold**
"""


def test_instructions_keep_markdown_and_lose_everything_that_runs():
    html = sanitised_markdown(HOSTILE)
    assert "<strong>bold</strong>" in html and 'href="https://example.com"' in html
    for bad in ("<script", "onerror", "onclick", "javascript:", "<iframe"):
        assert bad not in html


def test_every_response_has_a_strict_policy_and_no_page_has_inline_script(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    ann = login(TestClient(app), "ann")
    for response in (TestClient(app).get("/login"), TestClient(app).get("/api/next"), ann.get("/"),
                     ann.get("/static/label.js"), ann.get("/api/next")):
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    page = ann.get("/").text
    assert page.count("<script") == page.count('<script src="/static/') == 1


def test_a_large_body_is_refused_before_it_is_read_and_anonymous_bodies_are_not_parsed(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    anonymous = TestClient(app)
    big = b"[" + b"1," * 1_000_000 + b"1]"
    assert anonymous.post("/api/labels", content=big, headers={"content-type": "application/json"}).status_code == 413
    streamed = anonymous.post("/api/login", content=iter([b"x" * 600_000, b"x" * 600_000]))  # no Content-Length
    assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
    # an anonymous call's body is never read: the session is checked first
    assert anonymous.post("/api/labels", content=iter([b"x" * 600_000, b"x" * 600_000])).status_code == 401
    assert anonymous.post("/api/labels", content=b"{not json").status_code == 401
    ann = login(TestClient(app), "ann")
    assert ann.post("/api/labels", content=b"{not json").status_code == 422


def test_login_is_throttled_per_account_then_locked(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    client = TestClient(app)
    attempt = lambda password: client.post("/api/login", json={"username": "ann", "password": password})  # noqa: E731
    assert [attempt("wrong-password").status_code for _ in range(3)] == [401, 401, 401]
    refused = attempt("ann-password")  # right, but too soon after 3 failures
    assert refused.status_code == 429 and "try again in 1 s" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    with app.state.sessions() as db:
        db.execute(update(LoginFailures).values(last_failure=now() - timedelta(seconds=2)))
        db.commit()
    assert attempt("ann-password").status_code == 200  # the back-off has passed; success forgets the failures
    with app.state.sessions() as db:
        assert db.get(LoginFailures, "user:ann") is None
        db.add(LoginFailures(key="user:ann", failures=10, last_failure=now() - timedelta(minutes=5)))
        db.commit()
    locked = attempt("ann-password")
    assert locked.status_code == 429 and "try again in" in locked.json()["detail"]
    assert 590 <= int(locked.json()["detail"].split()[-2]) <= 600  # locked for 15 minutes, 5 of them gone
    assert login(TestClient(app), "bob").get("/api/next").status_code == 200  # other accounts are not affected


def test_login_is_throttled_per_client_address_across_accounts(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    with app.state.sessions() as db:
        service.record_login_failure(db, ["ip:testclient"] * 19)  # 19 failures from this address so far
    client = TestClient(app)
    assert client.post("/api/login", json={"username": "nobody", "password": "x"}).status_code == 401
    refused = client.post("/api/login", json={"username": "cat", "password": "cat-password"})
    assert refused.status_code == 429


def test_an_unknown_username_costs_a_password_hash_too(tmp_path, monkeypatch):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    checked = []
    real = service.check_password
    monkeypatch.setattr(service, "check_password", lambda password, stored: checked.append(stored) or real(password,
                                                                                                            stored))
    with app.state.sessions() as db:
        assert service.authenticate(db, "nobody", "some-password") is None
        assert service.authenticate(db, "ann", "wrong-password") is None
    assert len(checked) == 2 and all(stored.startswith("scrypt$") for stored in checked)


def test_logout_password_change_disable_and_reset_end_sessions(db_url):
    app = create_app(db_url)
    setup_project(app)
    ann = login(TestClient(app), "ann")
    saved = TestClient(app, cookies=dict(ann.cookies))
    saved.headers["X-CSRF-Token"] = ann.headers["X-CSRF-Token"]
    assert saved.get("/api/next").status_code == 200
    assert ann.post("/api/logout").status_code == 200
    assert saved.get("/api/next").status_code == 401  # the cookie saved before logging out is dead
    # a dead session answers 401 whatever its CSRF token and body: never 403 or 422
    assert saved.post("/api/labels", content=b"{not json").status_code == 401
    assert saved.post("/api/labels", content=b"{not json", headers={"X-CSRF-Token": "forged"}).status_code == 401

    bob, bob_elsewhere = login(TestClient(app), "bob"), login(TestClient(app), "bob")
    assert bob.post("/api/password", json={"old": "wrong-one", "new": "a-new-password"}).status_code == 403
    assert bob.post("/api/password", json={"old": "bob-password", "new": "short"}).status_code == 400
    changed = bob.post("/api/password", json={"old": "bob-password", "new": "a-new-password"})
    assert changed.status_code == 200
    bob.headers["X-CSRF-Token"] = changed.json()["csrf"]
    assert bob_elsewhere.get("/api/next").status_code == 401 and bob.get("/api/next").status_code == 200
    login(TestClient(app), "bob", "a-new-password")

    admin, cat = login(TestClient(app), "admin", "admin-pass"), login(TestClient(app), "cat")
    assert cat.post("/api/admin/users/dan/disable", json={}).status_code == 403  # labelers cannot
    assert admin.post("/api/admin/users/admin/disable", json={}).status_code == 409  # nor the admin themself
    assert admin.post("/api/admin/users/cat/disable", json={"disabled": True}).json()["disabled"] is True
    assert cat.get("/api/next").status_code == 401
    assert TestClient(app).post("/api/login", json={"username": "cat", "password": "cat-password"}).status_code == 401
    admin.post("/api/admin/users/cat/disable", json={"disabled": False})
    login(TestClient(app), "cat")

    dan = login(TestClient(app), "dan")
    invite = admin.post("/api/admin/users/dan/reset").json()["invite"]
    assert dan.get("/api/next").status_code == 401
    assert TestClient(app).post("/api/login", json={"username": "dan", "password": "dan-password"}).status_code == 401
    assert TestClient(app).post(f"/api/invite/{invite}", json={"password": "dan-new-password"}).status_code == 200
    login(TestClient(app), "dan", "dan-new-password")


def test_password_policy_holds_for_every_role_and_usernames_are_normalised(db_url):
    app = create_app(db_url)
    with app.state.sessions() as db:
        for role in ("admin", "labeler"):
            with pytest.raises(service.FeedbackError, match="at least 10 characters"):
                service.create_user(db, f"short-{role}", role, password="x")
        service.create_user(db, "admin", "admin", password="admin-pass")
    admin = login(TestClient(app), "admin", "admin-pass")
    created = admin.post("/api/admin/users", json={"username": "  Ann "}).json()
    assert created["username"] == "ann"
    for same in ("ann", "ANN", " ann"):
        assert admin.post("/api/admin/users", json={"username": same}).status_code == 409
    assert TestClient(app).post(f"/api/invite/{created['invite']}", json={"password": "123456789"}).status_code == 400
    TestClient(app).post(f"/api/invite/{created['invite']}", json={"password": "1234567890"})
    login(TestClient(app), " Ann", "1234567890")


@pytest.mark.parametrize("value, message", [("", "is empty"), ("abc", "is too short")])
def test_serve_refuses_an_empty_or_short_admin_password_variable(tmp_path, value, message):
    from rlhfkit.feedback.cli import feedback_app

    result = CliRunner().invoke(feedback_app, ["serve", "--db", str(tmp_path / "app.db")],
                                env={"RLHFKIT_ADMIN_PASSWORD": value})
    assert result.exit_code == 1 and message in result.output and "at least 10 characters" in result.output


def test_requests_that_crashed_the_server_get_a_4xx_with_the_reason(db_url):
    import json

    from conftest import make_completions

    app = create_app(db_url)
    setup_project(app)
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    groups = [[c["id"]] for c in item["completions"]]
    assert ann.post("/api/labels", json={"item_id": 2**63, "groups": groups}).status_code == 422
    assert ann.post("/api/skip", json={"item_id": 2**63}).status_code == 422
    for seconds in ("NaN", "Infinity", "-1"):
        body = f'{{"item_id": {item["item_id"]}, "groups": {json.dumps(groups)}, "seconds": {seconds}}}'
        refused = ann.post("/api/labels", content=body, headers={"content-type": "application/json"})
        assert refused.status_code == 422, seconds
    labeled = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": groups, "seconds": 3.5})
    assert labeled.status_code == 200

    admin = login(TestClient(app), "admin", "admin-pass")
    with app.state.sessions() as db:
        for name in ("ラベル-テスト", 'say "hi"', "a&b + c#1"):
            service.create_project(db, name, "helpfulness", make_completions("q", 2))
        with pytest.raises(service.FeedbackError, match="1 to 128"):
            service.create_project(db, "x" * 129, "helpfulness", make_completions("q", 2))
    for name, ascii_name in (("ラベル-テスト", "___-___-pairs.jsonl"), ('say "hi"', "say__hi_-pairs.jsonl")):
        export = admin.get("/admin/export/pairs", params={"project": name})
        assert export.status_code == 200
        disposition = export.headers["content-disposition"]
        assert f'filename="{ascii_name}"' in disposition and "filename*=UTF-8''" in disposition
    from urllib.parse import unquote

    assert unquote(disposition.split("''")[1]) == 'say "hi"-pairs.jsonl'

    def csrf(page):
        import re

        return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    browser = TestClient(app)
    token = csrf(browser.get("/login"))
    browser.post("/login", data={"username": "admin", "password": "admin-pass", "csrf": token})
    form = {"name": "a&b + c#1 new", "criterion": "helpfulness", "csrf": csrf(browser.get("/admin"))}
    created = browser.post("/admin/projects", data=form, follow_redirects=False,
                           files={"completions": ("c.jsonl", json.dumps({"schema": "x"}).encode())})
    assert created.status_code == 422  # a bad record: the located error, not a 500
    latin1 = browser.post("/admin/projects", data=form, files={"completions": ("c.jsonl", "é".encode("latin-1"))})
    assert latin1.status_code == 422 and "not UTF-8" in latin1.text
    good = "".join(json.dumps({"schema": "rlhfkit.completion/1", **c.model_dump(mode="json")}) + "\n"
                   for c in make_completions("z", 2))
    created = browser.post("/admin/projects", data=form, files={"completions": ("c.jsonl", good.encode())},
                           follow_redirects=False)
    assert created.status_code == 303
    assert browser.get(created.headers["location"]).text.count("a&amp;b + c#1 new") >= 2  # the page of that project


def test_errors_are_pages_for_browsers_and_json_for_the_api(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    admin = login(TestClient(app), "admin", "admin-pass")
    page = admin.get("/admin/export/everything?project=demo", headers={"accept": "text/html"})
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "export rankings or pairs" in page.text and "<h1>Not found</h1>" in page.text
    api = admin.get("/api/next?project=nope", headers={"accept": "text/html"})
    assert api.status_code == 404 and api.json() == {"detail": "no project 'nope'"}


def test_the_admin_page_disables_resets_and_reopens_through_csrf_protected_forms(tmp_path):
    import re

    app = create_app(str(tmp_path / "app.db"))
    setup_project(app, overlap=4)
    bob = login(TestClient(app), "bob")
    item = bob.get("/api/next").json()
    bob.post("/api/skip", json={"item_id": item["item_id"]})
    browser = TestClient(app)
    token = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
    browser.post("/login", data={"username": "admin", "password": "admin-pass", "csrf": token})
    page = browser.get("/admin").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert 'action="/admin/users/bob/disable"' in page and 'action="/admin/users/ann/reset"' in page
    assert browser.post("/admin/users/bob/disable", data={"disabled": "true"}).status_code == 403  # no token
    assert browser.post("/admin/users/bob/disable", data={"disabled": "true", "csrf": token},
                        follow_redirects=False).status_code == 303
    assert bob.get("/api/next").status_code == 401
    browser.post("/admin/users/ann/reset", data={"csrf": token})
    assert "invite link: <code>/invite/" in browser.get("/admin").text
    assert f'action="/admin/items/{item["item_id"]}/reopen"' in browser.get("/admin").text  # k = 4 > 3 others
    assert browser.post(f"/admin/items/{item['item_id']}/reopen", data={"csrf": token},
                        follow_redirects=False).status_code == 303
    with app.state.sessions() as db:
        users = {u.username: u for u in db.scalars(select(service.User))}
        assert users["bob"].disabled and users["ann"].password_hash is None
        assert service.assignment_overview(db, service.get_project(db, "demo"))["skips"] == {}


def test_a_labeler_changes_their_password_on_the_account_page_and_other_sessions_end(tmp_path):
    import re

    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    elsewhere = login(TestClient(app), "ann")
    browser = TestClient(app)
    token = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
    browser.post("/login", data={"username": "ann", "password": "ann-password", "csrf": token})
    token = re.search(r'name="csrf" value="([^"]+)"', browser.get("/account").text).group(1)
    form = {"old": "ann-password", "new": "ann-new-password", "confirm": "ann-new-passw0rd", "csrf": token}
    differ = browser.post("/account/password", data=form, headers={"accept": "text/html"})
    assert differ.status_code == 400 and "differ" in differ.text
    changed = browser.post("/account/password", data={**form, "confirm": "ann-new-password"},
                           headers={"accept": "text/html"})
    assert changed.status_code == 200 and "Password changed." in changed.text  # still logged in here
    assert elsewhere.get("/api/next").status_code == 401
    login(TestClient(app), "ann", "ann-new-password")
