"""Dataset snapshots: rows of the `datasets` table (the files and their meaning are flywheel.trainer.dataset).

Rows come back as dicts of their columns; flywheel.trainer.dataset.Snapshot validates them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.store.db import Store
from flywheel.store.schema import datasets


def insert_if_new(store: Store, row: dict[str, Any]) -> None:
    """Record a snapshot; a snapshot with the same id (the same content) is left as it is."""
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    with store.begin() as conn:
        conn.execute(dialect.insert(datasets).values(**row).on_conflict_do_nothing(index_elements=["id"]))


def list_all(store: Store, kind: str | None = None) -> list[dict[str, Any]]:
    """Every recorded snapshot (of `kind`, if given), newest first."""
    query = select(datasets).order_by(datasets.c.created_at.desc(), datasets.c.id)
    if kind is not None:
        query = query.where(datasets.c.kind == kind)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def manifest(conn: Connection, snapshot_id: str) -> Any:
    """A snapshot's stored manifest (a JSON object; which failures it was built from), None when the
    snapshot is not in the store. Takes a connection: graduation reads it inside its own transaction."""
    return conn.execute(select(datasets.c.manifest).where(datasets.c.id == snapshot_id)).scalar()


def find(store: Store, snapshot_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(datasets).where(datasets.c.id == snapshot_id)).first()
    return dict(row._mapping) if row is not None else None
