"""Reading and writing interactions."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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


def insert_ignore(conn: Connection, rows: Sequence[dict[str, Any]], inserted: set[str] | None = None) -> int:
    """Insert rows, skipping any whose id or content hash is already stored. Returns how many were new;
    `inserted`, when given, receives the ids of those rows (what this transaction inserted, not what another
    one inserted meanwhile: the gateway applies early feedback only to those).

    Idempotent by construction: ON CONFLICT DO NOTHING on both unique keys, in one statement. Rows go in
    the order given, so of two rows in one call with the same id or content the first is kept. Runs inside
    the caller's transaction; a value the database refuses raises SQLAlchemy's DataError or IntegrityError
    and leaves nothing of the call behind once the transaction rolls back.
    """
    if not rows:
        return 0
    if _bulk(conn):
        return insert_prepared(conn, plan_for(conn.dialect.name).values(rows), inserted)
    return _insert_ignore_core(conn, rows, inserted)


def insert_prepared(conn: Connection, values: Sequence[list[Any]], inserted: set[str] | None = None) -> int:
    """`insert_ignore` for rows already turned into values by `plan_for(conn.dialect.name).values(...)`:
    ingest builds those where it parses (in a helper process, for a large file), so the writing process only
    hands them to the driver."""
    if not values:
        return 0
    if conn.dialect.name == "sqlite":
        return _insert_ignore_sqlite(conn, values, inserted)
    if _bulk(conn):
        return _insert_ignore_copy(conn, values, inserted)
    # another PostgreSQL driver: back to rows for SQLAlchemy (only JSON was converted for PostgreSQL)
    plan = plan_for(conn.dialect.name)
    json_columns = [index for index, _ in plan.converters]
    rows = []
    for row in values:
        items = list(row)
        for index in json_columns:
            if items[index] is not None:
                items[index] = json.loads(items[index])
        rows.append(dict(zip(plan.names, items)))
    return _insert_ignore_core(conn, rows, inserted)


def _bulk(conn: Connection) -> bool:
    """Whether the driver's own bulk path serves this connection: sqlite3, or psycopg's COPY."""
    return conn.dialect.name == "sqlite" or (conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg")


def _insert_ignore_core(conn: Connection, rows: Sequence[dict[str, Any]], inserted: set[str] | None) -> int:
    # RETURNING counts what was really new (executemany rowcount is not reliable).
    stmt = postgresql.insert(interactions).on_conflict_do_nothing().returning(interactions.c.id)
    ids = conn.execute(stmt, list(rows)).scalars().all()
    if inserted is not None:
        inserted.update(ids)
    return len(ids)


class _Plan:
    """How rows become the driver's values for one dialect, worked out once: the columns in table order,
    their scalar defaults (for a row that lacks a column), and a converter for the columns that need one."""

    def __init__(self, converters: dict[str, Callable[[Any], Any]]):
        self.names = [column.name for column in interactions.columns]
        self.defaults = [
            column.default.arg if isinstance(column.default, ScalarElementColumnDefault) else None for column in interactions.columns
        ]
        self.converters = [(index, converters[name]) for index, name in enumerate(self.names) if name in converters]
        self._every_column = itemgetter(*self.names)
        self.position = {name: index for index, name in enumerate(self.names)}  # where each column sits in a row's values

    def values(self, rows: Iterable[dict[str, Any]]) -> list[list[Any]]:
        out = []
        for row in rows:
            try:
                values = list(self._every_column(row))
            except KeyError:  # a row without some columns: their defaults
                values = [row.get(name, default) for name, default in zip(self.names, self.defaults)]
            for index, convert in self.converters:
                if values[index] is not None:
                    values[index] = convert(values[index])
            out.append(values)
        return out


_PLANS: dict[str, _Plan] = {}


def plan_for(dialect_name: str) -> _Plan:
    """The plan for a dialect, by name, so that a process without a database (ingest's helper) can build
    values too: on SQLite each column's own bind processor (datetimes and JSON written faster, to the same
    text); on PostgreSQL only JSON is turned into text, the driver writes the rest."""
    plan = _PLANS.get(dialect_name)
    if plan is None:
        dialect = _dialect(dialect_name)
        converters: dict[str, Callable[[Any], Any]] = {}
        for column in interactions.columns:
            if isinstance(column.type, JSON):
                converters[column.name] = _json_text
            elif dialect_name == "sqlite":
                process = column.type.dialect_impl(dialect).bind_processor(dialect)
                if isinstance(column.type, DateTime) and process is not None:
                    process = _SqliteDatetime(process)
                if process is not None:
                    converters[column.name] = process
        plan = _PLANS[dialect_name] = _Plan(converters)
    return plan


def _dialect(name: str) -> Any:
    if name == "sqlite":
        return sqlite.dialect()
    if name == "postgresql":
        return postgresql.dialect()
    raise ValueError(f"no bulk value plan for the {name!r} dialect")


def _insert_ignore_sqlite(conn: Connection, params: Sequence[list[Any]], inserted: set[str] | None) -> int:
    """The same INSERT ... ON CONFLICT DO NOTHING through the sqlite3 cursor's executemany.

    Why: at ingest volumes SQLAlchemy's per-row parameter handling and RETURNING batches cost about twice
    what SQLite's own work does (bench/ingest.py). Values go through each column's own bind processor, so
    the stored text is what the Core path stores, except JSON, which orjson writes (same JSON, non-ASCII
    kept as UTF-8 instead of \\u escapes). New rows are counted with sqlite3's total_changes, which a skipped
    conflict does not move; a NOT NULL or other failure raises as SQLAlchemy's own error types. When the
    caller wants the inserted ids, the rows go one execute each, total_changes telling which were new.
    (ON CONFLICT DO NOTHING, not INSERT OR IGNORE: OR IGNORE would also skip a row that breaks NOT NULL.)
    """
    plan = plan_for("sqlite")
    sql = f"INSERT INTO {interactions.name} ({', '.join(plan.names)}) VALUES ({', '.join('?' * len(plan.names))}) ON CONFLICT DO NOTHING"
    raw = conn.connection.driver_connection
    assert raw is not None  # an open Connection always holds its sqlite3 connection
    before = raw.total_changes
    with _driver_errors(conn, sql):
        cursor = conn.connection.cursor()
        try:
            if inserted is None:
                cursor.executemany(sql, params)
            else:
                at = plan.position["id"]
                for row in params:
                    changes = raw.total_changes
                    cursor.execute(sql, row)
                    if raw.total_changes != changes:
                        inserted.add(row[at])
        finally:
            cursor.close()
    return raw.total_changes - before


# --- PostgreSQL: COPY into a staging table, then one INSERT ... SELECT ---------------------------------------------

STAGING = "flywheel_interactions_staging"


def _insert_ignore_copy(conn: Connection, values: Sequence[list[Any]], inserted: set[str] | None) -> int:
    """COPY the rows into a session-local staging table, then one INSERT ... SELECT ... ON CONFLICT DO
    NOTHING; its row count is how many were new (RETURNING id when the caller wants the ids).

    Why: a multi-row INSERT through SQLAlchemy costs the client far more than the server (bench/ingest.py:
    docs/ingest.md "Speed"); COPY hands psycopg plain tuples that it writes in C. The staging table is a
    temporary table of this connection, made on first use with the interactions columns and types (so a
    value the table would refuse is refused by the COPY already, as DataError or IntegrityError) plus the
    row's position. ON COMMIT DELETE ROWS empties it at each commit without touching the catalog (as
    creating and dropping a table per batch would); the DELETE after the INSERT empties it for a second
    call in the same transaction. The INSERT takes the rows in the order given, so the first of two rows
    with the same id or content in one call wins, as on SQLite.
    """
    plan = plan_for("postgresql")
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in plan.names)
    with _driver_errors(conn, f"COPY {STAGING}"):
        conn.exec_driver_sql(_staging_ddl(conn.dialect))
        cursor = conn.connection.cursor()
        try:
            with cursor.copy(f"COPY {STAGING} ({names}, ord) FROM STDIN") as copy:
                for position, row in enumerate(values):
                    copy.write_row((*row, position))  # a new tuple: the caller may insert the same values again
        finally:
            cursor.close()
    sql = f"INSERT INTO {interactions.name} ({names}) SELECT {names} FROM {STAGING} ORDER BY ord ON CONFLICT DO NOTHING"
    if inserted is None:
        count = conn.exec_driver_sql(sql).rowcount
    else:
        ids = conn.exec_driver_sql(f"{sql} RETURNING {quote('id')}").scalars().all()
        inserted.update(ids)
        count = len(ids)
    conn.exec_driver_sql(f"DELETE FROM {STAGING}")
    return count


@functools.cache
def _staging_ddl(dialect: Any) -> str:
    """The staging table: the interactions columns with their types and NOT NULLs, no keys or indexes
    (duplicates within a batch are the INSERT's to skip), and the position of each row."""
    quote = dialect.identifier_preparer.quote
    columns = [f"{quote(c.name)} {c.type.compile(dialect)}{'' if c.nullable else ' NOT NULL'}" for c in interactions.columns]
    return f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} ({', '.join(columns)}, ord integer NOT NULL) ON COMMIT DELETE ROWS"


@contextmanager
def _driver_errors(conn: Connection, statement: str) -> Iterator[None]:
    """Errors of work done on the driver's own cursor, raised as SQLAlchemy's types (DataError,
    IntegrityError, OperationalError, ...), as if SQLAlchemy had run it: callers catch only those."""
    error = conn.dialect.loaded_dbapi.Error
    try:
        yield
    except error as exc:
        raise DBAPIError.instance(statement, None, exc, error) from exc


class _SqliteDatetime:
    """SQLAlchemy's SQLite DATETIME text ("2026-01-05 10:00:00.000000", the wall-clock fields, no zone),
    written by isoformat in C; anything that is not a datetime goes to SQLAlchemy's own processor. The last
    value is remembered: a batch's rows share one ingested_at."""

    def __init__(self, fallback: Callable[[Any], Any]):
        self.fallback = fallback
        self.last: tuple[Any, Any] = (None, None)

    def __call__(self, value: Any) -> Any:
        last = self.last  # one read: another thread may replace it meanwhile, never half of it
        if value is last[0]:
            return last[1]
        if type(value) is datetime:
            text = value.isoformat(" ", "microseconds")[:26]  # the fields without the zone
        else:
            text = self.fallback(value)
        self.last = (value, text)
        return text


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
