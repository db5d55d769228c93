"""Feedback events from the gateway: the `feedback_events` table, and the interaction signals they set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from flywheel.store.schema import feedback_events, interactions

COUNTED = ("followups",)  # signals an event adds to; the others it sets


@dataclass(frozen=True)
class FeedbackEvent:
    interaction_id: str
    kind: str
    value: Any


def insert_event(conn: Connection, interaction_id: str, kind: str, value: Any, client: str | None, created_at: datetime) -> None:
    conn.execute(
        feedback_events.insert().values(interaction_id=interaction_id, kind=kind, value=value, client=client, created_at=created_at)
    )


def update_signals(conn: Connection, interaction_id: str, values: dict[str, Any]) -> int:
    """Set the interaction's signal columns to `values` (the COUNTED ones are added to). Returns 1 when
    the interaction is stored, else 0."""
    changes = {name: interactions.c[name] + value if name in COUNTED else value for name, value in values.items()}
    result = conn.execute(interactions.update().where(interactions.c.id == interaction_id).values(**changes))
    return result.rowcount or 0


def pending_events(conn: Connection, interaction_ids: Sequence[str]) -> list[FeedbackEvent]:
    """Events stored for `interaction_ids` whose interaction is not stored yet, oldest first."""
    if not interaction_ids:
        return []
    rows = conn.execute(
        select(feedback_events.c.interaction_id, feedback_events.c.kind, feedback_events.c.value)
        .where(feedback_events.c.interaction_id.in_(list(interaction_ids)))
        .order_by(feedback_events.c.id)
    ).fetchall()
    if not rows:
        return []
    ids = list({r.interaction_id for r in rows})
    existing = set(conn.execute(select(interactions.c.id).where(interactions.c.id.in_(ids))).scalars())
    return [FeedbackEvent(r.interaction_id, r.kind, r.value) for r in rows if r.interaction_id not in existing]
