"""Baselines that climb: which samples a promotion proposes to move up a tier, and applying the answer.

Graduation (flywheel.release.graduation) moves a fixed problem sample to candidate_baseline by itself:
the promoted version's evaluation measured it. The tiers above weigh more: every later cycle replays a
secondary or core sample with a higher loss weight, and the gate refuses any candidate that breaks a
core one (gate.core_baseline_max_failures). So moving a sample up again is a person's call, asked on
the approval they already answer: the pending approval lists the proposed moves, approving the
promotion confirms them (unless the person declines them: `flywheel approve V --no-baselines`), and a
rejection confirms nothing.

A baseline sample is proposed for the next tier when
  1. it entered its tier in an earlier cycle: no sample moves more than one tier per cycle. Proposals
     are made before the promotion, when this cycle's graduates are still problem samples; asked
     again after the switch (a promotion node re-run after a crash), samples that entered their tier
     after `version` took over are left out;
  2. the candidate passes it in this cycle's evaluation (its item on the baseline-regression set);
  3. it stayed fixed on real traffic: no failure in its cluster (triage's near-duplicates of it) was
     served by any version that has been champion since it entered its tier, nor by the candidate on
     its canary slice.
The first step (problem -> candidate_baseline) asks the same of the canary: a sample the eval calls
fixed but whose mistake the candidate repeated on its canary traffic stays a problem sample
(`fixed_on_traffic`).
candidate_baseline -> secondary_baseline -> core_baseline; core is the top.

Each confirmed move is a tier_moves row caused by the promoted version with a reason starting
"confirm:", which makes applying the answer idempotent (a re-run after a crash moves nothing twice)
and lets a rollback of that version undo it (graduation.revert_graduation reverts "graduate:" moves;
`revert_confirmations` below reverts these).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from flywheel.evals.metrics import outcome_passed
from flywheel.records import Record, SampleTier
from flywheel.release.graduation import CONFIRM, CONFIRM_NEXT, revert_moves
from flywheel.store import tiers
from flywheel.store import versions as version_store
from flywheel.store.db import Store
from flywheel.store.failures import failures_in_tiers, get_failures, move_tier

CHAMPION = "champion"


class BaselineProposal(Record):
    failure_id: str
    from_tier: str
    to_tier: str
    since: datetime  # when it entered from_tier
    intent: str | None = None


def propose(store: Store, version: str, report: Mapping[str, Any]) -> list[BaselineProposal]:
    """The baseline samples that `version`'s promotion would move up a tier (see the module docstring).
    `report` is the version's eval report (report.json's document)."""
    passed = _baseline_outcomes(report)
    with store.engine.connect() as conn:
        samples = failures_in_tiers(conn, list(CONFIRM_NEXT))
        promoted_at = version_store.alias_updated_at(conn, CHAMPION) if version_store.alias_target(conn, CHAMPION) == version else None
        entered = tiers.entered_tier_at(conn, [s.id for s in samples])
        eligible = [
            s for s in samples if passed.get(s.id) is True and s.id in entered and (promoted_at is None or entered[s.id] < promoted_at)
        ]
        recurred = _recurred(conn, eligible, entered, version)
    return [
        BaselineProposal(failure_id=s.id, from_tier=str(s.tier), to_tier=str(CONFIRM_NEXT[s.tier]), since=entered[s.id], intent=s.intent)
        for s in eligible
        if not recurred.get(s.id)
    ]


def _baseline_outcomes(report: Mapping[str, Any]) -> dict[str, bool]:
    """failure id -> the candidate passed it, from the report's baseline-regression set."""
    metrics = (report.get("candidate_metrics") or {}).get("baseline") or {}
    return {str(o["id"]): outcome_passed(o) for o in metrics.get("outcomes", []) if isinstance(o, Mapping) and "id" in o}


def _recurred(conn: Connection, samples: Sequence[Any], entered: Mapping[str, datetime], candidate: str) -> dict[str, int]:
    """Recurrences per sample on the traffic of every version that served since the sample entered its
    tier (grouped by that moment, since samples entered at different promotions)."""
    by_since: dict[datetime, list[str]] = {}
    for sample in samples:
        by_since.setdefault(entered[sample.id], []).append(sample.id)
    found: dict[str, int] = {}
    for since, ids in by_since.items():
        served_by = [*version_store.holders_since(conn, CHAMPION, since), candidate]
        found.update(tiers.recurrences(conn, ids, served_by))
    return found


def fixed_on_traffic(store: Store, version: str, fixed: Mapping[str, bool]) -> dict[str, bool]:
    """The eval's outcomes, with a sample counted as still failing when its mistake came back on the
    traffic `version` served (its canary slice): graduation then leaves it a problem sample."""
    ids = [failure_id for failure_id, ok in fixed.items() if ok]
    with store.engine.connect() as conn:
        recurred = tiers.recurrences(conn, ids, [version])
    return {failure_id: ok and not recurred.get(failure_id) for failure_id, ok in fixed.items()}


def confirm(store: Store, version: str, proposals: Sequence[BaselineProposal], actor: str) -> list[str]:
    """Move each proposed sample up one tier as the consequence of `version`'s approved promotion.
    A sample no longer in the tier it was proposed from (it regressed, or someone moved it) is left
    alone; a second call moves nothing. Returns the ids moved now."""
    ids = [p.failure_id for p in proposals]
    if not ids:
        return []
    moved: list[str] = []
    with store.begin() as conn:
        version_store.release_lock(conn)
        done = tiers.moved_by(conn, version, CONFIRM, ids)
        current = {f.id: f.tier for f in get_failures(conn, ids=ids)}
        for proposal in proposals:
            if proposal.failure_id in done or str(current.get(proposal.failure_id)) != proposal.from_tier:
                continue
            why = f"{CONFIRM} {actor} approved {version} with this sample moving up (fixed on the eval and on traffic since {proposal.since:%Y-%m-%d %H:%M})"
            move_tier(conn, proposal.failure_id, SampleTier(proposal.to_tier), actor, why, version)
            moved.append(proposal.failure_id)
    return moved


def revert_confirmations(conn: Connection, version: str, actor: str, reason: str) -> list[str]:
    """Undo the confirmations applied with `version` (after it was rolled back), as
    graduation.revert_graduation does for its own moves."""
    return revert_moves(conn, version, CONFIRM, actor, reason)


def summary(proposals: Sequence[BaselineProposal]) -> str:
    """One line for the approval prompt and the Slack message."""
    if not proposals:
        return ""
    up = {tier: sum(1 for p in proposals if p.to_tier == tier) for tier in (str(SampleTier.SECONDARY), str(SampleTier.CORE))}
    parts = [f"{n} to {tier}" for tier, n in up.items() if n]
    return (
        f"approving also moves {len(proposals)} baseline sample(s) up a tier ({', '.join(parts)}); "
        "`flywheel approve VERSION --no-baselines` promotes without them"
    )
