"""The labelers' hot calls (/api/next, /api/labels: one Core statement for the session, a thread pool of
their own) attacked as an attacker and a careless user would, on SQLite and PostgreSQL: they refuse
what the ORM session lookup of the other endpoints refuses, with the same code and message; the body
limit holds; a saturated pool neither deadlocks nor answers 500; a disable cut off half-way loses no slot."""

import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from test_app import login, setup_project
from test_attacks import run_together

from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.data.records import Ranking
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Assignment, Item, WebSession


def answers(client: TestClient, item_id: int = 1) -> dict[str, tuple[int, str]]:
    """(status, detail) of the hot calls and of the ORM-path calls of the same client."""
    calls = {"next": client.get("/api/next"), "labels": client.post("/api/labels", json={
                 "item_id": item_id, "groups": [["a"]], "flagged": []}),
             "progress (ORM)": client.get("/api/progress"), "skip (ORM)": client.post("/api/skip",
                                                                                    json={"item_id": item_id})}
    return {name: (r.status_code, r.json().get("detail")) for name, r in calls.items()}


def dead_session_clients(app) -> dict[str, TestClient]:
    """A client per way a session can be dead, each with the CSRF token it had while alive."""
    def saved(client: TestClient, cookies: dict | None = None) -> TestClient:
        copy = TestClient(app, cookies=cookies if cookies is not None else dict(client.cookies))
        copy.headers["X-CSRF-Token"] = client.headers["X-CSRF-Token"]
        return copy

    admin = login(TestClient(app), "admin", "admin-pass")
    ann, bob, cat, dan = (login(TestClient(app), name) for name in ("ann", "bob", "cat", "dan"))
    cookie = ann.cookies["session"]
    dead = {"no cookie": saved(ann, {}), "forged cookie": saved(ann, {"session": "eyJ0b2tlbiI6ICJ4In0=.x.y"}),
            "truncated cookie": saved(ann, {"session": cookie[:-5]}), "logged out": saved(bob)}
    bob.post("/api/logout")
    dead["password changed"] = saved(cat)
    assert login(TestClient(app), "cat").post("/api/password", json={
        "old": "cat-password", "new": "a-new-password"}).status_code == 200
    dead["disabled"] = dan
    assert admin.post("/api/admin/users/dan/disable", json={}).status_code == 200
    expired = login(TestClient(app), "ann")
    with app.state.sessions() as db:  # every session of ann ends now, as 14 days after her login
        ann_id = service.get_user(db, "ann").id
        db.execute(update(WebSession).where(WebSession.user_id == ann_id).values(
            expires_at=service.now() - timedelta(seconds=1)))
        db.commit()
    dead["expired"] = expired
    return dead


def test_every_dead_session_is_refused_by_the_hot_calls_as_by_the_orm_path(db_url):
    app = create_app(db_url)
    setup_project(app)
    for how, client in dead_session_clients(app).items():
        got = answers(client)
        assert set(got.values()) == {(401, "log in first")}, (how, got)


def test_live_sessions_get_the_same_refusals_from_the_hot_calls_as_from_the_orm_path(db_url):
    app = create_app(db_url)
    setup_project(app)
    ann = login(TestClient(app), "ann")
    no_csrf = TestClient(app, cookies=dict(ann.cookies))
    got = answers(no_csrf)
    assert got["labels"] == got["skip (ORM)"] == (403, "missing or wrong CSRF token"), got
    wrong_csrf = TestClient(app, cookies=dict(ann.cookies), headers={"X-CSRF-Token": "forged"})
    assert answers(wrong_csrf)["labels"] == (403, "missing or wrong CSRF token")
    for name in ("nope", "", "x" * 300, "ラベル-テスト"):
        assert ann.get("/api/next", params={"project": name}).json() == \
            ann.get("/api/progress", params={"project": name}).json(), name
    assert ann.get("/api/next", params={"project": "nope"}).status_code == 404
    # an item of no assignment of hers, or of no project at all: refused, never a 500
    assert ann.post("/api/labels", json={"item_id": 10**9, "groups": [["a"]], "flagged": []}).status_code == 404
    assert ann.post("/api/labels", json={"item_id": 2**63, "groups": [["a"]], "flagged": []}).status_code == 422
    # the admin may label too, on both paths, as before the Core lookup
    admin = login(TestClient(app), "admin", "admin-pass")
    assert admin.get("/api/next").status_code == admin.get("/api/progress").status_code == 200


