"""Training and evaluation jobs: rows of the `jobs` table (their meaning is flywheel.trainer.jobs).

Rows come back as dicts of their columns; flywheel.trainer.jobs.JobRecord validates them. Every status
change is a conditional UPDATE, so racing writers cannot overwrite one another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert as sql_insert
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from flywheel.store.db import Store
from flywheel.store.schema import jobs


def insert(store: Store, row: dict[str, Any]) -> bool:
    """Store a new job; False when a job with that id exists already (nothing is changed then)."""
    try:
        with store.begin() as conn:
            conn.execute(sql_insert(jobs).values(**row))
    except IntegrityError:
        return False
    return True


def find(store: Store, job_id: str) -> dict[str, Any] | None:
    with store.begin() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    return dict(row._mapping) if row is not None else None


def list_newest(store: Store, statuses: Iterable[str] = (), limit: int = 50) -> list[dict[str, Any]]:
    """Jobs (in `statuses`, if any), newest first."""
    query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit)
    wanted = list(statuses)
    if wanted:
        query = query.where(jobs.c.status.in_(wanted))
    with store.begin() as conn:
        rows = conn.execute(query).fetchall()
    return [dict(row._mapping) for row in rows]


def transition(store: Store, job_id: str, from_statuses: Iterable[str], to_status: str, values: dict[str, Any]) -> bool:
    """Move a job to `to_status` (and set `values`) only if it is in one of `from_statuses`."""
    stmt = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(list(from_statuses))).values(status=to_status, **values)
    with store.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def set_fields(
    store: Store, job_id: str, values: dict[str, Any], *, only_status: Iterable[str] | None = None, worker_pid: int | None = None
) -> bool:
    """Update fields of a job while it is in `only_status` (if given) and held by `worker_pid` (if given)."""
    stmt = update(jobs).where(jobs.c.id == job_id)
    if only_status is not None:
        stmt = stmt.where(jobs.c.status.in_(list(only_status)))
    if worker_pid is not None:
        stmt = stmt.where(jobs.c.pid == worker_pid)
    with store.begin() as conn:
        return conn.execute(stmt.values(**values)).rowcount == 1
