"""Human labels: reads and writes of the `labels` table (what a label says is flywheel.data.labels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from flywheel.records import utcnow
from flywheel.store.db import Store
from flywheel.store.schema import failures, interactions, labels


@dataclass(frozen=True)
class StoredLabel:
    failure_id: str
    label: dict[str, Any]  # as flywheel.data.labels.Label dumped it
    labeller: str


def _stored(row: Any) -> StoredLabel:
    return StoredLabel(failure_id=row.failure_id, label=row.label, labeller=row.labeller)


def insert(conn: Connection, failure_id: str, label: dict[str, Any], labeller: str) -> int:
    """Store one label; returns its id."""
    new_id = conn.execute(
        labels.insert().values(failure_id=failure_id, label=label, labeller=labeller, created_at=utcnow()).returning(labels.c.id)
    ).scalar_one()
    return int(new_id)


def latest(conn: Connection, failure_id: str) -> StoredLabel | None:
    """The newest label of a failure."""
    row = conn.execute(select(labels).where(labels.c.failure_id == failure_id).order_by(labels.c.id.desc()).limit(1)).first()
    return _stored(row) if row is not None else None


def latest_many(conn: Connection, failure_ids: Sequence[str]) -> dict[str, StoredLabel]:
    """The newest label of each of many failures (those without a label are absent)."""
    out: dict[str, StoredLabel] = {}
    for start in range(0, len(failure_ids), 500):
        chunk = list(failure_ids[start : start + 500])
        newest = select(func.max(labels.c.id).label("lid")).where(labels.c.failure_id.in_(chunk)).group_by(labels.c.failure_id).subquery()
        for row in conn.execute(select(labels).join(newest, labels.c.id == newest.c.lid)):
            out[row.failure_id] = _stored(row)
    return out


def count(store: Store, since: datetime | None = None) -> int:
    """Labels given in all, or since a moment."""
    query = select(func.count()).select_from(labels)
    if since is not None:
        query = query.where(labels.c.created_at >= since)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def seen_intents(conn: Connection) -> set[str]:
    """Every intent seen in the logs or named in a label."""
    seen = set(conn.execute(select(interactions.c.intent).where(interactions.c.intent.is_not(None)).distinct()).scalars())
    for row in conn.execute(select(labels.c.label)):
        if isinstance(row.label, dict) and row.label.get("intent"):
            seen.add(row.label["intent"])
    return seen


def labelled_failures(conn: Connection, tier: str | None = None) -> list[tuple[str, str]]:
    """(id, status) of every failure with at least one label (in `tier`, when given)."""
    query = select(failures.c.id, failures.c.status).where(failures.c.id.in_(select(labels.c.failure_id)))
    if tier is not None:
        query = query.where(failures.c.tier == tier)
    return [(r.id, r.status) for r in conn.execute(query)]
