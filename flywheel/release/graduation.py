"""Sample graduation: what a promotion means for the samples it was trained on.

After a version is promoted, its evaluation says per problem sample whether the problem still occurs:
  problem sample, fixed            -> candidate_baseline (it must stay fixed from now on)
  problem sample, still failing    -> stays a problem sample, weight x graduation.unresolved_weight_factor
                                      (floored at graduation.min_weight): a sample that training keeps
                                      failing to fix is often mislabelled or unlearnable, so it should not
                                      dominate the next dataset
  baseline sample, failing again   -> back to problem (a regression the next cycle must fix)
A person then confirms candidates: candidate_baseline -> secondary_baseline, and a second confirmation
secondary_baseline -> core_baseline. Promotion to core is always a person's call (no automatic
"stable over N promotions" rule): core samples are replayed with the highest weight forever.

Every move is a tier_moves row (via flywheel.store.failures.move_tier) whose `version` is the version
that caused it and whose reason starts with what caused it ("graduate:", "pool:", "revert:", "confirm:"),
which is what makes each step idempotent and a rollback reversible. The reads are in
flywheel.store.tiers.

The per-sample outcomes come from the caller (the eval runner's per-item results on the problem and
baseline sets), so graduation is a decision over records plus store writes, not an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection

from flywheel.errors import NotFoundError, UserInputError
from flywheel.evals.metrics import outcome_passed
from flywheel.records import Failure, Record, SampleTier
from flywheel.release import registry
from flywheel.release.records import ModelVersion
from flywheel.settings import Settings
from flywheel.store import datasets as dataset_repo
from flywheel.store import tiers
from flywheel.store import versions as version_store
from flywheel.store.db import Store
from flywheel.store.failures import get_failures, move_tier
from flywheel.store.tiers import TierMove

GRADUATE, POOL, REVERT, CONFIRM = "graduate:", "pool:", "revert:", "confirm:"
BASELINE_TIERS = (SampleTier.CANDIDATE, SampleTier.SECONDARY, SampleTier.CORE)
CONFIRM_NEXT = {SampleTier.CANDIDATE: SampleTier.SECONDARY, SampleTier.SECONDARY: SampleTier.CORE}


class GraduationResult(Record):
    version: str
    graduated: list[str] = []  # problem -> candidate_baseline
    down_weighted: dict[str, float] = {}  # still failing: failure id -> new weight
    regressed: list[str] = []  # baseline -> problem
    unchanged: list[str] = []  # baselines that stayed fixed
    skipped: dict[str, str] = {}  # failure id -> why nothing was done


def graduate(
    store: Store,
    settings: Settings,
    version: str,
    *,
    fixed: Mapping[str, bool] | None = None,
    still_failing: Callable[[Failure], bool] | None = None,
    actor: str,
) -> GraduationResult:
    """Move samples between tiers by how the promoted `version` does on them.

    Pass exactly one of `fixed` (failure id -> True when the version no longer shows the problem; the
    ids given are the ones decided on) or `still_failing` (called on every problem-tier failure outside
    the duplicate/not_failure statuses). The callable runs before any write, outside the transaction.
    Running it twice for the same version moves nothing the second time."""
    if (fixed is None) == (still_failing is None):
        raise UserInputError("graduate needs exactly one of `fixed` (id -> bool) or `still_failing` (failure -> bool)")
    result = GraduationResult(version=version)
    with store.engine.connect() as conn:
        target = registry.get_version(conn, version)
        champion = version_store.alias_map(conn).get(registry.CHAMPION, (None, None))[0]
        if champion != target.id:
            raise UserInputError(f"{version} is not the champion ({champion or 'none'}); samples graduate after a promotion")
        if fixed is not None:
            outcomes = _check_outcomes(fixed)
            found = get_failures(conn, ids=list(outcomes))
            for missing in sorted(set(outcomes) - {f.id for f in found}):
                result.skipped[missing] = "no such failure"
        else:
            ids = tiers.problem_pool_ids(conn)
            found = get_failures(conn, ids=ids) if ids else []
    if still_failing is not None:
        outcomes = {f.id: not still_failing(f) for f in found}

    factor, floor = settings.graduation.unresolved_weight_factor, settings.graduation.min_weight
    with store.begin() as conn:
        version_store.release_lock(conn)
        done = tiers.moved_by(conn, version, GRADUATE, [f.id for f in found])
        for failure in get_failures(conn, ids=[f.id for f in found]):  # re-read: the tier may have moved since
            ok = outcomes[failure.id]
            if failure.id in done:
                result.skipped[failure.id] = f"already graduated with {version}"
            elif failure.tier == SampleTier.PROBLEM and ok:
                move_tier(conn, failure.id, SampleTier.CANDIDATE, actor, f"{GRADUATE} {version} fixes it", version)
                result.graduated.append(failure.id)
            elif failure.tier == SampleTier.PROBLEM:
                weight = round(max(floor, failure.weight * factor), 6)
                move_tier(
                    conn,
                    failure.id,
                    SampleTier.PROBLEM,
                    actor,
                    f"{GRADUATE} {version} still fails it (weight {failure.weight:g} -> {weight:g})",
                    version,
                    weight=weight,
                )
                result.down_weighted[failure.id] = weight
            elif ok:
                result.unchanged.append(failure.id)
            else:
                move_tier(conn, failure.id, SampleTier.PROBLEM, actor, f"{GRADUATE} {version} fails it again (was {failure.tier})", version)
                result.regressed.append(failure.id)
    return result


def _check_outcomes(fixed: Mapping[str, Any]) -> dict[str, bool]:
    for failure_id, value in fixed.items():
        if not isinstance(value, bool):
            raise UserInputError(f"outcome of {failure_id}: expected true or false, got {value!r}")
    return dict(fixed)


def confirm_baseline(store: Store, failure_ids: Sequence[str], actor: str, reason: str = "") -> list[TierMove]:
    """A person confirms graduated samples: candidate -> secondary, secondary -> core.

    All ids are checked before anything moves: an unknown id or a problem sample refuses the whole call
    with a message naming it. Core samples are already at the top and are left as they are."""
    ids = list(dict.fromkeys(failure_ids))
    if not ids:
        raise UserInputError("name at least one failure id to confirm")
    moves: list[TierMove] = []
    with store.begin() as conn:
        version_store.release_lock(conn)
        found = {f.id: f for f in get_failures(conn, ids=ids)}
        for failure_id in ids:
            if failure_id not in found:
                raise NotFoundError(f"no failure with id {failure_id!r}")
            if found[failure_id].tier == SampleTier.PROBLEM:
                raise UserInputError(f"{failure_id} is a problem sample; only candidate or secondary baselines can be confirmed")
        for failure_id in ids:
            current = found[failure_id].tier
            target = CONFIRM_NEXT.get(current)
            if target is None:
                continue  # already core
            why = f"{CONFIRM} {reason}".strip() if reason else f"{CONFIRM} confirmed by {actor}"
            move_tier(conn, failure_id, target, actor, why)
            moves.append(TierMove(failure_id=failure_id, from_tier=str(current), to_tier=str(target), reason=why))
    return moves


# --- undoing a cycle: used by approvals.reject and approvals.rollback ----------------------------------------


def dataset_failure_ids(conn: Connection, dataset_id: str | None) -> tuple[list[str], str]:
    """The failure ids a version was trained on, from its dataset's manifest (`failure_ids`), and a note
    saying why the list is empty when it is."""
    if not dataset_id:
        return [], "the version records no dataset"
    manifest = dataset_repo.manifest(conn, dataset_id)
    if manifest is None:
        return [], f"dataset {dataset_id} is not in the store"
    ids = manifest.get("failure_ids") if isinstance(manifest, dict) else None
    if not isinstance(ids, list):
        return [], f"the manifest of dataset {dataset_id} lists no failure_ids"
    return [str(i) for i in ids], ""


def return_to_pool(conn: Connection, version: ModelVersion, actor: str, reason: str) -> tuple[list[str], str]:
    """After a rejection: the problem samples of the version's dataset stay in the problem pool for the
    next cycle, each with a tier_moves row saying so (once per version). Baseline samples that were only
    replayed in the dataset keep their tier. Anything that graduated because of the version is reverted.
    Returns the problem-sample ids and a note when the dataset's samples could not be found."""
    revert_graduation(conn, version.id, actor, reason)
    ids, note = dataset_failure_ids(conn, version.dataset_id)
    if not ids:
        return [], note
    already = tiers.moved_by(conn, version.id, POOL, ids)
    returned: list[str] = []
    for failure in get_failures(conn, ids=ids):
        if failure.tier != SampleTier.PROBLEM:
            continue
        if failure.id not in already:
            move_tier(conn, failure.id, SampleTier.PROBLEM, actor, f"{POOL} {reason}", version.id)
        returned.append(failure.id)
    return returned, ""


