"""feedback_events.applied: whether an event was applied to its interaction, and an index of those waiting

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("feedback_events", sa.Column("applied", sa.Boolean(), server_default=sa.false(), nullable=False))
    # Before this column an event was applied when it arrived or when its interaction was inserted: those whose
    # interaction is stored count as applied (one lost to the race this column closes cannot be told apart).
    op.execute(
        "UPDATE feedback_events SET applied = TRUE"
        " WHERE EXISTS (SELECT 1 FROM interactions WHERE interactions.id = feedback_events.interaction_id)"
    )
    op.create_index(
        "ix_feedback_events_waiting",
        "feedback_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("NOT applied"),
        sqlite_where=sa.text("applied = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_feedback_events_waiting", table_name="feedback_events")
    with op.batch_alter_table("feedback_events") as batch_op:  # SQLite drops a column by copying the table
        batch_op.drop_column("applied")
