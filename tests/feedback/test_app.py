"""The labeling app's API on SQLite and on a real PostgreSQL server."""

import json
import threading

from fastapi.testclient import TestClient

from conftest import make_completions
from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.data.records import Ranking
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app

PROMPTS = [f"p{i}" for i in range(6)]


def setup_project(app, overlap=2, gold=()):
    with app.state.sessions() as db:
        service.create_user(db, "admin", "admin", password="admin-pass")
        for name in ("ann", "bob", "cat", "dan"):
            service.create_user(db, name, password=f"{name}-password")
        completions = [c for p in PROMPTS for c in make_completions(p, 3)]
        service.create_project(db, "demo", "helpfulness", completions, "Be **kind**.", overlap=overlap, gold=gold,
                               gold_rate=1.0 if gold else 0.0)  # every labeler meets the gold item first


def login(client, name, password=None):
    r = client.post("/api/login", json={"username": name, "password": password or f"{name}-password"})
    assert r.status_code == 200, r.text
    client.headers["X-CSRF-Token"] = r.json()["csrf"]
    return client


def test_every_endpoint_needs_a_session_and_csrf(db_url):
    app = create_app(db_url)
    setup_project(app)
    anonymous = TestClient(app)
    for method, url in [("get", "/api/next"), ("post", "/api/labels"), ("get", "/api/admin/stats"),
                        ("get", "/admin/export/pairs?project=demo")]:
        assert getattr(anonymous, method)(url).status_code == 401
    assert anonymous.get("/", headers={"accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    no_token = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": [[c["id"]] for c in
                                                                                     item["completions"]]},
                        headers={"X-CSRF-Token": "forged"})
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["detail"]
    assert ann.get("/api/admin/stats").status_code == 403  # a labeler is not an admin
    assert ann.get("/admin/export/pairs?project=demo").status_code == 403
    assert TestClient(app).post("/api/login", json={"username": "ann", "password": "nope"}).status_code == 401


def test_labels_are_validated_idempotent_and_private(db_url):
    app = create_app(db_url)
    setup_project(app)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    item = ann.get("/api/next").json()
    ids = [c["id"] for c in item["completions"]]
    assert "is_gold" not in item and item["criterion"] == "helpfulness"
    bad = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": [ids[:2]]})
    assert bad.status_code == 422 and "missing" in bad.json()["detail"]
    assert ann.post("/api/labels", json={"item_id": 10_000, "groups": [ids]}).status_code == 404
    good = {"item_id": item["item_id"], "groups": [[ids[2]], [ids[0], ids[1]]], "flagged": [ids[1]]}
    first, again = ann.post("/api/labels", json=good), ann.post("/api/labels", json=good)
    assert first.status_code == again.status_code == 200
    assert again.json() == {"label_id": first.json()["label_id"], "duplicate": True}  # double click: one label
    changed = ann.post("/api/labels", json={**good, "groups": [[i] for i in ids]})
    assert changed.status_code == 409
    # bob was never given this item, so he cannot label it
    assert bob.post("/api/labels", json=good).status_code == 403
    with app.state.sessions() as db:
        assert len(service.rankings(db, service.get_project(db, "demo"))) == 1


def test_every_item_reaches_k_distinct_labelers_and_nobody_twice(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=2)
    clients = {name: login(TestClient(app), name) for name in ("ann", "bob", "cat")}
    seen = {name: [] for name in clients}
    for _ in range(10):
        for name, client in clients.items():
            r = client.get("/api/next")
            if r.status_code == 204:
                continue
            item = r.json()
            assert item["item_id"] not in seen[name]
            seen[name].append(item["item_id"])
            order = [[c["id"]] for c in item["completions"]]
            assert client.post("/api/labels", json={"item_id": item["item_id"], "groups": order}).status_code == 200
    with app.state.sessions() as db:
        project = service.get_project(db, "demo")
        assert service.progress(db, project) == {"items": 6, "complete": 6, "labels": 12, "wanted": 12}
    assert all(c.get("/api/next").status_code == 204 for c in clients.values())


