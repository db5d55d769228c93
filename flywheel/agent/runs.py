"""Agent runs (the `runs` table, flywheel.store.runs): one row per agent run (its id is also the LangGraph thread id), with its state.

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

from flywheel.errors import NotFoundError
from flywheel.proc import pid_alive
from flywheel.records import Record, utcnow
from flywheel.store import runs as run_repo
from flywheel.store.db import Store

RUNNING, WAITING, DONE, STOPPED, FAILED, INTERRUPTED = ("running", "waiting_approval", "done", "stopped", "failed", "interrupted")
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


def _row(values: dict[str, Any]) -> RunRow:
    values["summary"] = values.get("summary") or {}
    return RunRow.model_validate(values)


def create_run(store: Store, run_id: str, trigger: str, policy: str) -> RunRow:
    now = utcnow()
    run_repo.insert_run(
        store,
        id=run_id,
        trigger=trigger,
        state=RUNNING,
        policy=policy,
        summary={"host": socket.gethostname()},
        pid=os.getpid(),
        created_at=now,
        updated_at=now,
    )
    return get_run(store, run_id)


def update_run(store: Store, run_id: str, **values: Any) -> None:
    """Set fields of a run. `summary` is merged into the stored one (the host stays)."""
    run_repo.update_run(store, run_id, **values)


def claim_run(store: Store, run_id: str, from_states: Iterable[str] = RESUMABLE) -> bool:
    """Make this process the one driving the run, if it is in one of `from_states`. False: it is not
    (someone else is driving it, or it is in another state)."""
    get_run(store, run_id)  # turns a dead `running` row into `interrupted` first
    return run_repo.claim_run(store, run_id, from_states, {"host": socket.gethostname()}, state=RUNNING, pid=os.getpid(), error=None)


def find_run(store: Store, run_id: str) -> RunRow | None:
    row = run_repo.find_run(store, run_id)
    return _reconcile(store, _row(row)) if row is not None else None


def get_run(store: Store, run_id: str) -> RunRow:
    found = find_run(store, run_id)
    if found is None:
        raise NotFoundError(f"no agent run {run_id!r} (see `flywheel runs`)")
    return found


def list_runs(store: Store, limit: int = 50, states: Iterable[str] | None = None) -> list[RunRow]:
    return [_reconcile(store, _row(r)) for r in run_repo.list_runs(store, limit, list(states or ()))]


def waiting_on(store: Store, version: str) -> list[RunRow]:
    """Runs whose pending approval is about `version`, oldest first."""
    found = [
        r
        for r in list_runs(store, limit=500)
        if r.pending and r.pending.get("version") == version and r.state in (WAITING, INTERRUPTED, FAILED)
    ]
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
    return _row(run_repo.set_if(store, run.id, RUNNING, run.pid, state=INTERRUPTED, error=note))


# --- effects: what was done once must not be done twice -----------------------------------------------------


def effect_result(store: Store, key: str) -> dict[str, Any] | None:
    """The result recorded under an effect key, or None when that effect has not happened."""
    return run_repo.effect_result(store, key)


def record_effect(store: Store, key: str, kind: str, result: dict[str, Any] | None = None) -> bool:
    """Record that the effect `key` happened. False when it was recorded already (by anyone): then the
    caller must not act again. (The tool node keys tool calls; the Slack app can key its messages.)"""
    return run_repo.record_effect(store, key, kind, result)
