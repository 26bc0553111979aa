"""Server-side sessions, login throttling, disabled accounts, assignment slots, answer order.

- ``web_sessions``: one row per logged-in client (the cookie carries a random token, the row its SHA-256).
- ``login_failures``: recent failed logins per account and per client address (throttling).
- ``users.disabled``; usernames normalised (stripped, case-folded) where that makes no duplicate.
- ``assignments.project_id`` and ``assignments.slot``, with partial unique indexes: one holder per slot
  of an item, one open assignment per labeler and project. Existing data is brought in line first:
  a labeler's extra open assignments in a project are expired, slots are numbered per item.
- ``labels.shown_order``: the completion ids in the order the labeler saw them (position bias).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(160), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure", sa.DateTime(timezone=True), nullable=False),
    )
    # plain ADD COLUMN: a batch copy of a table that others reference would break their foreign keys on SQLite
    op.add_column("users", sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("labels", sa.Column("shown_order", sa.JSON))
    op.add_column("assignments", sa.Column("project_id", sa.Integer))
    op.add_column("assignments", sa.Column("slot", sa.Integer))

    connection = op.get_bind()
    users = connection.execute(sa.text("SELECT id, username FROM users ORDER BY id")).all()
    taken = {name for _, name in users}
    for user_id, name in users:
        normal = name.strip().casefold()
        if normal not in taken:
            connection.execute(sa.text("UPDATE users SET username = :n WHERE id = :i"), {"n": normal, "i": user_id})
            taken.add(normal)
    connection.execute(sa.text("UPDATE assignments SET project_id = "
                               "(SELECT project_id FROM items WHERE items.id = assignments.item_id)"))
    has_open, slots = set(), {}
    rows = connection.execute(sa.text(
        "SELECT a.id, a.item_id, a.user_id, a.project_id, a.status, i.is_gold FROM assignments a "
        "JOIN items i ON i.id = a.item_id ORDER BY a.id")).all()
    for assignment_id, item_id, user_id, project_id, status, is_gold in rows:
        if status == "open" and (user_id, project_id) in has_open:
            status = "expired"
            connection.execute(sa.text("UPDATE assignments SET status = 'expired' WHERE id = :i"), {"i": assignment_id})
        if status == "open":
            has_open.add((user_id, project_id))
        if status in ("open", "done") and not is_gold:
            slots[item_id] = slots.get(item_id, -1) + 1
            connection.execute(sa.text("UPDATE assignments SET slot = :s WHERE id = :i"),
                               {"s": slots[item_id], "i": assignment_id})
    with op.batch_alter_table("assignments") as assignments:  # no table references assignments: a copy is safe
        assignments.alter_column("project_id", existing_type=sa.Integer, nullable=False)
        assignments.create_foreign_key("assignments_project_id_fkey", "projects", ["project_id"], ["id"])
    op.create_index("one_holder_per_slot", "assignments", ["item_id", "slot"], unique=True,
                    sqlite_where=sa.text("status IN ('open', 'done')"),
                    postgresql_where=sa.text("status IN ('open', 'done')"))
    op.create_index("one_open_item_per_labeler", "assignments", ["user_id", "project_id"], unique=True,
                    sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.drop_index("one_open_item_per_labeler", "assignments")
    op.drop_index("one_holder_per_slot", "assignments")
    with op.batch_alter_table("assignments") as assignments:
        assignments.drop_constraint("assignments_project_id_fkey", type_="foreignkey")
        assignments.drop_column("slot")
        assignments.drop_column("project_id")
    op.drop_column("labels", "shown_order")
    op.drop_column("users", "disabled")
    op.drop_table("login_failures")
    op.drop_table("web_sessions")
