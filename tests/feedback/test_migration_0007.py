"""Migration 0007: ``personal_choices`` ids are never reused after a deletion (SQLite AUTOINCREMENT); the rows,
their ids, the CHECK on the choice and the index on the user survive the rebuild."""

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from feedback_postgres import db_url, postgres  # noqa: F401 - fixtures
from rlhfkit.feedback import db as feedback_db

INSERT = ("INSERT INTO personal_choices (user_id, prompt, answer_a, answer_b, model_a, model_b, choice, asked_at) "
          "VALUES (1, 'q', 'x', 'y', 'base', 'base', {choice}, CURRENT_TIMESTAMP)")


def test_0007_keeps_the_rows_and_their_constraints_and_an_id_is_not_given_again(db_url):
    engine = feedback_db.make_engine(db_url)
    feedback_db.migrate(engine, "0006")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO users (id, username, role, created_at) "
                                "VALUES (1, 'ann', 'labeler', CURRENT_TIMESTAMP)"))
        for choice in ("'a'", "NULL", "'b'"):
            connection.execute(text(INSERT.format(choice=choice)))
    feedback_db.migrate(engine)
    with engine.begin() as connection:
        assert connection.execute(text("SELECT id, choice FROM personal_choices ORDER BY id")).all() == [
            (1, "a"), (2, None), (3, "b")]
        assert [i["column_names"] for i in inspect(connection).get_indexes("personal_choices")] == [["user_id"]]
        connection.execute(text("DELETE FROM personal_choices WHERE id = 3"))
        connection.execute(text(INSERT.format(choice="NULL")))
        assert connection.execute(text("SELECT max(id) FROM personal_choices")).scalar() == 4
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(INSERT.format(choice="'c'")))
    with engine.begin() as connection:  # and back, and up again
        command.downgrade(feedback_db.alembic_config(connection), "0006")
        command.upgrade(feedback_db.alembic_config(connection), "head")
        assert connection.execute(text("SELECT count(*) FROM personal_choices")).scalar() == 3
    engine.dispose()
