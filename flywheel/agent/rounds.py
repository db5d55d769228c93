"""Online rounds: an improvement cycle that starts because enough new verified samples have arrived.

`daemon.round_min_verified` (0: off) sets how many. A sample is what `pipeline_status` counts as
`verified_problem_samples` (a failure in the problem tier whose correction passed verification); it
*arrived* when its newest verified correction was written. The daemon counts the ones that arrived
after the last round's watermark every `daemon.round_poll_s` and, once there are enough and no other
autonomous run is being driven, starts the same supervisor run a cron firing starts (trigger `round`):
snapshot, training, evaluation on the fixed test set against the champion, canary and approval.

The marker of a round is a row of the `effects` table (kind `round`, key `round:<run id>`), written
before the run starts, so a restarted daemon (or a second one on the same store) does not start a
round again for the same samples. A marker counts only once its run exists: a start refused because
another run began meanwhile leaves a marker without a run, and the samples stay due.

The watermark is the round's start; when the round ends having built its training snapshot, it moves
to the moment of that snapshot. Samples the round's own first steps verified (it triages, judges and
corrects new logs before it builds the snapshot) were trained on, so they are not new for the next
round; samples verified by others while it trains are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flywheel.agent import runs
from flywheel.agent.runner import RunOutcome, new_run_id, run_in_progress, start_run
from flywheel.agent.state import CYCLE_REQUEST
from flywheel.context import Context
from flywheel.errors import FlywheelError, UserInputError
from flywheel.records import FailureStatus, Record, SampleTier
from flywheel.store import datasets as dataset_repo
from flywheel.store import failures as failure_repo
from flywheel.store import runs as run_repo
from flywheel.tools.failures import pipeline_status

log = logging.getLogger("flywheel.daemon")

TRIGGER = "round"
MARKER_KIND = "round"
MARKER_PREFIX = "round:"


class RoundMarker(Record):
    """The last round: its run and the watermark after which verified samples count as new."""

    run_id: str
    started_at: datetime
    since: datetime  # the start, or the moment of the round's snapshot once it has one
    samples: int  # new verified samples when it fired


class RoundStatus(Record):
    """What `flywheel schedules` shows and the daemon decides from."""

    min_verified: int  # daemon.round_min_verified; 0: rounds are off
    poll_s: float
    verified: int  # verified samples in the problem tier now (pipeline_status.verified_problem_samples)
    new: int  # of those, arrived after the last round's watermark (all of them before the first round)
    last_round: RoundMarker | None = None
    running: str | None = None  # an autonomous run being driven now: a due round waits for it
    awaiting_decision: list[str] = []  # versions waiting for a person: a round could not train, so it waits

    @property
    def enough(self) -> bool:
        return self.min_verified > 0 and self.new >= self.min_verified

    @property
    def waits_for(self) -> str | None:
        """Why a due round does not start now, or None."""
        if self.running:
            return f"run {self.running} is in progress"
        if self.awaiting_decision:
            return f"{', '.join(self.awaiting_decision)} waits for a person's decision"
        return None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite hands back UTC without its zone


# --- the marker ---------------------------------------------------------------------------------------------------


def _marker(effect: run_repo.Effect) -> RoundMarker:
    started = _aware(effect.created_at)
    since = effect.result.get("since")
    return RoundMarker(
        run_id=str(effect.result.get("run_id") or effect.key[len(MARKER_PREFIX) :]),
        started_at=started,
        since=_aware(datetime.fromisoformat(since)) if since else started,
        samples=int(effect.result.get("samples", 0)),
    )


def last_round(ctx: Context) -> RoundMarker | None:
    """The newest round whose run exists (a marker whose start was refused is passed over)."""
    found = sorted(run_repo.effects_of_kind(ctx.store, MARKER_KIND), key=lambda e: e.created_at, reverse=True)
    for effect in found:
        marker = _marker(effect)
        if runs.find_run(ctx.store, marker.run_id) is not None:
            return marker
    return None


def record_round(ctx: Context, run_id: str, samples: int) -> None:
    """The marker of a round about to start as `run_id`."""
    run_repo.record_effect(ctx.store, MARKER_PREFIX + run_id, MARKER_KIND, {"run_id": run_id, "samples": samples})


def close_round(ctx: Context, run_id: str) -> RoundMarker | None:
    """Move the round's watermark to the moment of the training snapshot its run built, if it built one
    after it started (a snapshot with the same content built earlier keeps its first date: then the
    start stays the watermark). Returns the marker as it is now."""
    effect = run_repo.get_effect(ctx.store, MARKER_PREFIX + run_id)
    if effect is None:
        return None
    marker = _marker(effect)
    dataset_id = (runs.get_run(ctx.store, run_id).summary.get("cycle") or {}).get("dataset_id")
    row = dataset_repo.find(ctx.store, str(dataset_id)) if dataset_id else None
    if row is None or _aware(row["created_at"]) <= marker.since:
        return marker
    built = _aware(row["created_at"])
    run_repo.set_effect_result(ctx.store, effect.key, {**effect.result, "since": built.isoformat()})
    return marker.model_copy(update={"since": built})


# --- counting -----------------------------------------------------------------------------------------------------


def new_verified_samples(ctx: Context, since: datetime | None) -> int:
    """Verified samples in the problem tier (the ones `verified_problem_samples` counts) whose newest
    verified correction was written after `since`; all of them when `since` is None."""
    with ctx.store.engine.connect() as conn:
        samples = failure_repo.failures_in_tiers(conn, [SampleTier.PROBLEM], FailureStatus.VERIFIED)
        if since is None:
            return len(samples)
        newest = failure_repo.newest_corrections(conn, [f.id for f in samples], verified_only=True)
    return sum(1 for c in newest.values() if _aware(c.created_at) > since)


def round_status(ctx: Context) -> RoundStatus:
    settings = ctx.settings.daemon
    status = pipeline_status(ctx)
    marker = last_round(ctx)
    # the cron jobs' guard against overlapping runs, here or in another process; the id is for the log line
    driving = None
    if run_in_progress(ctx):
        driving = next((r.id for r in runs.list_runs(ctx.store, limit=100, states=[runs.RUNNING]) if r.trigger != "chat"), "another run")
    return RoundStatus(
        min_verified=settings.round_min_verified,
        poll_s=settings.round_poll_s,
        verified=status.verified_problem_samples,
        new=new_verified_samples(ctx, marker.since if marker else None),
        last_round=marker,
        running=driving,
        awaiting_decision=status.awaiting_decision,
    )


def describe(status: RoundStatus) -> str:
    """One line for `flywheel schedules` and the daemon's log."""
    if status.min_verified <= 0:
        return "online rounds: off (set daemon.round_min_verified)"
    last = f"last round {status.last_round.run_id} at {status.last_round.started_at.isoformat()}" if status.last_round else "no round yet"
    line = (
        f"online rounds: every {status.min_verified} new verified samples (checked every {status.poll_s:g} s); "
        f"{status.new} new since the last round ({last}), {status.verified} verified in the problem tier"
    )
    if status.enough:
        line += f"; due, waiting: {status.waits_for}" if status.waits_for else "; due"
    return line