def test_skip_frees_the_slot_for_someone_else(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    item = ann.get("/api/next").json()
    assert ann.post("/api/skip", json={"item_id": item["item_id"]}).status_code == 200
    assert ann.get("/api/next").json()["item_id"] != item["item_id"]  # never the same item twice
    bob_items = set()
    while (r := bob.get("/api/next")).status_code == 200:
        bob_items.add(r.json()["item_id"])
        bob.post("/api/labels", json={"item_id": r.json()["item_id"],
                                      "groups": [[c["id"]] for c in r.json()["completions"]]})
    assert item["item_id"] in bob_items


def test_concurrent_labelers_never_overfill_an_item(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    with app.state.sessions() as db:
        for i in range(12):
            service.create_user(db, f"u{i}", password="password-1")
    got, errors = [], []

    def work(name):
        try:
            client = login(TestClient(app), name, "password-1")
            r = client.get("/api/next")
            if r.status_code == 200:
                got.append(r.json()["item_id"])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"u{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == len(set(got)) == 6  # 6 items, k = 1: six labelers get one each, the rest nothing


def test_admin_sees_agreement_gold_accuracy_and_exports_without_poor_labelers(db_url):
    gold = [Ranking(prompt_id="p5", labeler_id="gold", groups=[["p5-2"], ["p5-1"], ["p5-0"]])]
    app = create_app(db_url)
    setup_project(app, overlap=4, gold=gold)
    best_first = {"ann": True, "bob": True, "dan": True, "cat": False}  # cat reverses everything
    for name, good in best_first.items():
        client = login(TestClient(app), name)
        while (r := client.get("/api/next")).status_code == 200:
            ids = sorted((c["id"] for c in r.json()["completions"]), reverse=good)
            client.post("/api/labels", json={"item_id": r.json()["item_id"], "groups": [[i] for i in ids]})
    admin = login(TestClient(app), "admin", "admin-pass")
    stats = admin.get("/api/admin/stats?project=demo").json()
    per = {s["labeler_id"]: s for s in stats["agreement"]["per_labeler"]}
    assert stats["progress"]["items"] == 5 and stats["agreement"]["items"] == 5
    assert per["ann"]["tau"] > 0.9 and per["cat"]["poor"] and not per["ann"]["poor"]
    assert per["ann"]["gold_accuracy"] == 1.0 and per["cat"]["gold_accuracy"] == 0.0
    pairs = admin.get("/admin/export/pairs?project=demo").text.strip().splitlines()
    assert len(pairs) == 5 * 3  # 5 regular prompts × 3 pairs, consensus of ann, bob and dan only
    assert all('"cat"' not in line for line in pairs)
    rankings = admin.get("/admin/export/rankings?project=demo&keep_poor=true").text.strip().splitlines()
    assert len(rankings) == 5 * 4
    page = admin.get("/admin?project=demo", headers={"accept": "text/html"})
    assert page.status_code == 200 and "Krippendorff" in page.text and "data:image/png;base64" in page.text


def test_an_answer_cut_at_the_generation_limit_keeps_its_flag_from_project_to_exported_pairs(db_url):
    app = create_app(db_url)
    with app.state.sessions() as db:
        service.create_user(db, "admin", "admin", password="admin-pass")
        service.create_user(db, "ann", password="ann-password")
        cut = make_completions("p0", 2)
        cut[1] = cut[1].model_copy(update={"truncated": True})
        service.create_project(db, "demo", "helpfulness", cut, "", overlap=1)
        assert [c.truncated for c in service.project_completions(db, service.get_project(db, "demo"))] == [False, True]
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    ann.post("/api/labels", json={"item_id": item["item_id"], "groups": [["p0-1"], ["p0-0"]]})
    [line] = login(TestClient(app), "admin", "admin-pass").get("/admin/export/pairs?project=demo").text.splitlines()
    pair = json.loads(line)
    assert (pair["chosen_id"], pair["chosen_truncated"], pair["rejected_truncated"]) == ("p0-1", True, False)


def test_invites_and_user_creation_through_the_api(db_url):
    app = create_app(db_url)
    setup_project(app)
    admin = login(TestClient(app), "admin", "admin-pass")
    invite = admin.post("/api/admin/users", json={"username": "eve"}).json()["invite"]
    assert admin.post("/api/admin/users", json={"username": "eve"}).status_code == 409
    assert TestClient(app).post(f"/api/invite/{invite}", json={"password": "short"}).status_code == 400
    assert TestClient(app).post(f"/api/invite/{invite}", json={"password": "long-enough"}).status_code == 200
    assert TestClient(app).post(f"/api/invite/{invite}", json={"password": "long-enough"}).status_code == 404
    login(TestClient(app), "eve", "long-enough")


def test_admin_creates_a_project_by_upload_through_the_csrf_protected_forms(tmp_path):
    import re

    from rlhfkit.data.io import write_records

    app = create_app(str(tmp_path / "app.db"))
    with app.state.sessions() as db:
        service.create_user(db, "admin", "admin", password="admin-pass")
    browser = TestClient(app)

    def csrf(page):
        return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    login_page = browser.get("/login")
    assert browser.post("/login", data={"username": "admin", "password": "admin-pass"},
                        follow_redirects=False).status_code == 403  # no CSRF token
    done = browser.post("/login", data={"username": "admin", "password": "admin-pass", "csrf": csrf(login_page)},
                        follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/admin"
    token = csrf(browser.get("/admin"))
    uploaded = make_completions("p0", 3) + make_completions("p1", 3)
    uploaded[1] = uploaded[1].model_copy(update={"truncated": True})  # cut at the generation limit
    write_records(tmp_path / "c.jsonl", uploaded)
    form = {"name": "uploaded", "criterion": "harmlessness", "overlap": "2", "csrf": token}
    with open(tmp_path / "c.jsonl", "rb") as f:
        created = browser.post("/admin/projects", data=form, files={"completions": ("c.jsonl", f)},
                               follow_redirects=False)
    assert created.status_code == 303
    bad = b'{"schema": "rlhfkit.completion/1", "id": "x"}\n'
    refused = browser.post("/admin/projects", data={**form, "name": "bad"}, files={"completions": ("bad.jsonl", bad)})
    assert refused.status_code == 422
    assert "bad.jsonl" in refused.json()["detail"] and "line 1" in refused.json()["detail"]
    with app.state.sessions() as db:
        assert service.progress(db, service.get_project(db, "uploaded"))["items"] == 2
        stored = service.project_completions(db, service.get_project(db, "uploaded"))
        assert {c.id for c in stored if c.truncated} == {"p0-1"}


def test_threads_caps_the_requests_that_run_database_work_at_once(tmp_path):
    import anyio.to_thread

    with TestClient(create_app(str(tmp_path / "t.db"), threads=3)) as client:  # the app's start-up sets it
        assert client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens) == 3
        assert client.get("/healthz").status_code == 200
