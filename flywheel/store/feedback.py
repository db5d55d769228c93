"""Feedback events from the gateway: the `feedback_events` table, and the interaction signals they set.

Each event is applied to its interaction exactly once, and `applied` says whether it has been. Only the
transaction that claims an event (turns its `applied` from false to true) applies it, in that same
transaction, so two gateways can never both apply one. An event whose interaction is not stored yet waits
unapplied; whoever stores the interaction claims it (`apply_for_inserted`). Several gateways on one
PostgreSQL leave one gap: an event committed while another transaction is inserting its interaction sees
no interaction, and that insert looked for events before the event was there. `apply_waiting` (the sweep
triage and the gateway's writer run) applies such events once their interaction is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, false, select

from flywheel.store.db import Store
from flywheel.store.schema import feedback_events, interactions

COUNTED = ("followups",)  # signals an event adds to; the others it sets
SWEEP_BATCH = 500  # waiting events claimed per transaction by `sweep`


def signal_update(kind: str, value: Any) -> dict[str, Any]:
    """The interactions columns one event sets (`followups`: how many to add)."""
    if kind == "thumbs_up":
        return {"feedback": "up"}
    if kind == "thumbs_down":
        return {"feedback": "down"}
    if kind == "escalation":
        return {"escalated_to_human": True if value is None else bool(value)}
    if kind == "followup":
        return {"followups": 1 if value is None else int(value)}
    if kind == "qa_verdict":
        return {"qa_verdict": value}
    if kind == "complaint":
        return {"complaint": value}
    raise ValueError(f"unknown feedback kind {kind!r}")


def update_signals(conn: Connection, interaction_id: str, values: dict[str, Any]) -> int:
    """Set the interaction's signal columns to `values` (the COUNTED ones are added to). Returns 1 when
    the interaction is stored (and visible to this transaction), else 0."""
    changes = {name: interactions.c[name] + value if name in COUNTED else value for name, value in values.items()}
    result = conn.execute(interactions.update().where(interactions.c.id == interaction_id).values(**changes))
    return result.rowcount or 0


def record_event(conn: Connection, interaction_id: str, kind: str, value: Any, client: str | None, created_at: datetime) -> bool:
    """Store one event, applied at once when its interaction is stored. True when it was applied.
    No other transaction can see the new row before this one commits, so writing it already marked is
    its claim."""
    applied = update_signals(conn, interaction_id, signal_update(kind, value)) == 1
    conn.execute(
        feedback_events.insert().values(
            interaction_id=interaction_id, kind=kind, value=value, client=client, created_at=created_at, applied=applied
        )
    )
    return applied


def _claim_and_apply(conn: Connection, where: Any) -> int:
    """Claim the unapplied events `where` selects and apply each. The claim is one UPDATE ... applied = false:
    on PostgreSQL a row another transaction is claiming waits for it and, once that one commits, no longer
    matches, so each event is returned (and applied) by exactly one transaction."""
    claimed = conn.execute(
        feedback_events.update()
        .where(where, feedback_events.c.applied == false())
        .values(applied=True)
        .returning(feedback_events.c.id, feedback_events.c.interaction_id, feedback_events.c.kind, feedback_events.c.value)
    ).fetchall()
    # Per interaction in arrival order (the last thumbs wins), interactions in id order: two transactions
    # updating the same interactions then lock them in the same order.
    for event in sorted(claimed, key=lambda e: (e.interaction_id, e.id)):
        update_signals(conn, event.interaction_id, signal_update(event.kind, event.value))
    return len(claimed)


def apply_for_inserted(conn: Connection, interaction_ids: Sequence[str]) -> int:
    """Apply the waiting events of interactions this transaction has just inserted. Returns how many."""
    if not interaction_ids:
        return 0
    return _claim_and_apply(conn, feedback_events.c.interaction_id.in_(list(interaction_ids)))


def apply_waiting(conn: Connection, limit: int) -> int:
    """Apply up to `limit` unapplied events whose interaction is stored, oldest first. Returns how many.
    Events another sweep holds are skipped (SKIP LOCKED, PostgreSQL): that sweep applies them."""
    waiting = (
        select(feedback_events.c.id)
        .join(interactions, interactions.c.id == feedback_events.c.interaction_id)
        .where(feedback_events.c.applied == false())
        .order_by(feedback_events.c.id)
        .limit(limit)
        .with_for_update(of=feedback_events, skip_locked=True)
    )
    return _claim_and_apply(conn, feedback_events.c.id.in_(waiting))


def sweep(store: Store, batch: int = SWEEP_BATCH) -> int:
    """Apply every unapplied event whose interaction is stored, `batch` per transaction. Returns how many."""
    total = 0
    while True:
        with store.begin() as conn:
            done = apply_waiting(conn, batch)
        total += done
        if done < batch:
            return total