# --- one round ------------------------------------------------------------------------------------------------------


def start_round(ctx: Context, samples: int, policy: str | None, on_waiting: Callable[[Any], Any] | None = None) -> RunOutcome | None:
    """Record the marker and drive one round to its end or its approval (posted with `on_waiting`).
    Returns the RunOutcome, or None when it did not start or failed: the reason is logged, as the
    daemon's worker thread has nobody to raise to. A start refused because another process began a run
    between the daemon's check and this start leaves a marker without a run: the samples stay due."""
    run_id = new_run_id()
    record_round(ctx, run_id, samples)
    message = f"{CYCLE_REQUEST} This is an online round: {samples} new verified samples arrived since the last round."
    try:
        outcome = start_run(ctx, TRIGGER, policy, message=message, run_id=run_id)
    except UserInputError as exc:
        log.info("round: not started: %s", exc)
        return None
    except FlywheelError as exc:  # the run is failed and resumable; its marker keeps the start as watermark
        log.error("round %s failed: %s", run_id, exc)
        return None
    close_round(ctx, run_id)
    log.info("round %s ended %s%s", run_id, outcome.state, f" ({outcome.error})" if outcome.error else "")
    if outcome.state == "waiting_approval" and outcome.pending is not None and on_waiting is not None:
        try:
            on_waiting(outcome.pending)
        except FlywheelError as exc:  # the Slack sync job posts it later
            log.warning("round %s waits on %s, but posting to Slack failed: %s", run_id, outcome.pending.version, exc)
    return outcome
