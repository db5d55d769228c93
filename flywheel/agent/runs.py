"""The `runs` table: one row per agent run (its id is also the LangGraph thread id), with its state.

States:
  running           a process is driving the graph (its pid and host are recorded)
  waiting_approval  stopped at the approval node; `pending` holds the PendingApproval
  done              the graph ended (a chat run returns here between turns)
  stopped           the step limit or a budget ended it; `flywheel resume` continues with fresh counters
  failed            an infrastructure error stopped it; the checkpoint is resumable
  interrupted       the process driving it is gone (killed, crashed); the checkpoint is resumable

A process claims a run (conditional UPDATE from the states it may resume) before driving it, so two
processes answering the same approval cannot both resume it. A `running` row whose process no longer
exists on this host is read back as `interrupted`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.errors import NotFoundError
from flywheel.proc import pid_alive
from flywheel.records import Record, utcnow
from flywheel.store.db import Store
from flywheel.store.schema import effects, runs

RUNNING, WAITING, DONE, STOPPED, FAILED, INTERRUPTED = "running", "waiting_approval", "done", "stopped", "failed", "interrupted"
RESUMABLE = (WAITING, DONE, STOPPED, FAILED, INTERRUPTED)


class RunRow(Record):
    id: str
    trigger: str
    state: str
    policy: str
    summary: dict[str, Any] = {}
    pending: dict[str, Any] | None = None
    error: str | None = None
    pid: int | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def host(self) -> str | None:
        return self.summary.get("host")


def _row(row: Any) -> RunRow:
    values = dict(row._mapping)
    values["summary"] = values.get("summary") or {}
    return RunRow.model_validate(values)


def create_run(store: Store, run_id: str, trigger: str, policy: str) -> RunRow:
    now = utcnow()
    with store.begin() as conn:
        conn.execute(runs.insert().values(
            id=run_id, trigger=trigger, state=RUNNING, policy=policy, summary={"host": socket.gethostname()},
            pid=os.getpid(), created_at=now, updated_at=now,
        ))
    return get_run(store, run_id)


def update_run(store: Store, run_id: str, **values: Any) -> None:
    """Set fields of a run. `summary` is merged into the stored one (the host stays)."""
    with store.begin() as conn:
        if "summary" in values:
            current = conn.execute(select(runs.c.summary).where(runs.c.id == run_id)).scalar() or {}
            values["summary"] = {**current, **(values["summary"] or {})}
        conn.execute(update(runs).where(runs.c.id == run_id).values(updated_at=utcnow(), **values))


def claim_run(store: Store, run_id: str, from_states: Iterable[str] = RESUMABLE) -> bool:
    """Make this process the one driving the run, if it is in one of `from_states`. False: it is not
    (someone else is driving it, or it is in another state)."""
    get_run(store, run_id)  # turns a dead `running` row into `interrupted` first
    with store.begin() as conn:
        current = conn.execute(select(runs.c.summary).where(runs.c.id == run_id)).scalar() or {}
        moved = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.state.in_(list(from_states)))
            .values(state=RUNNING, pid=os.getpid(), error=None, updated_at=utcnow(),
                    summary={**current, "host": socket.gethostname()})
        ).rowcount
    return moved == 1


def find_run(store: Store, run_id: str) -> RunRow | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
    return _reconcile(store, _row(row)) if row is not None else None


def get_run(store: Store, run_id: str) -> RunRow:
    found = find_run(store, run_id)
    if found is None:
        raise NotFoundError(f"no agent run {run_id!r} (see `flywheel runs`)")
    return found


def list_runs(store: Store, limit: int = 50, states: Iterable[str] | None = None) -> list[RunRow]:
    query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id).limit(limit)
    wanted = list(states or ())
    if wanted:
        query = query.where(runs.c.state.in_(wanted))
    with store.engine.connect() as conn:
        rows = conn.execute(query).fetchall()
    return [_reconcile(store, _row(r)) for r in rows]


def waiting_on(store: Store, version: str) -> list[RunRow]:
    """Runs whose pending approval is about `version`, oldest first."""
    found = [r for r in list_runs(store, limit=500) if r.pending and r.pending.get("version") == version and r.state in (WAITING, INTERRUPTED, FAILED)]
    return sorted(found, key=lambda r: r.created_at)


# --- is the driving process alive? ---------------------------------------------------------------------------


def process_alive(pid: int | None, host: str | None) -> bool | None:
    """True/False for a process on this host; None when it cannot be told (another host, no pid)."""
    if pid is None or (host and host != socket.gethostname()):
        return None
    return pid_alive(pid)


def _reconcile(store: Store, run: RunRow) -> RunRow:
    if run.state != RUNNING or process_alive(run.pid, run.host) is not False:
        return run
    note = f"the process driving it (pid {run.pid}) is gone; continue with `flywheel resume {run.id}`"
    with store.begin() as conn:
        conn.execute(
            update(runs).where(runs.c.id == run.id, runs.c.state == RUNNING, runs.c.pid == run.pid)
            .values(state=INTERRUPTED, error=note, updated_at=utcnow())
        )
        row = conn.execute(select(runs).where(runs.c.id == run.id)).one()
    return _row(row)


# --- effects: what was done once must not be done twice -----------------------------------------------------


def effect_result(store: Store, key: str) -> dict[str, Any] | None:
    """The result recorded under an effect key, or None when that effect has not happened."""
    with store.engine.connect() as conn:
        return conn.execute(select(effects.c.result).where(effects.c.key == key)).scalar()


def record_effect(store: Store, key: str, kind: str, result: dict[str, Any] | None = None) -> bool:
    """Record that the effect `key` happened. False when it was recorded already (by anyone): then the
    caller must not act again. (The tool node keys tool calls; the Slack app can key its messages.)"""
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    stmt = (dialect.insert(effects).values(key=key[:200], kind=kind, result=result, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["key"]).returning(effects.c.key))
    with store.begin() as conn:
        # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING
        return conn.execute(stmt).first() is not None
