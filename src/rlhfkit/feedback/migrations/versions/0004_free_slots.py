"""``items.free_slots``: the slots of an item that no open or done assignment holds (k minus holders,
0 for gold items), kept by every path that takes or frees a slot, so that /api/next picks an item by
this column instead of counting assignments per item; a CHECK keeps it from going below 0. Counted
here from the assignment rows (an item over-filled before slots existed gets 0). And an index of open
assignments by age, for the lazy expiry after ASSIGNMENT_TIMEOUT.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (SQLite and PostgreSQL): a batch copy of items would break the foreign keys to it on SQLite
    op.execute("ALTER TABLE items ADD COLUMN free_slots INTEGER NOT NULL DEFAULT 0 CHECK (free_slots >= 0)")
    op.execute("UPDATE items SET free_slots = (SELECT CASE WHEN items.is_gold OR p.overlap <= held.n THEN 0 "
               "ELSE p.overlap - held.n END FROM projects p, (SELECT count(*) AS n FROM assignments a "
               "WHERE a.item_id = items.id AND a.status IN ('open', 'done') AND a.slot IS NOT NULL) held "
               "WHERE p.id = items.project_id)")
    op.create_index("open_assignments_by_age", "assignments", ["project_id", "created_at"],
                    sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.drop_index("open_assignments_by_age", "assignments")
    op.execute("ALTER TABLE items DROP COLUMN free_slots")
