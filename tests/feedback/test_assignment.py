"""Assignment correctness on SQLite and PostgreSQL: a label needs the labeler's open, unexpired,
unskipped assignment; one open item per labeler and project, even under parallel requests; answers in
an order of each labeler's own; gold items that cannot be told apart; undo; stranded items."""

import itertools
import random
import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update
from test_app import login, setup_project

from conftest import make_completions
from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.data.records import Ranking
from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Assignment, Label, User, now


def order(item):
    return [[c["id"]] for c in item["completions"]]


def label_count(app, item_id=None):
    with app.state.sessions() as db:
        query = select(func.count()).select_from(Label)
        return db.scalar(query.where(Label.item_id == item_id) if item_id else query)


def test_a_skipped_item_takes_no_label(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=3)
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    assert ann.post("/api/skip", json={"item_id": item["item_id"]}).status_code == 200
    late = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
    assert late.status_code == 409 and "skipped" in late.json()["detail"]
    assert label_count(app) == 0


def test_a_skippers_late_submit_is_refused_even_when_the_admin_reopens_the_item_meanwhile(db_url, monkeypatch):
    """The refusal reads the assignment's status before its transaction ends: an admin's reopen that deletes
    the skipped assignment right then (seen racing on PostgreSQL) must not turn the 409 into a 500."""
    app = create_app(db_url)
    setup_project(app, overlap=3)
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    assert ann.post("/api/skip", json={"item_id": item["item_id"]}).status_code == 200
    lookup = service._assignment

    def then_reopened(session, user, item_id):
        assignment = lookup(session, user, item_id)
        original_rollback = session.rollback

        def rollback_then_reopen():
            original_rollback()
            with app.state.sessions() as admin:
                assert service.reopen_item(admin, item_id) == 1
            session.rollback = original_rollback

        session.rollback = rollback_then_reopen
        return assignment

    monkeypatch.setattr(service, "_assignment", then_reopened)
    late = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
    assert late.status_code == 409 and "skipped" in late.json()["detail"]
    assert label_count(app) == 0


def test_an_expired_assignment_takes_no_label_after_its_slot_went_to_someone_else(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    item = ann.get("/api/next").json()
    with app.state.sessions() as db:  # ann went for lunch
        db.execute(update(Assignment).values(created_at=now() - service.ASSIGNMENT_TIMEOUT - timedelta(minutes=1)))
        db.commit()
    bob_items = []
    while (r := bob.get("/api/next")).status_code == 200:
        bob_items.append(r.json()["item_id"])
        assert bob.post("/api/labels", json={"item_id": r.json()["item_id"], "groups": order(r.json())}).status_code \
            == 200
    assert item["item_id"] in bob_items  # the slot went back to the pool
    late = ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
    assert late.status_code == 409 and "expired" in late.json()["detail"]
    assert label_count(app, item["item_id"]) == 1


def test_late_submissions_racing_new_assignments_never_overfill(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    names = [f"u{i}" for i in range(8)]
    with app.state.sessions() as db:
        for name in names:
            service.create_user(db, name, password="password-1")
    clients = {name: login(TestClient(app), name, "password-1") for name in names}
    held = {name: clients[name].get("/api/next") for name in names[:6]}  # six labelers hold the six items
    with app.state.sessions() as db:
        db.execute(update(Assignment).values(created_at=now() - service.ASSIGNMENT_TIMEOUT - timedelta(seconds=1)))
        db.commit()
    barrier = threading.Barrier(8)

    def late(name):
        barrier.wait()
        item = held[name].json()
        clients[name].post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})

    def fresh(name):
        barrier.wait()
        r = clients[name].get("/api/next")
        if r.status_code == 200:
            clients[name].post("/api/labels", json={"item_id": r.json()["item_id"], "groups": order(r.json())})

    threads = [threading.Thread(target=late, args=(n,)) for n in names[:6]]
    threads += [threading.Thread(target=fresh, args=(n,)) for n in names[6:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with app.state.sessions() as db:
        per_item = db.execute(select(Label.item_id, func.count()).group_by(Label.item_id)).all()
        assert all(n == 1 for _, n in per_item)  # k = 1: never two labels on an item
        assert db.scalar(select(func.count()).select_from(Label)) == len(per_item) == 2  # only the fresh ones


def test_parallel_next_from_one_labeler_opens_one_assignment(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann = login(TestClient(app), "ann")
    barrier, got = threading.Barrier(8), []

    def ask():
        barrier.wait()
        got.append(ann.get("/api/next").json()["item_id"])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1  # two tabs and retries see the same item
    with app.state.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Assignment)) == 1
    bob = login(TestClient(app), "bob")
    assert len({bob.get("/api/next").json()["item_id"]} | set(got)) == 2  # the other five items are free


def test_answers_come_in_each_labelers_own_order_which_is_stored_with_the_label(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=2)
    seen = {}
    for name in ("ann", "bob"):
        client = login(TestClient(app), name)
        while (r := client.get("/api/next")).status_code == 200:
            item = r.json()
            assert client.get("/api/next").json()["completions"] == item["completions"]  # a reload: same order
            seen[name, item["item_id"]] = [c["id"] for c in item["completions"]]
            client.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})  # as shown
    orders = list(seen.values())
    assert any(o != sorted(o) for o in orders) and len({tuple(o) for o in orders}) > 1
    with app.state.sessions() as db:
        users = {u.id: u.username for u in db.scalars(select(User))}
        for label in db.scalars(select(Label)):
            assert label.shown_order == seen[users[label.user_id], label.item_id]
    admin = login(TestClient(app), "admin", "admin-pass")
    bias = admin.get("/api/admin/stats?project=demo").json()["position_bias"]
    assert bias["labels"] == 12 and bias["best_at_position"] == [1.0, 0.0, 0.0]  # everyone kept the order shown
    assert abs(bias["chance"] - 1 / 3) < 1e-9
    assert "100%, 0%, 0%" in admin.get("/admin?project=demo").text


