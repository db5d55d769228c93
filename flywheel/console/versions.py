"""The overview and the versions page: who serves, what the canary shows, how the champions did, rollback.

Numbers per version come from what is already recorded: each version's eval report (its candidate side,
the fixed test set first) and the champion history that flywheel.evals.history reads from the alias
events, drawn with the report's own line chart. Nothing here observes the canary (an observation is
recorded and may roll it back): the page shows the newest recorded observation.

Rollback goes through flywheel.release.approvals.rollback after the same approver check as a decision
(channel "web"), with an effect key bound to the champion and previous version the page showed: a double
submit rolls back once, and a page shown before someone else changed the champion is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup

from flywheel.agent import runner
from flywheel.console.web import Console
from flywheel.errors import UserInputError
from flywheel.evals.history import champion_history, history_chart
from flywheel.evals.report import SET_ORDER
from flywheel.records import Record
from flywheel.release import approvals, registry
from flywheel.release.canary import canary_history
from flywheel.release.registry import VersionRow

RECENT_RUNS = 8


class Numbers(Record):
    version: str
    set: str
    task_success: float
    problem_rates: dict[str, float]


@dataclass
class Overview:
    """What the page shows (a dataclass: the charts are Markup, which pydantic cannot hold)."""

    champion: str | None
    previous: str | None
    canary: str | None
    share: float
    canary_event: dict[str, Any] | None  # the newest recorded canary event (an observation's evidence)
    history: Markup | None
    numbers: list[Numbers]  # per version with a report, newest first
    problem_types: list[str]
    runs: list[dict[str, Any]]


def overview(console: Console) -> Overview:
    store = console.ctx.store
    versions = registry.list_versions(store)
    by_alias = {alias: row.id for row in versions for alias in row.aliases}
    canary = by_alias.get(registry.CANARY)
    event = None
    if canary:
        recent = canary_history(store, canary, limit=20)
        event = recent[-1] if recent else None
    numbers = _numbers(store, versions)
    runs = [
        {"id": r.id, "state": r.state, "trigger": r.trigger, "created_at": r.created_at, "cycle": (r.summary or {}).get("last_message", "")}
        for r in runner.list_runs(console.ctx, limit=RECENT_RUNS)
    ]
    return Overview(
        champion=by_alias.get(registry.CHAMPION),
        previous=by_alias.get(registry.PREVIOUS),
        canary=canary,
        share=registry.current_routing(store).share if canary else 0.0,
        canary_event=event,
        history=history_chart(champion_history(store)),
        numbers=numbers,
        problem_types=sorted({t for n in numbers for t in n.problem_rates}),
        runs=runs,
    )


def _numbers(store: Any, versions: list[VersionRow]) -> list[Numbers]:
    out = []
    for row in versions:
        target = registry.resolve(store, row.id)
        document = _read(target.eval_report_path)
        if document is None:
            continue
        metrics = document.get("candidate_metrics") or {}
        name = next((n for n in SET_ORDER if (metrics.get(n) or {}).get("size")), None)
        if name is None:
            continue
        found = metrics[name]
        out.append(
            Numbers(
                version=row.id,
                set=name,
                task_success=float(found["task_success"]["rate"]),
                problem_rates={t: float(r["rate"]) for t, r in (found.get("problem_rates") or {}).items()},
            )
        )
    return out


def _read(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a moved report leaves a gap on the overview, not an error
    return document if isinstance(document, dict) else None


# --- versions and rollback -----------------------------------------------------------------------------------


def rollback_key(champion: str, previous: str) -> str:
    return registry.effect_key("web-rollback", champion, previous)


def rollback(console: Console, user: str, champion: str, previous: str, reason: str) -> str:
    """Roll the champion the page showed back to the previous one it showed (once), or say why not."""
    approvals.check_approver(console.settings, user, "web")
    if not reason.strip():
        raise UserInputError("a rollback needs a reason")
    with console.decide_lock:
        store = console.ctx.store
        now = (registry.alias_target(store, registry.CHAMPION), registry.alias_target(store, registry.PREVIOUS))
        done_before = now == (previous, None)  # what this rollback leaves behind: maybe it happened already
        if now != (champion, previous) and not done_before:
            raise UserInputError(f"the champion changed since the page was shown (now {now[0]}); look again before rolling back")
        done = approvals.rollback(store, actor=user, reason=reason, effect_key=rollback_key(champion, previous))
    if done.replayed:
        return f"{champion} was already rolled back; {done.champion} serves. Nothing changed."
    return f"rolled back {done.rolled_back}; champion is {done.champion}" + (
        f"; {len(done.reverted_samples)} samples went back to their tier" if done.reverted_samples else ""
    )
