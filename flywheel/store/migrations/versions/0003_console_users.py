"""console users (flywheel.console) and the indexes behind the console's failure filters

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FAILURE_INDEXES = {
    "ix_failures_risk": "risk",
    "ix_failures_intent": "intent",
    "ix_failures_rule": "rule",
    "ix_failures_first_seen_version": "first_seen_version",
}


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_users")),
        sa.UniqueConstraint("name", name=op.f("uq_console_users_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_console_users_token_hash")),
    )
    for name, column in FAILURE_INDEXES.items():
        op.create_index(name, "failures", [column], unique=False)
    op.create_index("ix_verdicts_problem_type", "verdicts", ["problem_type"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_verdicts_problem_type", table_name="verdicts")
    for name in FAILURE_INDEXES:
        op.drop_index(name, table_name="failures")
    op.drop_table("console_users")
