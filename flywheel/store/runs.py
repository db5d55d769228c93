"""Agent runs and effects: rows of the `runs` and `effects` tables.

Runs come back as dicts of their columns (flywheel.agent.runs.RunRow validates them, and says what the
states mean). Effects are the idempotency keys of things done once (a tool call, a Slack message).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.records import utcnow
from flywheel.store.db import Store
from flywheel.store.schema import effects, runs

# --- runs ---------------------------------------------------------------------------------------------------


def insert_run(store: Store, **values: Any) -> None:
    with store.begin() as conn:
        conn.execute(runs.insert().values(**values))


def update_run(store: Store, run_id: str, **values: Any) -> None:
    """Set fields of a run (and updated_at). `summary` is merged into the stored one, in one transaction."""
    with store.begin() as conn:
        if "summary" in values:
            current = conn.execute(select(runs.c.summary).where(runs.c.id == run_id)).scalar() or {}
            values["summary"] = {**current, **(values["summary"] or {})}
        conn.execute(update(runs).where(runs.c.id == run_id).values(updated_at=utcnow(), **values))


def claim_run(store: Store, run_id: str, from_states: Iterable[str], summary: dict[str, Any], **values: Any) -> bool:
    """Set `values` (and updated_at; `summary` merged into the stored one) only if the run is in one of
    `from_states`. False: it is not."""
    with store.begin() as conn:
        current = conn.execute(select(runs.c.summary).where(runs.c.id == run_id)).scalar() or {}
        moved = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.state.in_(list(from_states)))
            .values(updated_at=utcnow(), summary={**current, **summary}, **values)
        ).rowcount
    return moved == 1


def set_if(store: Store, run_id: str, while_state: str, while_pid: int | None, **values: Any) -> dict[str, Any]:
    """Set `values` (and updated_at) if the run is still in `while_state` driven by `while_pid`; returns
    the run as it is now."""
    with store.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.state == while_state, runs.c.pid == while_pid)
            .values(updated_at=utcnow(), **values)
        )
        return dict(conn.execute(select(runs).where(runs.c.id == run_id)).one()._mapping)


def find_run(store: Store, run_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
    return dict(row._mapping) if row is not None else None


def list_runs(store: Store, limit: int = 50, states: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Runs (in `states`, if any), newest first."""
    query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id).limit(limit)
    wanted = list(states)
    if wanted:
        query = query.where(runs.c.state.in_(wanted))
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query).fetchall()]


def pending_payloads(store: Store, state: str) -> list[Any]:
    """The `pending` column of every run in `state` (the approval payloads runs wait on)."""
    with store.engine.connect() as conn:
        return list(conn.execute(select(runs.c.pending).where(runs.c.state == state)).scalars().all())


# --- effects ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    key: str
    result: dict[str, Any]  # {} when none was recorded
    created_at: datetime


def effect_result(store: Store, key: str) -> dict[str, Any] | None:
    """The result recorded under an effect key, or None when that effect has not happened."""
    with store.engine.connect() as conn:
        return conn.execute(select(effects.c.result).where(effects.c.key == key)).scalar()


def record_effect(store: Store, key: str, kind: str, result: dict[str, Any] | None = None) -> bool:
    """Record that the effect `key` happened. False when it was recorded already (by anyone)."""
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(effects)
        .values(key=key[:200], kind=kind, result=result, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(effects.c.key)
    )
    with store.begin() as conn:
        # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING
        return conn.execute(stmt).first() is not None


def get_effect(store: Store, key: str) -> Effect | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(effects.c.key, effects.c.result, effects.c.created_at).where(effects.c.key == key)).first()
    return Effect(key=row.key, result=dict(row.result or {}), created_at=row.created_at) if row else None


def set_effect_result(store: Store, key: str, result: dict[str, Any]) -> None:
    with store.begin() as conn:
        conn.execute(update(effects).where(effects.c.key == key).values(result=result))


def effects_of_kind(store: Store, kind: str) -> list[Effect]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(effects.c.key, effects.c.result, effects.c.created_at).where(effects.c.kind == kind)).fetchall()
    return [Effect(key=r.key, result=dict(r.result or {}), created_at=r.created_at) for r in rows]