def test_a_streamed_body_over_the_limit_is_refused_on_the_hot_path_before_it_is_parsed(tmp_path, monkeypatch):
    app = create_app(str(tmp_path / "f.db"))
    setup_project(app)
    ann = login(TestClient(app), "ann")
    parsed = []
    monkeypatch.setattr(service, "submit_label", lambda *a, **k: parsed.append(a))

    def chunks():  # no Content-Length: the limit must hold on the bytes as they come
        for _ in range(3):
            yield b" " * (600 * 1024)

    refused = ann.post("/api/labels", content=chunks(), headers={"content-type": "application/json"})
    assert refused.status_code == 413 and "limit" in refused.json()["detail"]
    assert parsed == []


def test_more_concurrent_labelers_than_threads_and_connections_get_no_server_error(db_url):
    """40 labeler tabs at once on 2 × 8 threads (PostgreSQL: a pool of 15 connections): every answer is
    one a client expects, and every item's free_slots what its rows say."""
    app = create_app(db_url, threads=8)
    setup_project(app, overlap=3)
    with app.state.sessions() as db:
        for i in range(10):
            service.create_user(db, f"tab{i}", password="tab-password-1")
    codes, lock = [], threading.Lock()

    def tab(name):
        with TestClient(app, raise_server_exceptions=False) as client:
            logged_in = client.post("/api/login", json={"username": name, "password": "tab-password-1"})
            with lock:
                codes.append(logged_in.status_code)
            if logged_in.status_code != 200:
                return
            client.headers["X-CSRF-Token"] = logged_in.json()["csrf"]
            for _ in range(4):
                item = client.get("/api/next")
                got = [item.status_code]
                if item.status_code == 200:
                    order = [[c["id"]] for c in item.json()["completions"]]
                    got.append(client.post("/api/labels", json={"item_id": item.json()["item_id"],
                                                                "groups": order, "flagged": []}).status_code)
                with lock:
                    codes.extend(got)

    run_together([threading.Thread(target=tab, args=(f"tab{i % 10}",)) for i in range(40)])
    assert set(codes) <= {200, 204, 409, 429}, sorted(set(codes))  # 429: tabs of one account log in at once
    with app.state.sessions() as db:
        assert service.free_slot_mismatches(db) == {}


def ann_disabled_half_way(db_url, monkeypatch) -> tuple:
    """(app, ann's client, the item she holds) after a disable of ann that died between its two
    transactions: her flag and session ended are committed, her open assignment is not."""
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann = login(TestClient(app), "ann")
    held = ann.get("/api/next").json()["item_id"]
    with app.state.sessions() as db:
        admin = service.get_user(db, "admin")

    def killed(*_args):
        raise SystemExit("killed")

    monkeypatch.setattr(service, "_end_assignments", killed)
    with app.state.sessions() as db, pytest.raises(SystemExit):
        service.set_disabled(db, "ann", True, admin)
    monkeypatch.undo()
    return app, ann, held


def test_a_disable_cut_off_between_its_two_transactions_locks_the_labeler_out_and_loses_no_slot(db_url,
                                                                                                monkeypatch):
    """The server dies after the flag's commit, before the open items go back: the labeler gets 401, the
    item keeps her slot until the assignment times out (then the next /api/next frees it), and a second
    disable frees it at once."""
    app, ann, held = ann_disabled_half_way(db_url, monkeypatch)
    bob = login(TestClient(app), "bob")
    assert ann.get("/api/next").status_code == 401
    with app.state.sessions() as db:
        assert db.scalar(select(Item.free_slots).where(Item.id == held)) == 0
        assert service.free_slot_mismatches(db) == {}
        db.execute(update(Assignment).where(Assignment.item_id == held).values(
            created_at=service.now() - service.ASSIGNMENT_TIMEOUT))
        db.commit()
    offered = {bob.get("/api/next").json()["item_id"]}
    with app.state.sessions() as db:
        assert db.scalar(select(Item.free_slots).where(Item.id == held)) == (0 if held in offered else 1)
        assert service.free_slot_mismatches(db) == {}