def test_gold_items_move_progress_and_come_in_each_labelers_own_order(db_url):
    gold = [Ranking(prompt_id=f"p{i}", labeler_id="gold", groups=[[f"p{i}-0"], [f"p{i}-1"], [f"p{i}-2"]])
            for i in range(3, 6)]
    app = create_app(db_url)
    setup_project(app, overlap=2, gold=gold)  # gold rate 1: the gold items come first
    with app.state.sessions() as db:
        project = service.get_project(db, "demo")
        firsts = set()
        for seed, name in enumerate(("ann", "bob", "cat", "dan")):
            user = db.scalar(select(User).where(User.username == name))
            firsts.add(service.next_item(db, user, project, random.Random(seed)).prompt_id)
    assert len(firsts) > 1  # not the same gold item for everyone
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()
    before = item["progress"]
    ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
    after = ann.get("/api/next").json()["progress"]
    assert after["done"] == before["done"] + 1  # a gold item counts like any other


def test_progress_is_the_labelers_own_and_undo_works_while_the_item_is_open(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=2)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    first = ann.get("/api/next").json()
    assert first["progress"] == {"done": 0, "left": 6}
    ann.post("/api/labels", json={"item_id": first["item_id"], "groups": order(first)})
    second = ann.get("/api/next").json()
    assert second["progress"] == {"done": 1, "left": 5}
    undone = ann.post("/api/undo", json={"project": "demo"})
    assert undone.status_code == 200 and undone.json()["reopened"] == first["item_id"]
    assert label_count(app) == 0 and ann.get("/api/next").json()["item_id"] == first["item_id"]
    reranked = [list(reversed(order(first)))]
    assert ann.post("/api/labels", json={"item_id": first["item_id"], "groups": reranked[0]}).status_code == 200
    # bob completes the item (k = 2): now it is final
    while (r := bob.get("/api/next")).status_code == 200 and r.json()["item_id"] != first["item_id"]:
        bob.post("/api/skip", json={"item_id": r.json()["item_id"]})
    bob.post("/api/labels", json={"item_id": first["item_id"], "groups": order(r.json())})
    final = ann.post("/api/undo", json={"project": "demo"})
    assert final.status_code == 409 and "final" in final.json()["detail"]
    while (r := ann.get("/api/next")).status_code == 200:
        ann.post("/api/labels", json={"item_id": r.json()["item_id"], "groups": order(r.json())})
    assert ann.get("/api/progress?project=demo").json() == {"done": 6, "left": 0}  # fresh at "All done"


