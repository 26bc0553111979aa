"""``personal_choices``: a user's questions to their personal model, the two answers shown (in the order
shown, with the model version that produced each), and their choice once made (a | b | both_fine |
both_bad), an optional short reason, and when. See ``rlhfkit.personal.store``.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "personal_choices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
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
    )


def downgrade() -> None:
    op.drop_table("personal_choices")