def test_disabling_again_frees_what_a_cut_off_disable_left_held(db_url, monkeypatch):
    app, _ann, held = ann_disabled_half_way(db_url, monkeypatch)
    admin_client = login(TestClient(app), "admin", "admin-pass")
    assert admin_client.post("/api/admin/users/ann/disable", json={}).status_code == 200
    with app.state.sessions() as db:
        assert db.scalar(select(Item.free_slots).where(Item.id == held)) == 1
        assert service.free_slot_mismatches(db) == {}


def test_reopen_of_a_gold_an_unknown_or_a_completed_item_changes_no_counter(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1, gold=[Ranking(prompt_id="p0", labeler_id="gold",
                                                groups=[["p0-0"], ["p0-1"], ["p0-2"]])])
    admin = login(TestClient(app), "admin", "admin-pass")
    ann = login(TestClient(app), "ann")
    gold = ann.get("/api/next").json()  # gold_rate 1: the gold item first
    ann.post("/api/skip", json={"item_id": gold["item_id"]})
    done = ann.get("/api/next").json()
    order = [[c["id"]] for c in done["completions"]]
    assert ann.post("/api/labels", json={"item_id": done["item_id"], "groups": order, "flagged": []}).status_code == 200
    for item_id in (gold["item_id"], done["item_id"]):
        assert admin.post(f"/api/admin/items/{item_id}/reopen").status_code == 200
    for item_id, code in ((10**9, 404), (2**63, 422), (-1, 422)):
        refused = admin.post(f"/api/admin/items/{item_id}/reopen")
        assert refused.status_code == code, (item_id, refused.text)
    with app.state.sessions() as db:
        assert service.free_slot_mismatches(db) == {}
        assert db.scalar(select(Item.free_slots).where(Item.id == done["item_id"])) == 0


def test_many_tabs_of_several_labelers_logging_in_at_once_get_no_server_error(db_url):
    """Four tabs per labeler log in together from one address (a shared office NAT): each answer is a
    session or a throttling refusal (attempts are counted before the password is checked), never a
    500. PostgreSQL once found a deadlock: a success's clean-up locked the account's row, then the
    address's, while a parallel attempt held them in the opposite order."""
    app = create_app(db_url)
    setup_project(app)
    with app.state.sessions() as db:
        for i in range(5):
            service.create_user(db, f"tab{i}", password="tab-password-1")
    codes, lock = [], threading.Lock()

    def tab(name):
        client = TestClient(app, raise_server_exceptions=False)
        answer = client.post("/api/login", json={"username": name, "password": "tab-password-1"})
        with lock:
            codes.append(answer.status_code)

    run_together([threading.Thread(target=tab, args=(f"tab{i % 5}",)) for i in range(20)])
    assert len(codes) == 20 and set(codes) <= {200, 429}, sorted(codes)