def one_item_for_two_labelers(db_url):
    """An app with the admin, ann and bob, and one item that needs both (k = 2)."""
    app = create_app(db_url)
    with app.state.sessions() as db:
        service.create_user(db, "admin", "admin", password="admin-pass")
        for name in ("ann", "bob"):
            service.create_user(db, name, password=f"{name}-password")
        service.create_project(db, "demo", "helpfulness", make_completions("p0", 3), overlap=2)
    return app


def test_admin_sees_skips_and_stranded_items_and_offers_them_again(db_url):
    app = one_item_for_two_labelers(db_url)
    ann, bob = login(TestClient(app), "ann"), login(TestClient(app), "bob")
    item = ann.get("/api/next").json()
    ann.post("/api/skip", json={"item_id": item["item_id"]})  # with exactly k labelers, one skip strands it
    admin = login(TestClient(app), "admin", "admin-pass")
    stats = admin.get("/api/admin/stats?project=demo").json()
    assert stats["skips"] == {"ann": 1}
    assert [s["prompt_id"] for s in stats["stranded"]] == ["p0"]
    assert "offer again" in admin.get("/admin?project=demo").text
    assert admin.post(f"/api/admin/items/{item['item_id']}/reopen").json() == {"released": 1}
    for client in (ann, bob):
        again = client.get("/api/next").json()
        assert client.post("/api/labels", json={"item_id": again["item_id"], "groups": order(again)}).status_code \
            == 200
    assert admin.get("/api/admin/stats?project=demo").json()["progress"]["complete"] == 1


def test_an_item_locked_by_another_labelers_assignment_is_passed_over_not_waited_for(postgres):
    from feedback_postgres import fresh_database

    app = create_app(fresh_database(postgres))
    setup_project(app, overlap=3)
    ann = login(TestClient(app), "ann")
    first = ann.get("/api/next").json()["item_id"]  # the fullest item is the one every labeler would want
    with app.state.sessions() as holder:  # someone else's assignment of it is under way
        holder.execute(select(service.Item).where(service.Item.id == first).with_for_update())
        bob = login(TestClient(app), "bob")
        result = {}
        asking = threading.Thread(target=lambda: result.update(item=bob.get("/api/next").json()["item_id"]))
        asking.start()
        asking.join(timeout=10)
        assert not asking.is_alive() and result["item"] != first  # bob got another item at once
        holder.rollback()


def ascents(ids):
    """The share of steps to a larger id: about 1/2 in a random order, 1 in file order."""
    return sum(b > a for a, b in itertools.pairwise(ids)) / (len(ids) - 1)


def test_labelers_meet_the_items_in_orders_of_their_own_in_which_a_gold_item_has_no_telling_place(db_url):
    gold = [Ranking(prompt_id=f"g{i}", labeler_id="gold", groups=[[f"g{i}-0"], [f"g{i}-1"]]) for i in range(4)]
    app = create_app(db_url)
    with app.state.sessions() as db:
        for name in ("ann", "bob"):
            service.create_user(db, name, password=f"{name}-password")
        completions = [c for i in range(40) for c in make_completions(f"p{i}", 2)]
        completions[20 * 2:20 * 2] = [c for i in range(4) for c in make_completions(f"g{i}", 2)]  # gold in the middle
        service.create_project(db, "demo", "helpfulness", completions, overlap=2, gold=gold, gold_rate=0.1)
        gold_ids = set(db.scalars(select(service.Item.id).where(service.Item.is_gold.is_(True))))
    sequences = {}
    for name in ("ann", "bob"):  # ann labels everything first: to bob every item is equally full
        client, sequences[name] = login(TestClient(app), name), []
        while (r := client.get("/api/next")).status_code == 200:
            sequences[name].append(r.json()["item_id"])
            client.post("/api/labels", json={"item_id": sequences[name][-1], "groups": order(r.json())})
    regular = {name: [i for i in ids if i not in gold_ids] for name, ids in sequences.items()}
    assert sorted(regular["ann"]) == sorted(regular["bob"]) and len(regular["ann"]) == 40
    assert regular["ann"] != regular["bob"]  # not one sequence for everyone
    # regular ids come in no order, so a gold item (ids 21-24 here) breaking the order of the ids is no sign
    assert all(0.2 < ascents(ids) < 0.8 for ids in regular.values()), {n: ascents(i) for n, i in regular.items()}


