"""Canary releases: a candidate serves a sticky share of users while its problem rates are watched.

`start_canary` points the `canary` alias at a gate-passed candidate with a traffic share; the gateway
reads `registry.current_routing` and routes users to it. `observe_canary` compares, since the canary
started, the problem rates of the interactions each version served (interactions.model_version):

  an interaction counts as a failure when a capture rule caught it (a failures row) and the judge has
  not cleared it; its problem type is its latest verdict's (a near-duplicate uses its cluster
  representative's verdict), or "unjudged" while no verdict exists.

Once both versions have served `canary.min_requests`, a canary whose rate of any problem type, or whose
overall failure rate, exceeds the champion's by more than `canary.harm_margin` (absolute) is rolled
back at once: the alias is removed, the version becomes rolled_back and a canary_events row says why.
Every observation is recorded in canary_events, so the history of a canary can be read back. The SQL,
events and window queries alike, is in flywheel.store.canary_events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection

from flywheel.errors import PolicyViolation, UserInputError
from flywheel.evals.metrics import Rate
from flywheel.records import Record
from flywheel.release import registry
from flywheel.release.records import AliasSwitch, VersionStatus
from flywheel.release.registry import CANARY, CHAMPION, CLOSED
from flywheel.settings import Settings
from flywheel.store import canary_events as events
from flywheel.store import failures as failure_repo
from flywheel.store import versions as version_store
from flywheel.store.db import Store

OVERALL = "overall"  # the harm check on the overall failure rate
UNJUDGED = "unjudged"  # caught by a capture rule, no verdict yet
EPS = 1e-12

CanaryState = Literal["none", "collecting", "healthy", "rolled_back"]


class ArmStats(Record):
    """What one version's traffic looked like since the canary started."""

    version: str
    requests: int
    failure_rate: Rate
    problem_rates: dict[str, Rate] = {}


class Harm(Record):
    problem_type: str  # a problem type, "unjudged", or "overall"
    champion_rate: float
    canary_rate: float
    margin: float

    @property
    def sentence(self) -> str:
        return f"{self.problem_type}: canary {self.canary_rate:.3f} vs champion {self.champion_rate:.3f} (margin {self.margin:g})"


class CanaryStatus(Record):
    state: CanaryState
    version: str | None = None
    champion: str | None = None
    share: float = 0.0
    started_at: datetime | None = None
    min_requests: int = 0
    harm_margin: float = 0.0
    champion_stats: ArmStats | None = None
    canary_stats: ArmStats | None = None
    harms: list[Harm] = []
    reason: str = ""


# --- starting and stopping ---------------------------------------------------------------------------------


def start_canary(
    store: Store, version: str, share: float | None = None, *, actor: str = "flywheel", effect_key: str | None = None
) -> AliasSwitch:
    """Serve `version` to `share` of users (default canary.share). It must have passed its gate.

    Starting the running canary again with the same share changes nothing; with another share, the
    share changes (the observation window keeps its start). Another version's canary must be stopped
    first."""
    share = store.settings.canary.share if share is None else share
    if not 0 < share < 1:
        raise UserInputError(f"canary share must be between 0 and 1 (exclusive), got {share}")
    with store.begin() as conn:
        version_store.release_lock(conn)
        if effect_key is not None and (earlier := version_store.recorded_switch(conn, effect_key)) is not None:
            return earlier
        target = registry.get_version(conn, version)
        current = version_store.alias_map(conn)
        champion = current.get(CHAMPION, (None, None))[0]
        if champion is None:
            raise UserInputError("there is no champion to compare a canary with")
        if champion == version:
            raise UserInputError(f"{version} is the champion already")
        if target.status in CLOSED:
            raise PolicyViolation(f"{version} is {target.status}; it cannot serve a canary")
        if target.gate_passed is not True:
            raise PolicyViolation(f"{version} has not passed its promotion gate; a canary needs a passed gate")
        running, running_share = current.get(CANARY, (None, None))
        if running is not None and running != version:
            raise UserInputError(f"canary {running} is running; stop it first (flywheel canary stop)")
        if running == version and running_share == share and (last := version_store.last_switch(conn, CANARY)) is not None:
            return last
        key = effect_key or registry.effect_key("canary", version, share, version_store.epoch(conn))
        switch = registry.set_alias(conn, CANARY, version, actor=actor, reason=f"canary at {share:.0%}", key=key, share=share)
        version_store.set_status(conn, version, VersionStatus.CANARY)
        kind = "share" if running == version else "started"
        events.add_event(conn, version, kind, {"share": share, "champion": champion, "actor": actor, "effect_key": key})
        return switch


def stop_canary(store: Store, actor: str, reason: str = "") -> AliasSwitch:
    """End the running canary without judging it: the version goes back to candidate (it may still be
    approved and promoted)."""
    with store.begin() as conn:
        version_store.release_lock(conn)
        running = version_store.alias_map(conn).get(CANARY, (None, None))[0]
        if running is None:
            raise UserInputError("no canary is running")
        key = registry.effect_key("canary-stop", running, version_store.epoch(conn))
        switch = registry.set_alias(conn, CANARY, None, actor=actor, reason=reason or "canary stopped", key=key)
        version_store.set_status(conn, running, VersionStatus.CANDIDATE)
        events.add_event(conn, running, "ended", {"actor": actor, "reason": reason or "stopped"})
        return switch


