"""synthetic samples (flywheel.synthesis)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "synthetic_samples",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("generator", sa.String(length=32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("source_id", sa.String(length=200), nullable=True),
        sa.Column("intent", sa.String(length=200), nullable=False),
        sa.Column("problem_type", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_synthetic_samples")),
    )
    op.create_index("ix_synthetic_samples_kept_intent", "synthetic_samples", ["kept", "intent"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_synthetic_samples_kept_intent", table_name="synthetic_samples")
    op.drop_table("synthetic_samples")