def test_undo_takes_back_only_the_last_label_once(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=3)
    ann = login(TestClient(app), "ann")
    labeled = []
    for _ in range(2):
        item = ann.get("/api/next").json()
        ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
        labeled.append(item)
    assert ann.post("/api/undo", json={"project": "demo"}).json()["reopened"] == labeled[1]["item_id"]
    again = ann.post("/api/undo", json={"project": "demo"})  # U pressed twice: the label before is not reached
    assert again.status_code == 409 and "only your last label" in again.json()["detail"]
    assert label_count(app, labeled[0]["item_id"]) == 1
    ann.post("/api/skip", json={"item_id": labeled[1]["item_id"]})  # nor after skipping the item taken back
    ann.get("/api/next")
    assert ann.post("/api/undo", json={"project": "demo"}).status_code == 409
    assert label_count(app, labeled[0]["item_id"]) == 1
    item = ann.get("/api/next").json()  # a new label is the last one again: undo reaches it, once
    ann.post("/api/labels", json={"item_id": item["item_id"], "groups": order(item)})
    assert ann.post("/api/undo", json={"project": "demo"}).json()["reopened"] == item["item_id"]
    assert ann.post("/api/undo", json={"project": "demo"}).status_code == 409


def free_slots(app, item_id):
    with app.state.sessions() as db:
        return db.get(service.Item, item_id).free_slots


def test_every_path_that_takes_or_frees_a_slot_keeps_the_items_free_slot_count(db_url):
    app = create_app(db_url)
    setup_project(app, overlap=2)
    ann, bob, cat, dan = (login(TestClient(app), name) for name in ("ann", "bob", "cat", "dan"))
    admin = login(TestClient(app), "admin", "admin-pass")
    steps = []

    def check(step):
        with app.state.sessions() as db:
            steps.append((step, service.free_slot_mismatches(db)))

    first = ann.get("/api/next").json()
    assert free_slots(app, first["item_id"]) == 1
    ann.post("/api/labels", json={"item_id": first["item_id"], "groups": order(first)})
    assert free_slots(app, first["item_id"]) == 1  # the done assignment keeps its slot
    check("next, submit")
    skipped = ann.get("/api/next").json()["item_id"]  # the fullest: the other slot of the first item, then this
    ann.post("/api/skip", json={"item_id": skipped})
    check("skip")
    given_back = ann.get("/api/next").json()["item_id"]
    ann.post("/api/undo", json={"project": "demo"})
    assert free_slots(app, given_back) == 2
    check("undo")
    held_by_bob = bob.get("/api/next").json()["item_id"]
    with app.state.sessions() as db:  # bob went for lunch
        bob_id = service.get_user(db, "bob").id
        db.execute(update(Assignment).where(Assignment.user_id == bob_id)
                   .values(created_at=now() - service.ASSIGNMENT_TIMEOUT - timedelta(minutes=1)))
        db.commit()
        before = db.get(service.Item, held_by_bob).free_slots
    cat.get("/api/progress?project=demo")  # anyone's next or progress gives the timed-out slot back
    assert free_slots(app, held_by_bob) == before + 1
    check("expiry")
    held_by_dan = dan.get("/api/next").json()["item_id"]
    admin.post("/api/admin/users/dan/disable", json={})
    check("disable")
    assert admin.post(f"/api/admin/items/{skipped}/reopen").json() == {"released": 1}
    check("reopen")
    assert [mismatch for _, mismatch in steps] == [{}] * len(steps), steps
    assert held_by_dan and given_back != first["item_id"]


def test_free_slots_cannot_go_below_zero(db_url):
    import pytest
    from sqlalchemy.exc import IntegrityError

    app = create_app(db_url)
    setup_project(app, overlap=1)
    with app.state.sessions() as db, pytest.raises(IntegrityError):
        db.execute(update(service.Item).values(free_slots=service.Item.free_slots - 2))
        db.commit()