def test_a_login_attempt_holds_no_new_row_while_it_waits_for_the_address_row(postgres):
    """The deadlock behind a CI 500 (40 tabs, PostgreSQL), played in order: attempt A of an account whose
    failure row does not exist yet reaches the throttle while attempt B holds the address row; B then
    counts its failure on both rows. A must not have created the account's row before it waits for the
    address's (B would wait on A, A on B: "deadlock detected", one of them a 500)."""
    import time

    from sqlalchemy import text

    from feedback_postgres import fresh_database
    from rlhfkit.feedback.db import LoginFailures

    app = create_app(fresh_database(postgres))  # PostgreSQL only: SQLite runs one writing transaction at a time
    address, account = "ip:office", "user:tab0"
    with app.state.sessions() as db:
        service.record_login_failure(db, [address])
    errors = []

    def attempt_a():
        with app.state.sessions() as db:
            try:
                service.reserve_login_attempt(db, [address, account])
            except Exception as exc:
                errors.append(exc)

    with app.state.sessions() as b, app.state.sessions() as watcher:
        b.scalars(select(LoginFailures).where(LoginFailures.key == address).with_for_update()).all()
        a = threading.Thread(target=attempt_a)
        a.start()
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        deadline = time.time() + 10
        while watcher.scalar(waiting) < 1 and time.time() < deadline:
            watcher.rollback()
            time.sleep(0.02)
        service.record_login_failure(b, [address, account])  # commits: A goes on
        a.join(10)
    assert errors == [] and not a.is_alive()


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_a_disable_racing_the_labelers_tabs_over_http_leaves_them_nothing_open(db_url, delay):
    """cat's three tabs loop next/submit/undo through the hot path while the admin disables her: every
    answer is one a client expects, and once the disable is done she holds no open assignment and every
    item's free_slots is what its rows say."""
    import time

    app = create_app(db_url)
    setup_project(app, overlap=2)
    admin = login(TestClient(app), "admin", "admin-pass")
    tabs = [login(TestClient(app, raise_server_exceptions=False), "cat") for _ in range(3)]
    codes, lock = [], threading.Lock()

    def tab(client):
        for turn in range(8):
            got = [client.get("/api/next")]
            if got[0].status_code == 200 and turn % 3 != 2:
                order = [[c["id"]] for c in got[0].json()["completions"]]
                got.append(client.post("/api/labels", json={"item_id": got[0].json()["item_id"], "groups": order,
                                                             "flagged": []}))
            elif got[0].status_code == 200:
                got.append(client.post("/api/undo", json={"project": "demo"}))
            with lock:
                codes.extend((r.status_code, r.request.url.path, r.text) for r in got)

    def disable():
        time.sleep(delay)
        assert admin.post("/api/admin/users/cat/disable", json={}).status_code == 200

    run_together([threading.Thread(target=tab, args=(client,)) for client in tabs] + [threading.Thread(target=disable)])
    # 403: an undo in another tab gave back the item this tab was labeling (its assignment is deleted)
    expected = {200, 204, 401, 404, 409, (403, '{"detail":"this item is not assigned to you"}')}
    assert {code if code != 403 else (code, text) for code, _path, text in codes} <= expected, codes
    with app.state.sessions() as db:
        cat = service.get_user(db, "cat")
        assert db.scalars(select(Assignment.item_id).where(Assignment.user_id == cat.id,
                                                           Assignment.status == "open")).all() == []
        assert service.free_slot_mismatches(db) == {}


def test_requests_failing_mid_transaction_with_every_thread_taken_neither_stall_nor_answer_500(db_url):
    """One thread per pool (threads=1), twelve clients in one event loop, half of their calls ending in a
    404 raised with the transaction still open: on SQLite its write lock stays held until the rollback,
    which once queued for a thread behind requests waiting for that lock (30 s stalls, then 500s)."""
    import asyncio

    import anyio.to_thread
    import httpx

    app = create_app(db_url, threads=1)
    setup_project(app)

    async def labeler(transport, name):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            logged_in = await client.post("/api/login", json={"username": name, "password": f"{name}-password"})
            client.headers["X-CSRF-Token"] = logged_in.json()["csrf"]
            calls = [("/api/progress", {"project": "nope"}), ("/api/progress", {}), ("/api/next", {})] * 5
            return [(await client.get(path, params=params)).status_code for path, params in calls]

    async def all_labelers():
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1  # what the app's lifespan sets
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        calls = [labeler(transport, name) for name in ("ann", "bob", "cat", "dan") * 3]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=20)

    codes = {code for codes in asyncio.run(all_labelers()) for code in codes}
    assert codes <= {200, 404}, codes
