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


def test_an_anonymous_upload_is_refused_before_its_form_is_parsed(tmp_path, monkeypatch):
    from starlette.requests import Request

    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    parsed = []
    real_form = Request._get_form
    monkeypatch.setattr(Request, "_get_form", lambda self, **kw: parsed.append(self.url.path) or real_form(self, **kw))
    upload = {"completions": ("c.jsonl", b"x" * 2_000_000)}  # up to 256 MiB once were parsed for anyone
    assert TestClient(app).post("/admin/projects", data={"csrf": "x"}, files=upload).status_code == 401
    assert login(TestClient(app), "ann").post("/admin/projects", files=upload).status_code == 403
    assert parsed == []
    admin = TestClient(app)
    admin.post("/login", data={"username": "admin", "password": "admin-pass", "csrf": page_csrf(admin.get("/login"))})
    form = {"csrf": page_csrf(admin.get("/admin")), "name": "new", "criterion": "helpfulness", "overlap": "2"}
    created = admin.post("/admin/projects", data=form, files={"completions": ("c.jsonl", completions_file())},
                         follow_redirects=False)
    assert created.status_code == 303 and parsed[-1] == "/admin/projects"
    missing_csrf = admin.post("/admin/projects", data=form | {"csrf": "wrong", "name": "other"},
                              files={"completions": ("c.jsonl", completions_file())})
    assert missing_csrf.status_code == 403


