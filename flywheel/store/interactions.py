"""Reading and writing interactions."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, DateTime, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from flywheel.records import Interaction, Message, Signals, utcnow
from flywheel.store.db import Store
from flywheel.store.schema import interactions


def to_row(item: Interaction) -> dict[str, Any]:
    s = item.signals
    return {
        "id": item.id,
        "content_hash": item.content_hash,
        "timestamp": item.timestamp,
        "model_version": item.model_version,
        "intent": item.intent,
        "user_id": item.user_id,
        "user_tier": s.user_tier,
        "messages": [m.model_dump(exclude_none=True) for m in item.messages],
        "feedback": s.feedback,
        "escalated_to_human": s.escalated_to_human,
        "followups": s.followups,
        "qa_verdict": s.qa_verdict,
        "complaint": s.complaint,
        "source": item.source,
        "latency_ms": item.latency_ms,
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "ingested_at": utcnow(),
    }


def from_row(row: Any) -> Interaction:
    m = row._mapping
    return Interaction(
        id=m["id"],
        timestamp=m["timestamp"],
        model_version=m["model_version"],
        intent=m["intent"],
        user_id=m["user_id"],
        messages=[Message.model_validate(x) for x in m["messages"]],
        signals=Signals(
            feedback=m["feedback"],
            escalated_to_human=bool(m["escalated_to_human"]),
            followups=m["followups"] or 0,
            qa_verdict=m["qa_verdict"],
            complaint=m["complaint"],
            user_tier=m["user_tier"],
        ),
        content_hash=m["content_hash"],
        source=m["source"] or "",
        latency_ms=m["latency_ms"],
        prompt_tokens=m["prompt_tokens"],
        completion_tokens=m["completion_tokens"],
    )


def insert_ignore(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert rows, skipping any whose id or content hash is already stored. Returns how many were new.

    Idempotent by construction: ON CONFLICT DO NOTHING on both unique keys, in one statement.
    """
    if not rows:
        return 0
    if conn.dialect.name == "sqlite":
        return _insert_ignore_sqlite(conn, rows)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING counts what was really new on both dialects (executemany rowcount is not reliable).
    stmt = dialect.insert(interactions).on_conflict_do_nothing().returning(interactions.c.id)
    return len(conn.execute(stmt, list(rows)).fetchall())


def _insert_ignore_sqlite(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """The same INSERT ... ON CONFLICT DO NOTHING through the sqlite3 cursor's executemany.

    Why: at ingest volumes SQLAlchemy's per-row parameter handling and RETURNING batches cost about twice
    what SQLite's own work does (bench/ingest.py). Values go through each column's own bind processor, so
    the stored text is what the Core path stores, except JSON, which orjson writes (same JSON, non-ASCII
    kept as UTF-8 instead of \\u escapes). New rows are counted with sqlite3's total_changes, which a skipped
    conflict does not move; a NOT NULL or other failure raises as SQLAlchemy's own error types.
    """
    dialect = conn.dialect
    name_defaults, processors, sql = _sqlite_plan(dialect)
    every_column = itemgetter(*(name for name, _ in name_defaults))
    params = []
    for row in rows:
        try:
            values = list(every_column(row))
        except KeyError:  # a row without some columns: their defaults
            values = [row.get(name, default) for name, default in name_defaults]
        for index, process in processors:
            if values[index] is not None:
                values[index] = process(values[index])
        params.append(values)
    raw = conn.connection.driver_connection
    assert raw is not None  # an open Connection always holds its sqlite3 connection
    before = raw.total_changes
    cursor = conn.connection.cursor()
    try:
        cursor.executemany(sql, params)
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()
    return raw.total_changes - before


_SQLITE_PLANS: dict[int, tuple[list[tuple[str, Any]], list[tuple[int, Any]], str]] = {}


def _sqlite_plan(dialect: Any) -> tuple[list[tuple[str, Any]], list[tuple[int, Any]], str]:
    """(column name, scalar default) pairs, the (position, bind processor) of the columns that have one, and
    the statement: worked out once per dialect."""
    plan = _SQLITE_PLANS.get(id(dialect))
    if plan is None:
        name_defaults, processors = [], []
        for index, column in enumerate(interactions.columns):
            name_defaults.append((column.name, column.default.arg if isinstance(column.default, ScalarElementColumnDefault) else None))
            process = column.type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(column.type, JSON):
                process = _json_text
            elif isinstance(column.type, DateTime) and process is not None:
                process = functools.partial(_sqlite_datetime, process)
            if process is not None:
                processors.append((index, process))
        names = ", ".join(name for name, _ in name_defaults)
        sql = f"INSERT INTO {interactions.name} ({names}) VALUES ({', '.join('?' * len(name_defaults))}) ON CONFLICT DO NOTHING"
        plan = _SQLITE_PLANS[id(dialect)] = (name_defaults, processors, sql)
    return plan


def _sqlite_datetime(fallback: Any, value: Any) -> Any:
    """SQLAlchemy's SQLite DATETIME text ("2026-01-05 10:00:00.000000", the wall-clock fields, no zone),
    written by isoformat in C; anything that is not a datetime goes to SQLAlchemy's own processor."""
    if type(value) is datetime:
        return value.replace(tzinfo=None).isoformat(" ", "microseconds")
    return fallback(value)


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # a type orjson does not write: the standard library's rules, as the Core path has
        return json.dumps(value)


def insert(store: Store, items: Iterable[Interaction]) -> int:
    with store.begin() as conn:
        return insert_ignore(conn, [to_row(i) for i in items])


def get(store: Store, interaction_id: str) -> Interaction | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(interactions).where(interactions.c.id == interaction_id)).first()
    return from_row(row) if row else None


def get_many(conn: Connection, ids: Sequence[str]) -> dict[str, Interaction]:
    out: dict[str, Interaction] = {}
    for chunk in _chunks(ids):
        for row in conn.execute(select(interactions).where(interactions.c.id.in_(chunk))):
            item = from_row(row)
            out[item.id] = item
    return out


def holders(conn: Connection, ids: Sequence[str], since: datetime) -> dict[str, tuple[str, str, bool]]:
    """For each of `ids` the store holds: (its content hash, its source, whether it was ingested at or after
    `since`). Ingest asks this after a batch skipped rows, to tell a duplicate (same id, same content) from
    an id conflict (same id, other content). The time is compared in SQL so that SQLite's zone-less
    timestamps and PostgreSQL's zoned ones need no converting here."""
    out: dict[str, tuple[str, str, bool]] = {}
    columns = (interactions.c.id, interactions.c.content_hash, interactions.c.source, interactions.c.ingested_at >= since)
    for chunk in _chunks(ids):
        for row_id, digest, source, recent in conn.execute(select(*columns).where(interactions.c.id.in_(chunk))):
            out[row_id] = (digest, source or "", bool(recent))
    return out


def _chunks(ids: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    """`ids` in slices small enough for an IN list on every backend."""
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def count(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(interactions)).scalar_one()


def iter_all(store: Store, batch: int = 2000, where: Any = None) -> Iterator[Interaction]:
    """Stream interactions in id order without loading them all."""
    last = ""
    while True:
        query = select(interactions).where(interactions.c.id > last)
        if where is not None:
            query = query.where(where)
        query = query.order_by(interactions.c.id).limit(batch)
        with store.engine.connect() as conn:
            rows = conn.execute(query).fetchall()
        if not rows:
            return
        for row in rows:
            yield from_row(row)
        last = rows[-1]._mapping["id"]