def revert_graduation(conn: Connection, version: str, actor: str, reason: str) -> list[str]:
    """Undo the tier changes graduation made because of `version` (after it was rolled back): each sample
    still in the tier that version moved it to goes back to the tier it came from. Down-weights stay:
    the sample did fail with that version, which is still worth knowing."""
    return revert_moves(conn, version, GRADUATE, actor, reason)


def revert_moves(conn: Connection, version: str, prefix: str, actor: str, reason: str) -> list[str]:
    """Undo the tier changes caused by `version` whose reason starts with `prefix`; a sample someone
    moved since is left where it is."""
    last = {move.failure_id: move for move in tiers.tier_changes_by(conn, version, prefix)}
    if not last:
        return []
    current = {f.id: f.tier for f in get_failures(conn, ids=list(last))}
    reverted: list[str] = []
    for failure_id, move in last.items():
        if current.get(failure_id) == move.to_tier:
            move_tier(conn, failure_id, SampleTier(move.from_tier), actor, f"{REVERT} {reason}", version)
            reverted.append(failure_id)
    return reverted


def outcomes_from_report(report: Mapping[str, Any]) -> dict[str, bool]:
    """failure id -> fixed, from an eval report's per-item outcomes of the candidate on the problem and
    baseline sets (their item ids are failure ids; test-set items are not samples and are ignored).

    Accepts the report.json document `flywheel eval` writes (`candidate_metrics` -> set -> `outcomes`)
    or a plain {failure_id: bool} mapping. "Fixed" is the eval's own success: the judge found nothing in
    the new answer and it was generated, which is stricter than "this one problem type is gone"."""
    if report and all(isinstance(v, bool) for v in report.values()):
        return dict(report)
    per_set = report.get("candidate_metrics")
    if not isinstance(per_set, Mapping):
        raise UserInputError("not an eval report: no candidate_metrics")
    found: dict[str, bool] = {}
    for set_name in ("problem", "baseline"):
        metrics = per_set.get(set_name)
        for outcome in metrics.get("outcomes", []) if isinstance(metrics, Mapping) else []:
            if isinstance(outcome, Mapping) and "id" in outcome:
                found[str(outcome["id"])] = outcome_passed(outcome)
    if not found:
        raise UserInputError("the report holds no per-item outcomes for the problem or baseline set")
    return found
