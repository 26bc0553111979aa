"""Migrations 0002 and 0004 on a database that 0001 made and the old app filled, on SQLite and PostgreSQL."""

from alembic import command
from sqlalchemy import func, inspect, select, text

from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.feedback import db as feedback_db


def test_0002_and_0004_normalise_names_number_slots_close_extra_open_assignments_and_count_free_slots(db_url):
    engine = feedback_db.make_engine(db_url)
    feedback_db.migrate(engine, "0001")
    with engine.begin() as connection:
        run = lambda sql: connection.execute(text(sql))  # noqa: E731
        run("INSERT INTO users (id, username, role, created_at) VALUES (1, ' Ann', 'labeler', CURRENT_TIMESTAMP), "
            "(2, 'bob', 'labeler', CURRENT_TIMESTAMP), (3, 'BOB', 'labeler', CURRENT_TIMESTAMP)")
        run("INSERT INTO projects (id, name, criterion, instructions, overlap, consensus, gold_rate, created_at) "
            "VALUES (1, 'p', 'c', '', 2, 'borda', 0, CURRENT_TIMESTAMP)")
        run("INSERT INTO items (id, project_id, prompt_id, prompt, is_gold) VALUES (1, 1, 'a', '\"q\"', false), "
            "(2, 1, 'b', '\"q\"', false)")
        # ann holds two open assignments (parallel requests on PostgreSQL), bob labeled item 1
        run("INSERT INTO assignments (id, item_id, user_id, status, created_at) VALUES "
            "(1, 1, 1, 'open', CURRENT_TIMESTAMP), (2, 2, 1, 'open', CURRENT_TIMESTAMP), "
            "(3, 1, 2, 'done', CURRENT_TIMESTAMP)")
    feedback_db.migrate(engine)
    with engine.connect() as connection:
        names = connection.execute(text("SELECT id, username FROM users ORDER BY id")).all()
        assignments = connection.execute(text("SELECT id, project_id, slot, status FROM assignments ORDER BY id")).all()
    assert names == [(1, "ann"), (2, "bob"), (3, "BOB")]  # "BOB" would collide with "bob": left for the admin
    assert [tuple(a) for a in assignments] == [(1, 1, 0, "open"), (2, 1, None, "expired"), (3, 1, 1, "done")]
    with engine.connect() as connection:  # 0004: k = 2 minus the holders of a slot
        assert connection.execute(text("SELECT id, free_slots FROM items ORDER BY id")).all() == [(1, 0), (2, 2)]
    with engine.begin() as connection:  # and back, and up again
        command.downgrade(feedback_db.alembic_config(connection), "0001")
        command.upgrade(feedback_db.alembic_config(connection), "head")
    engine.dispose()


def test_an_item_over_filled_before_0004_takes_no_new_labeler_when_one_of_its_holders_lets_go(db_url):
    """k = 2 and three holders (from before slots existed): after 0004 the counter says 0 free and agrees
    with the rows; when the open holder skips, the item still has its 2 labels, so nobody is given it."""
    from rlhfkit.feedback import service

    engine = feedback_db.make_engine(db_url)
    feedback_db.migrate(engine, "0001")
    with engine.begin() as connection:
        run = lambda sql: connection.execute(text(sql))  # noqa: E731
        run("INSERT INTO users (id, username, role, created_at) VALUES (1, 'ann', 'labeler', CURRENT_TIMESTAMP), "
            "(2, 'bob', 'labeler', CURRENT_TIMESTAMP), (3, 'cat', 'labeler', CURRENT_TIMESTAMP), "
            "(4, 'dan', 'labeler', CURRENT_TIMESTAMP)")
        run("INSERT INTO projects (id, name, criterion, instructions, overlap, consensus, gold_rate, created_at) "
            "VALUES (1, 'p', 'c', '', 2, 'borda', 0, CURRENT_TIMESTAMP)")
        run("INSERT INTO items (id, project_id, prompt_id, prompt, is_gold) VALUES (1, 1, 'a', '\"q\"', false)")
        run("INSERT INTO assignments (id, item_id, user_id, status, created_at) VALUES "
            "(1, 1, 1, 'done', CURRENT_TIMESTAMP), (2, 1, 2, 'done', CURRENT_TIMESTAMP), "
            "(3, 1, 3, 'open', CURRENT_TIMESTAMP)")
    feedback_db.migrate(engine)
    with feedback_db.sessionmaker(engine, expire_on_commit=False)() as db:
        assert service.free_slot_mismatches(db) == {}
        project = service.get_project(db, "p")
        service.skip(db, service.get_user(db, "cat"), 1)
        assert service.free_slot_mismatches(db) == {}
        assert service.next_item(db, service.get_user(db, "dan"), project) is None
    engine.dispose()