def test_parallel_wrong_passwords_get_no_more_tries_than_the_back_off_allows(db_url, monkeypatch):
    import threading
    import time

    app = create_app(db_url)
    setup_project(app)
    real_check = service.check_password
    # a slow hash keeps all 20 attempts in flight at once, as a client with 20 connections would
    monkeypatch.setattr(service, "check_password", lambda password, stored: time.sleep(0.3) or real_check(password,
                                                                                                            stored))
    answers = []

    def attempt(client):
        with app.state.sessions() as db:
            try:
                service.log_in(db, "ann", "wrong-password", client)
            except service.FeedbackError as exc:
                answers.append(exc.status)

    threads = [threading.Thread(target=attempt, args=(f"10.0.0.{i}",)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    start, _ = service.LOGIN_THROTTLE["user"]
    assert sorted(answers) == [401] * start + [429] * (20 - start)  # 20 password checks before the fix
    with app.state.sessions() as db:
        db.execute(service.update(service.LoginFailures).values(last_failure=service.now() - service.LOGIN_FORGET))
        db.commit()
        service.log_in(db, "ann", "ann-password", "10.0.0.1")  # a success forgets the account's failures
        assert db.get(service.LoginFailures, "user:ann") is None
        assert db.get(service.LoginFailures, "ip:10.0.0.1").failures == 0  # its own attempt taken back


def run_together(threads) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_slots_kept(app, overlap: int) -> None:
    """No item over k holders, one label per done assignment, every free_slots what the rows say."""
    with app.state.sessions() as db:
        for item in db.scalars(service.select(service.Item)):
            holders = db.scalars(service.select(service.Assignment).where(
                service.Assignment.item_id == item.id, service.Assignment.status.in_(("open", "done")))).all()
            labels = db.scalars(service.select(service.Label).where(service.Label.item_id == item.id)).all()
            assert len(holders) <= overlap and len(labels) == sum(a.status == "done" for a in holders)
        assert service.free_slot_mismatches(db) == {}


def test_labelers_racing_next_submit_undo_skip_and_expiry_in_many_tabs_get_no_server_error(db_url):
    """ann in four tabs, bob and cat in two: no deadlock or integrity error, no item over k labels, every
    item's free_slots what its rows say."""
    import random
    import threading

    from sqlalchemy import update

    app = create_app(db_url)
    setup_project(app, overlap=2)
    failures = []

    def tab(name, seed):
        rng = random.Random(seed)
        with app.state.sessions() as db:
            user, project = service.get_user(db, name), service.get_project(db, "demo")
            for _ in range(20):
                try:
                    action = rng.choice(["submit", "submit", "submit", "undo", "skip", "expire"])
                    if action == "expire":  # the labeler's open item times out now
                        db.execute(update(service.Assignment).where(service.Assignment.user_id == user.id,
                                                                    service.Assignment.status == "open")
                                   .values(created_at=service.now() - service.ASSIGNMENT_TIMEOUT))
                        db.commit()
                        continue
                    item = service.next_item(db, user, project, rng)
                    if item is None or action == "undo":
                        service.undo_last_label(db, user, project)
                    elif action == "submit":
                        ids = [c.completion_id for c in item.completions]
                        service.submit_label(db, user, item.id, [[i] for i in ids], [])
                    else:
                        service.skip(db, user, item.id)
                except service.FeedbackError:
                    db.rollback()
                except Exception as exc:  # a deadlock or an integrity error would be a 500
                    db.rollback()
                    failures.append(repr(exc)[:1000])

    tabs = ["ann"] * 4 + ["bob"] * 2 + ["cat"] * 2
    threads = [threading.Thread(target=tab, args=(name, seed)) for seed, name in enumerate(tabs)]
    run_together(threads)
    assert failures == []
    assert_slots_kept(app, overlap=2)


def test_progress_moves_by_one_for_gold_and_regular_items_alike(db_url):
    from rlhfkit.data.records import Ranking

    gold = [Ranking(prompt_id=f"p{i}", labeler_id="gold", groups=[[f"p{i}-0"], [f"p{i}-1"], [f"p{i}-2"]])
            for i in range(3, 5)]
    app = create_app(db_url)
    setup_project(app, overlap=2, gold=gold)
    ann = login(TestClient(app), "ann")
    steps = []
    while (response := ann.get("/api/next")).status_code == 200:
        item = response.json()
        ann.post("/api/labels", json={"item_id": item["item_id"], "groups": [[c["id"]] for c in item["completions"]]})
        steps.append((item["progress"]["left"], ann.get("/api/progress").json()["left"]))
    assert len(steps) == 6  # 2 gold items, 4 regular ones: left fell by 1 after every label, which told gold apart
    assert all(after == before - 1 for before, after in steps), steps
    assert steps[-1][1] == 0


def test_login_and_account_pages_show_no_message_taken_from_the_url(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    spoof = "Your password expired: set a new one at evil.example"
    browser = TestClient(app)
    assert "evil.example" not in browser.get("/login", params={"error": spoof}).text
    failed = browser.post("/login", data={"username": "ann", "password": "wrong-password",
                                          "csrf": page_csrf(browser.get("/login"))})
    assert failed.status_code == 401 and "wrong username or password" in failed.text
    token = page_csrf(browser.get("/login"))
    browser.post("/login", data={"username": "ann", "password": "ann-password", "csrf": token})
    assert "evil.example" not in browser.get("/account", params={"message": spoof}).text


def test_after_migration_an_action_on_an_old_unnormalised_name_reaches_that_account_only(db_url):
    from sqlalchemy import text

    from rlhfkit.feedback import db as feedback_db

    engine = feedback_db.make_engine(db_url)
    feedback_db.migrate(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO users (id, username, role, password_hash, created_at) VALUES "
                                "(1, 'bob', 'labeler', :bob, CURRENT_TIMESTAMP), "
                                "(2, 'BOB', 'labeler', :big, CURRENT_TIMESTAMP), "
                                "(3, 'root', 'admin', :root, CURRENT_TIMESTAMP)"),
                           {"bob": service.hash_password("bob-password"), "big": service.hash_password("BOB-password"),
                            "root": service.hash_password("root-password")})
    engine.dispose()
    app = create_app(db_url)  # migrates to head; "BOB" keeps its name (it would collide with "bob")
    assert login(TestClient(app), "BOB", "BOB-password")  # was refused: "BOB" was looked up as "bob"
    admin = login(TestClient(app), "root", "root-password")
    assert admin.post("/api/admin/users/BOB/disable", json={}).json() == {"username": "BOB", "disabled": True}
    with app.state.sessions() as db:  # the admin page's "disable" next to BOB used to disable bob
        assert not service.get_user(db, "bob").disabled and service.get_user(db, "BOB").disabled
    assert login(TestClient(app), "bob")


def test_a_double_click_on_create_gives_one_account_or_project_and_a_409(db_url):
    import threading

    app = create_app(db_url)
    setup_project(app)
    statuses = []

    def create(kind, barrier):
        with app.state.sessions() as db:
            barrier.wait()
            try:
                if kind == "user":
                    service.create_user(db, "eve")
                else:
                    service.create_project(db, "twice", "helpfulness", make_completions("q", 2))
                statuses.append(200)
            except service.FeedbackError as exc:
                statuses.append(exc.status)

    for kind in ("user", "project"):
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=create, args=(kind, barrier)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200, 200] + [409] * 6  # PostgreSQL: an IntegrityError (500) lost the race


def test_disabling_a_labeler_frees_their_open_item_at_once(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    held = ann.get("/api/next").json()["item_id"]
    admin = login(TestClient(app), "admin", "admin-pass")
    assert admin.post("/api/admin/users/ann/disable", json={}).status_code == 200
    got = []
    while (r := bob.get("/api/next")).status_code == 200:
        got.append(r.json()["item_id"])
        bob.post("/api/labels", json={"item_id": got[-1], "groups": [[c["id"]] for c in r.json()["completions"]]})
    assert held in got  # was held by the disabled account for an hour


def test_the_admin_page_draws_labelers_whose_names_hold_dollar_signs(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    names = ["cost $5 or $6", "x$\\sqrt{$"]  # matplotlib read "$...$" as math: a 500 on the admin page
    with app.state.sessions() as db:
        for name in names:
            service.create_user(db, name, password="long-enough-password")
    for name in [*names, "ann"]:
        labeler = login(TestClient(app), name, "long-enough-password" if "$" in name else None)
        for _ in range(3):
            item = labeler.get("/api/next").json()
            labeler.post("/api/labels", json={"item_id": item["item_id"],
                                              "groups": [[c["id"]] for c in item["completions"]]})
    page = login(TestClient(app), "admin", "admin-pass").get("/admin")
    assert page.status_code == 200 and "x$\\sqrt{$" in page.text and "labeler agreement" in page.text


def test_any_upload_file_name_is_accepted_and_only_shown_in_errors(tmp_path):
    app = create_app(str(tmp_path / "app.db"))
    setup_project(app)
    admin = TestClient(app, raise_server_exceptions=False)
    admin.post("/login", data={"username": "admin", "password": "admin-pass", "csrf": page_csrf(admin.get("/login"))})
    form = {"csrf": page_csrf(admin.get("/admin")), "criterion": "helpfulness"}
    # the name was a path in a temporary folder: ".", ".." and "/" named a folder, NUL and 300 bytes an OSError
    for i, name in enumerate((".", "..", "/", "a\x00b", "x" * 300, "../../escape.jsonl")):
        created = admin.post("/admin/projects", data=form | {"name": f"p{i}"}, follow_redirects=False,
                             files={"completions": (name, completions_file())})
        assert created.status_code == 303, (name, created.status_code)
        refused = admin.post("/admin/projects", data=form | {"name": f"q{i}"},
                             files={"completions": (name, b'{"schema": "x"}\n')})
        assert refused.status_code == 422, (name, refused.status_code)
    assert not (tmp_path.parent / "escape.jsonl").exists()


@pytest.mark.slow
def test_a_held_enter_key_submits_one_item_not_every_next_one(tmp_path):
    from sqlalchemy import func, select
    from test_browser import chromium_browser, expect, log_in, running_app

    from rlhfkit.feedback.db import Label

    completions = [c for p in range(3) for c in make_completions(f"p{p}", 3)]
    with running_app(tmp_path, "Rank them.", completions) as (url, sessions), chromium_browser() as browser:
        page = browser.new_page()
        log_in(page, url, "ann", "ann-password")
        page.wait_for_selector("li.completion")
        first = page.get_attribute("li.completion", "data-id")
        page.keyboard.down("Enter")  # pressed and held: the browser repeats it while the next item loads
        expect(page.locator("li.completion").first).not_to_have_attribute(
            "data-id", re.compile(f"^{first.split('-')[0]}-"))  # the next item is shown
        for _ in range(5):
            page.keyboard.down("Enter")  # repeat=true, as a held key sends
            page.wait_for_timeout(150)
        page.keyboard.up("Enter")
        with sessions() as db:
            assert db.scalar(select(func.count()).select_from(Label)) == 1  # was one label per repeat
        page.keyboard.press("Enter")  # a fresh press still submits
        page.wait_for_timeout(500)
        with sessions() as db:
            assert db.scalar(select(func.count()).select_from(Label)) == 2


def test_a_throttled_client_adds_no_rows_however_many_usernames_it_tries(db_url):
    from sqlalchemy import func, select

    app = create_app(db_url)
    setup_project(app)
    with app.state.sessions() as db:
        service.record_login_failure(db, ["ip:10.9.9.9"] * 30)
        before = db.scalar(select(func.count()).select_from(service.LoginFailures))
        for i in range(20):
            with pytest.raises(service.FeedbackError, match="too many"):
                service.log_in(db, f"made-up-{i}", "some-password", "10.9.9.9")
        assert db.scalar(select(func.count()).select_from(service.LoginFailures)) == before


def test_an_admin_disabling_and_reopening_while_labelers_race_keeps_every_counter_right(db_url):
    """ann, bob and cat in two tabs each race next/submit/skip/undo/progress while an admin disables and
    enables cat (her requests already in flight go on) and reopens items: no server error, no item over
    k, one label per done assignment, and every item's free_slots what its rows say."""
    import random
    import threading

    app = create_app(db_url)
    setup_project(app, overlap=2)
    failures = []

    def guarded(action):
        try:
            action()
        except service.FeedbackError:
            pass
        except Exception as exc:  # a deadlock, an integrity error or a CHECK violation would be a 500
            failures.append(repr(exc)[:1000])

    def tab(name, seed):
        rng = random.Random(seed)
        with app.state.sessions() as db:
            user, project = service.get_user(db, name), service.get_project(db, "demo")
            db.commit()

            def step():
                action = rng.choice(["submit", "submit", "skip", "undo", "progress"])
                if action == "progress":
                    return service.labeler_progress(db, user, project)
                if action == "undo":
                    return service.undo_last_label(db, user, project)
                item = service.next_item(db, user, project, rng)
                if item is not None and action == "submit":
                    service.submit_label(db, user, item.id, [[c.completion_id] for c in item.completions], [])
                elif item is not None:
                    service.skip(db, user, item.id)

            for _ in range(15):
                guarded(step)
                db.rollback()

    def admin():
        rng = random.Random(99)
        with app.state.sessions() as db:
            boss = service.get_user(db, "admin")
            db.commit()
            for turn in range(15):
                guarded(lambda: service.set_disabled(db, "cat", turn % 2 == 0, boss))  # noqa: B023
                db.rollback()
                guarded(lambda: service.reopen_item(db, rng.randint(1, 6)))
                db.rollback()

    threads = [threading.Thread(target=tab, args=(name, seed)) for seed, name in enumerate(["ann", "bob", "cat"] * 2)]
    threads.append(threading.Thread(target=admin))
    run_together(threads)
    assert failures == []
    assert_slots_kept(app, overlap=2)
