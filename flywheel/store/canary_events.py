"""Canary events, and the window queries a canary is judged by: reads and writes.

The SQL behind flywheel.release.canary. The window queries read the interactions each version served
since the canary started and the failures captured from them (the newest verdict on each comes from
flywheel.store.failures.newest_verdicts); deciding what counts as a failure (a verdict that cleared it
does not) is the canary module's, not this one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from flywheel.records import Record, utcnow
from flywheel.store.schema import canary_events, failures, interactions


class CanaryEvent(Record):
    id: int
    version: str
    kind: str  # started | share | observation | rolled_back | ended
    detail: dict[str, Any]
    created_at: datetime


class FailingInteraction(Record):
    """An interaction a version served in the window that a capture rule caught."""

    model_version: str
    failure_id: str
    cluster_id: str | None = None


def add_event(conn: Connection, version: str, kind: str, detail: dict[str, Any]) -> int:
    return conn.execute(
        canary_events.insert().values(version=version, kind=kind, detail=detail, created_at=utcnow()).returning(canary_events.c.id)
    ).scalar_one()


def last_started(conn: Connection, version: str) -> tuple[int, datetime] | None:
    """The id and time of the newest "started" event of `version`'s canary."""
    row = conn.execute(
        select(canary_events.c.id, canary_events.c.created_at)
        .where(canary_events.c.version == version, canary_events.c.kind == "started")
        .order_by(canary_events.c.id.desc())
        .limit(1)
    ).first()
    return (row.id, row.created_at) if row else None


def events(conn: Connection, version: str, limit: int = 100) -> list[CanaryEvent]:
    """The newest `limit` events of `version`'s canaries, oldest first."""
    rows = conn.execute(
        select(canary_events).where(canary_events.c.version == version).order_by(canary_events.c.id.desc()).limit(limit)
    ).fetchall()
    return [CanaryEvent.model_validate(dict(r._mapping)) for r in reversed(rows)]


# --- the window ------------------------------------------------------------------------------------------


def requests_by_version(conn: Connection, versions: Sequence[str], since: datetime) -> dict[str, int]:
    """How many interactions each version served since `since` (versions that served none are absent)."""
    rows = conn.execute(
        select(interactions.c.model_version, func.count())
        .where(interactions.c.model_version.in_(list(versions)), interactions.c.timestamp >= since)
        .group_by(interactions.c.model_version)
    ).all()
    return {version: int(n) for version, n in rows}


def failing_interactions(conn: Connection, versions: Sequence[str], since: datetime) -> list[FailingInteraction]:
    """The captured failures of the interactions each version served since `since`."""
    rows = conn.execute(
        select(interactions.c.model_version, failures.c.id, failures.c.cluster_id)
        .select_from(interactions.join(failures, failures.c.interaction_id == interactions.c.id))
        .where(interactions.c.model_version.in_(list(versions)), interactions.c.timestamp >= since)
    ).fetchall()
    return [FailingInteraction(model_version=r.model_version, failure_id=r.id, cluster_id=r.cluster_id) for r in rows]
