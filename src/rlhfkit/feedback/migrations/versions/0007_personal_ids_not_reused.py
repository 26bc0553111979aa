"""``personal_choices.id`` is never reused (SQLite ``AUTOINCREMENT``): without it SQLite gives a new row
the largest freed id, so after a user deleted their data, a page still showing an old question could
answer the new question that took its id. PostgreSQL's sequences never reuse an id: nothing to do there.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def personal_choices(autoincrement: bool) -> sa.Table:
    """The table as 0005 and 0006 made it (named CHECK constraint included: batch copies do not reflect it)."""
    return sa.Table(
        "personal_choices", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("answer_a", sa.Text, nullable=False),
        sa.Column("answer_b", sa.Text, nullable=False),
        sa.Column("model_a", sa.String(64), nullable=False),
        sa.Column("model_b", sa.String(64), nullable=False),
        sa.Column("choice", sa.String(16), sa.CheckConstraint(
            "choice IN ('a', 'b', 'both_fine', 'both_bad')", name="known_choice")),
        sa.Column("reason", sa.String(200)),
        sa.Column("asked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("chosen_at", sa.DateTime(timezone=True)),
        sa.Column("truncated_a", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("truncated_b", sa.Boolean, nullable=False, server_default=sa.false()),
        sqlite_autoincrement=autoincrement,
    )


def rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # no table references personal_choices: a copy is safe; the copy drops the index on user_id, made again
    with op.batch_alter_table("personal_choices", recreate="always", copy_from=personal_choices(not autoincrement),
                              table_kwargs={"sqlite_autoincrement": autoincrement}) as table:
        table.create_index("ix_personal_choices_user_id", ["user_id"])


def upgrade() -> None:
    rebuild(autoincrement=True)


def downgrade() -> None:
    rebuild(autoincrement=False)
