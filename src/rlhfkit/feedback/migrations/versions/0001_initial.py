"""The labeling schema: users, projects, items and their completions, assignments, labels, settings.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(256)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("invite_token", sa.String(64), unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("criterion", sa.String(128), nullable=False),
        sa.Column("instructions", sa.Text, nullable=False),
        sa.Column("overlap", sa.Integer, nullable=False),
        sa.Column("consensus", sa.String(32), nullable=False),
        sa.Column("gold_rate", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False, index=True),
        sa.Column("prompt_id", sa.String(256), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("is_gold", sa.Boolean, nullable=False),
        sa.Column("gold_groups", sa.JSON),
        sa.UniqueConstraint("project_id", "prompt_id"),
    )
    op.create_table(
        "completions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("completion_id", sa.String(256), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.UniqueConstraint("item_id", "completion_id"),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("item_id", "user_id"),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("groups", sa.JSON, nullable=False),
        sa.Column("flagged", sa.JSON, nullable=False),
        sa.Column("seconds", sa.Float),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("item_id", "user_id"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("settings", "labels", "assignments", "completions", "items", "projects", "users"):
        op.drop_table(table)
