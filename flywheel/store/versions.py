"""Model versions, the aliases that point at them and the alias events: reads and writes.

The SQL behind flywheel.release.registry (and the release modules built on it). Every function takes an
open Connection; the transaction, and the release lock that serialises release writes, belong to the
caller: `release_lock` first, then reads that see the state the transaction is about to change.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.release.records import AliasSwitch, ModelVersion, VersionStatus
from flywheel.store.schema import alias_events, aliases, model_versions

_LOCK_KEY = int.from_bytes(hashlib.sha256(b"flywheel.release").digest()[:8], "big", signed=True)


def release_lock(conn: Connection) -> None:
    """Serialise release writes until the transaction ends. Take it first in the transaction.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: a write that changes nothing still takes the
    database write lock (pysqlite begins the transaction before it), so later reads in the same
    transaction cannot be stale."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:
        conn.execute(text("UPDATE aliases SET name = name WHERE 1 = 0"))


def epoch(conn: Connection) -> int:
    """The id of the newest alias event: default effect keys include it, so the same action taken again
    later (after the state moved on) is a new effect, while a re-run of a crashed call that did not get
    to write is the same one."""
    return conn.execute(select(func.coalesce(func.max(alias_events.c.id), 0))).scalar_one()


# --- versions ---------------------------------------------------------------------------------------------


def _version_from_row(row: Any) -> ModelVersion:
    m = dict(row._mapping)
    m["metrics"] = m.get("metrics") or {}
    m["notes"] = m.get("notes") or ""
    return ModelVersion.model_validate(m)


def find_version(conn: Connection, version_id: str) -> ModelVersion | None:
    row = conn.execute(select(model_versions).where(model_versions.c.id == version_id)).first()
    return _version_from_row(row) if row is not None else None


def all_versions(conn: Connection) -> list[ModelVersion]:
    return [_version_from_row(r) for r in conn.execute(select(model_versions))]


def newest_version_id(conn: Connection) -> str | None:
    """The highest version id (v10 after v9: ordered by length first), None when there is none."""
    return conn.execute(
        select(model_versions.c.id).order_by(func.length(model_versions.c.id).desc(), model_versions.c.id.desc()).limit(1)
    ).scalar()


def same_model(conn: Connection, base_model: str, adapter_sha256: str | None) -> ModelVersion | None:
    """The oldest version holding these weights: the adapter's sha256, or the base model with no adapter."""
    if adapter_sha256:
        query = select(model_versions).where(model_versions.c.adapter_sha256 == adapter_sha256)
    else:
        query = select(model_versions).where(model_versions.c.base_model == base_model, model_versions.c.adapter_path.is_(None))
    row = conn.execute(query.order_by(model_versions.c.created_at).limit(1)).first()
    return _version_from_row(row) if row is not None else None


def insert_version(conn: Connection, version: ModelVersion) -> None:
    row = version.model_dump()
    row["status"] = str(version.status)
    conn.execute(model_versions.insert().values(**row))


def set_status(conn: Connection, version_id: str, status: VersionStatus) -> None:
    conn.execute(model_versions.update().where(model_versions.c.id == version_id).values(status=str(status)))


def set_eval(conn: Connection, version_id: str, report_path: str, report_hash: str, gate_passed: bool, metrics: dict[str, Any]) -> None:
    conn.execute(
        model_versions.update()
        .where(model_versions.c.id == version_id)
        .values(eval_report_path=report_path, eval_report_hash=report_hash, gate_passed=gate_passed, metrics=metrics)
    )


# --- aliases ----------------------------------------------------------------------------------------------


def alias_target(conn: Connection, alias: str) -> str | None:
    return conn.execute(select(aliases.c.version).where(aliases.c.name == alias)).scalar()


def alias_map(conn: Connection) -> dict[str, tuple[str, float | None]]:
    """alias -> (version, share)."""
    return {r.name: (r.version, r.share) for r in conn.execute(select(aliases))}


def alias_updated_at(conn: Connection, alias: str) -> datetime | None:
    return conn.execute(select(aliases.c.updated_at).where(aliases.c.name == alias)).scalar()


def put_alias(conn: Connection, alias: str, version: str, share: float | None, updated_at: datetime) -> None:
    """Point `alias` at `version` (insert or update)."""
    values = {"name": alias, "version": version, "share": share, "updated_at": updated_at}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(aliases).values(**values)
    conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={k: stmt.excluded[k] for k in values if k != "name"}))


def delete_alias(conn: Connection, alias: str) -> None:
    conn.execute(aliases.delete().where(aliases.c.name == alias))


# --- alias events -----------------------------------------------------------------------------------------


def _switch_from_row(row: Any, replayed: bool = False) -> AliasSwitch:
    m = dict(row._mapping)
    m.pop("id")
    return AliasSwitch(**m, replayed=replayed)


def insert_switch(conn: Connection, event: AliasSwitch) -> None:
    conn.execute(alias_events.insert().values(**event.model_dump(exclude={"replayed"})))


def recorded_switch(conn: Connection, key: str) -> AliasSwitch | None:
    """The switch recorded under this effect key (as replayed), None when there is none."""
    row = conn.execute(select(alias_events).where(alias_events.c.effect_key == key)).first()
    return _switch_from_row(row, replayed=True) if row is not None else None


def last_switch(conn: Connection, alias: str) -> AliasSwitch | None:
    """The newest switch of `alias` (as replayed), None when it never switched."""
    row = conn.execute(select(alias_events).where(alias_events.c.alias == alias).order_by(alias_events.c.id.desc()).limit(1)).first()
    return _switch_from_row(row, replayed=True) if row is not None else None


def switches(conn: Connection, limit: int = 50) -> list[AliasSwitch]:
    """The newest `limit` switches, newest first."""
    rows = conn.execute(select(alias_events).order_by(alias_events.c.id.desc()).limit(limit)).fetchall()
    return [_switch_from_row(r) for r in rows]


def holders(conn: Connection, alias: str) -> list[str]:
    """Every version `alias` ever pointed at, in the order it switched to them (repeats kept)."""
    query = select(alias_events.c.to_version).where(alias_events.c.alias == alias, alias_events.c.to_version.is_not(None))
    return [v for v in conn.execute(query.order_by(alias_events.c.id)).scalars() if v]


def holders_since(conn: Connection, alias: str, since: datetime) -> list[str]:
    """Every version `alias` pointed at from `since` until now: the one it held then and each it
    switched to later, oldest first."""
    held = conn.execute(
        select(alias_events.c.to_version)
        .where(alias_events.c.alias == alias, alias_events.c.created_at < since)
        .order_by(alias_events.c.id.desc())
        .limit(1)
    ).scalar()
    later = conn.execute(
        select(alias_events.c.to_version)
        .where(alias_events.c.alias == alias, alias_events.c.created_at >= since)
        .order_by(alias_events.c.id)
    ).scalars()
    return [v for v in dict.fromkeys([held, *later]) if v]