# --- watching ----------------------------------------------------------------------------------------------


def arm_stats(conn: Connection, versions: Sequence[str], since: datetime) -> dict[str, ArmStats]:
    """Requests, failure rate and per-problem-type rates of each version's interactions since `since`."""
    requests = events.requests_by_version(conn, versions, since)
    failing = events.failing_interactions(conn, versions, since)
    judged = {r.failure_id for r in failing} | {r.cluster_id for r in failing if r.cluster_id}
    verdict_of = failure_repo.newest_verdicts(conn, sorted(judged))
    failed: Counter[str] = Counter()
    by_type: dict[str, Counter[str]] = {v: Counter() for v in versions}
    for row in failing:
        verdict = verdict_of.get(row.failure_id) or (verdict_of.get(row.cluster_id) if row.cluster_id else None)
        if verdict is not None and verdict.status == "judged" and not verdict.is_failure:
            continue  # the judge cleared it
        kind = (verdict.problem_type or "unspecified") if verdict is not None and verdict.status == "judged" else UNJUDGED
        failed[row.model_version] += 1
        by_type[row.model_version][kind] += 1
    out = {}
    for version in versions:
        n = requests.get(version, 0)
        out[version] = ArmStats(
            version=version,
            requests=n,
            failure_rate=Rate.of(failed[version], n),
            problem_rates={t: Rate.of(c, n) for t, c in sorted(by_type[version].items())},
        )
    return out


def find_harms(champion: ArmStats, canary: ArmStats, margin: float) -> list[Harm]:
    """Problem types (and the overall failure rate) where the canary is worse by more than `margin`."""
    pairs = [(OVERALL, champion.failure_rate.rate, canary.failure_rate.rate)]
    for problem_type in sorted(set(champion.problem_rates) | set(canary.problem_rates)):
        before = champion.problem_rates.get(problem_type)
        after = canary.problem_rates.get(problem_type)
        pairs.append((problem_type, before.rate if before else 0.0, after.rate if after else 0.0))
    return [
        Harm(problem_type=name, champion_rate=round(before, 6), canary_rate=round(after, 6), margin=margin)
        for name, before, after in pairs
        if after - before > margin + EPS
    ]


def observe_canary(store: Store, settings: Settings, actor: str = "canary-monitor") -> CanaryStatus:
    """Compare the running canary with the champion, record the observation, and roll the canary back
    automatically when it harms (see the module docstring). State "none" when no canary runs."""
    cfg = settings.canary
    with store.engine.connect() as conn:
        current = version_store.alias_map(conn)
        version, share = current.get(CANARY, (None, None))
        champion = current.get(CHAMPION, (None, None))[0]
        if version is None or champion is None:
            return CanaryStatus(state="none", champion=champion, reason="no canary is running")
        started = events.last_started(conn, version)
        if started is None:  # the alias was set by hand (switch_alias): the window starts at the alias change
            changed = version_store.alias_updated_at(conn, CANARY)
            if changed is None:  # removed since it was read
                return CanaryStatus(state="none", champion=champion, reason="no canary is running")
            started = (0, changed)
        stats = arm_stats(conn, [champion, version], started[1])
    status = CanaryStatus(
        state="collecting",
        version=version,
        champion=champion,
        share=share or 0.0,
        started_at=started[1],
        min_requests=cfg.min_requests,
        harm_margin=cfg.harm_margin,
        champion_stats=stats[champion],
        canary_stats=stats[version],
    )
    if min(stats[champion].requests, stats[version].requests) < cfg.min_requests:
        status.reason = (
            f"collecting: champion {stats[champion].requests}, canary {stats[version].requests} requests of {cfg.min_requests} each"
        )
    else:
        status.harms = find_harms(stats[champion], stats[version], cfg.harm_margin)
        status.state = "rolled_back" if status.harms else "healthy"
        status.reason = (
            "; ".join(h.sentence for h in status.harms) if status.harms else "no problem rate above the champion's by more than the margin"
        )
    with store.begin() as conn:
        version_store.release_lock(conn)
        # Someone may have promoted, stopped or restarted the canary while we counted: then this
        # observation is about a canary that no longer runs, and it changes nothing.
        if (
            version_store.alias_map(conn).get(CANARY, (None, None))[0] != version
            or (events.last_started(conn, version) or (0,))[0] != started[0]
        ):
            status.state, status.reason, status.harms = ("none", "the canary changed while it was observed; observe again", [])
            return status
        events.add_event(conn, version, "observation", status.model_dump(mode="json"))
        if status.state == "rolled_back":
            key = registry.effect_key("canary-harm", version, started[0])
            registry.set_alias(conn, CANARY, None, actor=actor, reason=f"canary harmed: {status.reason}", key=key)
            version_store.set_status(conn, version, VersionStatus.ROLLED_BACK)
            events.add_event(
                conn, version, "rolled_back", {"reason": status.reason, "harms": [h.model_dump() for h in status.harms], "actor": actor}
            )
    return status


def canary_history(store: Store, version: str, limit: int = 100) -> list[dict[str, Any]]:
    """A canary's recorded events, oldest first."""
    with store.engine.connect() as conn:
        return [event.model_dump() for event in events.events(conn, version, limit)]
