"""``assignments.undone_at``: when the labeler last took back (undo) their label of the item, so that
undo reaches only the labeler's last label and pressing it again does not reach older ones.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("assignments", sa.Column("undone_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("assignments") as assignments:  # no table references assignments: a copy is safe
        assignments.drop_column("undone_at")