KILLED_MID_TRANSACTION = """
import os, signal, sys
from sqlalchemy.orm import Session
from rlhfkit.feedback import service
from rlhfkit.feedback.db import session_factory

sessions = session_factory(sys.argv[1])
with sessions() as db:
    user, project = service.get_user(db, sys.argv[2]), service.get_project(db, "p")
    db.commit()
    if sys.argv[3] == "skip":
        item = service.next_item(db, user, project)
    Session.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)  # written, never committed
    if sys.argv[3] == "skip":
        service.skip(db, user, item.id)
    else:
        service.next_item(db, user, project)
"""


def test_a_server_killed_inside_a_slot_transaction_leaves_rows_and_free_slots_agreeing(db_url, tmp_path):
    """kill -9 after an assignment took a slot (or a skip gave one back) but before the commit: after the
    restart nothing of it is there, and every item's free_slots agrees with its rows."""
    import os
    import subprocess
    import sys

    from conftest import make_completions
    from rlhfkit.feedback import service

    sessions = feedback_db.session_factory(db_url)
    with sessions() as db:
        for name in ("ann", "bob"):
            service.create_user(db, name, password=f"{name}-password")
        service.create_project(db, "p", "c", [c for p in ("a", "b") for c in make_completions(p, 2)], overlap=2)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_TRANSACTION)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for name, action in (("ann", "next"), ("bob", "skip")):
        killed = subprocess.run([sys.executable, str(script), db_url, name, action], env=env, capture_output=True)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    with sessions() as db:
        assert service.free_slot_mismatches(db) == {}
        assert db.scalar(select(func.count()).select_from(feedback_db.Assignment)) == 1  # bob's, still open
        assert db.scalar(select(func.count()).where(feedback_db.Assignment.status == "open")) == 1
        assert sorted(db.scalars(select(feedback_db.Item.free_slots))) == [1, 2]


def test_0006_adds_the_truncated_flags_to_existing_completions_and_personal_choices_as_whole(db_url):
    """Rows from before 0006 read as answers that ended (false), as files without the field do."""
    engine = feedback_db.make_engine(db_url)
    feedback_db.migrate(engine, "0005")
    with engine.begin() as connection:
        run = lambda sql: connection.execute(text(sql))  # noqa: E731
        run("INSERT INTO users (id, username, role, created_at) VALUES (1, 'ann', 'labeler', CURRENT_TIMESTAMP)")
        run("INSERT INTO projects (id, name, criterion, instructions, overlap, consensus, gold_rate, created_at) "
            "VALUES (1, 'p', 'c', '', 2, 'borda', 0, CURRENT_TIMESTAMP)")
        run("INSERT INTO items (id, project_id, prompt_id, prompt, is_gold) VALUES (1, 1, 'a', '\"q\"', false)")
        run('INSERT INTO completions (id, item_id, completion_id, text, "index", model) '
            "VALUES (1, 1, 'a-0', 'answer', 0, '')")
        run("INSERT INTO personal_choices (id, user_id, prompt, answer_a, answer_b, model_a, model_b, asked_at) "
            "VALUES (1, 1, 'q', 'x', 'y', 'base', 'base', CURRENT_TIMESTAMP)")
    feedback_db.migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT truncated FROM completions")).all() == [(False,)]
        assert connection.execute(text("SELECT truncated_a, truncated_b FROM personal_choices")).all() == [
            (False, False)]
    with engine.begin() as connection:  # and back, and up again
        command.downgrade(feedback_db.alembic_config(connection), "0005")
        assert "truncated" not in {c["name"] for c in inspect(connection).get_columns("completions")}
        command.upgrade(feedback_db.alembic_config(connection), "head")
    engine.dispose()
