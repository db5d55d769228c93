"""Generated samples: rows of `synthetic_samples` (what they mean is flywheel.synthesis).

Every sample the scorer saw is a row, kept or dropped, with its scores and reasons, so `flywheel
synthesize list` can say why each one is or is not in the pool. Ids are content hashes: writing the
same sample again updates its scores and decision (the pool it was scored against may have grown) and
adds no row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.records import utcnow
from flywheel.store.db import Store
from flywheel.store.schema import synthetic_samples as table

_RESCORED = ("scores", "kept", "reasons", "scored_at")
_CHUNK = 500


def upsert(store: Store, rows: Sequence[dict[str, Any]]) -> int:
    """Insert new samples, re-score known ones. Returns how many rows were new."""
    if not rows:
        return 0
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    now = utcnow()
    new = 0
    with store.begin() as conn:
        for start in range(0, len(rows), _CHUNK):
            chunk = [{**r, "created_at": now, "scored_at": now} for r in rows[start : start + _CHUNK]]
            known = set(conn.execute(select(table.c.id).where(table.c.id.in_([r["id"] for r in chunk]))).scalars())
            new += sum(r["id"] not in known for r in chunk)
            insert = dialect.insert(table)
            conn.execute(insert.on_conflict_do_update(index_elements=["id"], set_={c: insert.excluded[c] for c in _RESCORED}), chunk)
    return new


def kept(conn: Connection) -> list[dict[str, Any]]:
    """Every kept sample, in id order (the snapshot builder's source)."""
    return [dict(r._mapping) for r in conn.execute(select(table).where(table.c.kept.is_(True)).order_by(table.c.id))]


def listing(
    store: Store,
    *,
    generator: str | None = None,
    kept_only: bool | None = None,
    intent: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = select(table).order_by(table.c.scored_at.desc(), table.c.id).limit(limit).offset(offset)
    if generator is not None:
        query = query.where(table.c.generator == generator)
    if kept_only is not None:
        query = query.where(table.c.kept.is_(kept_only))
    if intent is not None:
        query = query.where(table.c.intent == intent)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def find(store: Store, sample_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.id == sample_id)).first()
    return dict(row._mapping) if row is not None else None


def counts(store: Store) -> dict[str, dict[str, int]]:
    """generator -> {"kept": n, "dropped": n}."""
    query = select(table.c.generator, table.c.kept, func.count()).group_by(table.c.generator, table.c.kept)
    out: dict[str, dict[str, int]] = {}
    with store.engine.connect() as conn:
        for generator, is_kept, n in conn.execute(query):
            out.setdefault(generator, {"kept": 0, "dropped": 0})["kept" if is_kept else "dropped"] += n
    return out