def test_the_only_item_with_work_locked_longer_than_the_retries_is_waited_for_not_refused(db_url):
    """One hot item whose row another writer holds for 1.5 s (a slow commit): /api/next waits for it
    and hands it out, instead of answering 503 "busy" while there is work."""
    app = create_app(db_url)
    with app.state.sessions() as db:
        service.create_user(db, "ann", password="ann-password")
        service.create_project(db, "hot", "c", make_completions("p0", 3), overlap=5)
    locked = threading.Event()

    def slow_writer():
        with app.state.sessions() as db:
            db.execute(select(service.Item.id).with_for_update())
            locked.set()
            threading.Event().wait(1.5)
            db.commit()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    locked.wait()
    try:
        with app.state.sessions() as db:
            offered = service.next_item(db, service.get_user(db, "ann"), service.get_project(db, "hot"))
            assert offered is not None
            assert service.free_slot_mismatches(db) == {}
    finally:
        writer.join()


def test_a_busy_answer_is_one_line_with_retry_after(db_url, monkeypatch):
    app = create_app(db_url)
    setup_project(app)
    monkeypatch.setattr(service, "PICK_ROUNDS", 0)  # as if every item with work stayed busy
    r = login(TestClient(app), "ann").get("/api/next")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "the server is busy: try again"}


def test_reopen_and_the_admin_stats_expire_timed_out_assignments_first(db_url):
    """ann let her item time out and nobody asked for a next item since: the admin sees it stranded, and
    reopening offers it to her again (before, the reopen released nothing: her assignment was still open)."""
    app = one_item_for_two_labelers(db_url)
    ann = login(TestClient(app), "ann")
    item = ann.get("/api/next").json()["item_id"]
    with app.state.sessions() as db:  # ann went for lunch
        db.execute(update(Assignment).values(created_at=now() - service.ASSIGNMENT_TIMEOUT - timedelta(minutes=1)))
        db.commit()
    admin = login(TestClient(app), "admin", "admin-pass")
    stranded = admin.get("/api/admin/stats?project=demo").json()["stranded"]
    assert [(s["item_id"], s["labels"], s["skipped_or_expired"]) for s in stranded] == [(item, 0, 1)]
    assert free_slots(app, item) == 2  # the stats view gave the timed-out slot back
    assert admin.post(f"/api/admin/items/{item}/reopen").json() == {"released": 1}
    assert ann.get("/api/next").json()["item_id"] == item
    assert admin.post("/api/admin/items/999/reopen").status_code == 404



def waits_or_ends(app, thread, seconds=10.0):
    """Return once ``thread`` ended or (PostgreSQL) a session of the database waits on a lock. On SQLite
    the other thread cannot be watched: it waits on the write lock until our transaction ends."""
    import time

    engine = app.state.sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        thread.join(0.3)
        return
    deadline = time.time() + seconds
    with engine.connect() as connection:
        while thread.is_alive() and time.time() < deadline:
            if connection.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")):
                return
            time.sleep(0.01)


@pytest.mark.parametrize("step", ["_free_slot", "_take_slot"])  # before / after the INSERT
def test_a_labeler_disabled_while_their_next_is_in_flight_keeps_no_item(db_url, monkeypatch, step):
    """The admin disables ann while her /api/next opens an assignment: at ``step`` (within its transaction)
    the disable runs in another thread, and the request goes on once that is done or waits on a lock.
    Before the INSERT (PostgreSQL: the disable commits; the request's check after its INSERT finds the
    flag and rolls back) and after it (the disable waits for the request's commit, then ends the
    assignment); SQLite serialises the two. Either way ann keeps nothing open and the slot is free."""
    app = create_app(db_url)
    setup_project(app, overlap=1)
    ann = login(TestClient(app), "ann")
    with app.state.sessions() as db:
        admin = service.get_user(db, "admin")
    original, admin_threads = getattr(service, step), []

    def disable():
        with app.state.sessions() as db:
            service.set_disabled(db, "ann", True, admin)

    def disabled_meanwhile(*args, **kwargs):
        monkeypatch.setattr(service, step, original)  # once
        admin_threads.append(threading.Thread(target=disable))
        admin_threads[0].start()
        waits_or_ends(app, admin_threads[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(service, step, disabled_meanwhile)
    answer = ann.get("/api/next")
    admin_threads[0].join()
    assert answer.status_code in (200, 401), answer.text
    with app.state.sessions() as db:
        ann_id = service.get_user(db, "ann").id
        assert db.scalars(select(Assignment.item_id).where(Assignment.user_id == ann_id,
                                                           Assignment.status == "open")).all() == []
        assert service.free_slot_mismatches(db) == {}
        assert set(db.scalars(select(service.Item.free_slots))) == {1}  # k = 1: every slot is free again
