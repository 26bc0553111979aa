"""``completions.truncated`` and ``personal_choices.truncated_a`` / ``truncated_b``: whether an answer was
cut at the generation limit (max_new_tokens) before EOS, so that training gives it no EOS
(``Completion.truncated``, ``PreferencePair.chosen_truncated``). Rows from before are taken as whole
(false), as files without the field are.

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = {"completions": ["truncated"], "personal_choices": ["truncated_a", "truncated_b"]}


def upgrade() -> None:
    # plain ADD COLUMN (SQLite and PostgreSQL): a batch copy would break the foreign keys to the table on SQLite
    for table, columns in COLUMNS.items():
        for column in columns:
            op.execute(f"ALTER TABLE {table} ADD COLUMN {column} BOOLEAN NOT NULL DEFAULT false")


def downgrade() -> None:
    for table, columns in COLUMNS.items():
        for column in columns:
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
