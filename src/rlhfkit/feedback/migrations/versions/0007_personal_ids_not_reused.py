"""``personal_choices.id`` is never reused (SQLite ``AUTOINCREMENT``): without it SQLite gives a new row
the largest freed id, so after a user deleted their data, a page still showing an old question could
answer the new question that took its id. PostgreSQL's sequences never reuse an id: nothing to do there.

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # no table references personal_choices: a copy (of the reflected table) is safe
    with op.batch_alter_table("personal_choices", recreate="always",
                              table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade() -> None:
    rebuild(autoincrement=True)


def downgrade() -> None:
    rebuild(autoincrement=False)
