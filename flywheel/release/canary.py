"""Canary releases: a candidate serves a sticky share of users while its problem rates are watched.

`start_canary` points the `canary` alias at a gate-passed candidate with a traffic share; the gateway
reads `registry.current_routing` and routes users to it. `observe_canary` compares, since the canary
started, the problem rates of the interactions each version served (interactions.model_version):

  an interaction counts as a failure when a capture rule caught it (a failures row) and the judge has
  not cleared it; its problem type is its latest verdict's (a near-duplicate uses its cluster
  representative's verdict), or "unjudged" while no verdict exists.

No decision is taken before both versions served `canary.min_requests`. Then `canary.rule` decides:

**sequential** (the default): a mixture sequential probability ratio test for two binomial proportions,
run on every rate R (the overall failure rate, and the rate of each problem type: the taxonomy's,
"unjudged", "unspecified" and any other a verdict names; k rates in all). With x0 failures in n0
champion requests and x1 in n1 canary requests, d = p1 - p0 and m = `canary.harm_margin`:

  harm statistic     E_harm(R) = Q / max{ L(p0, p1) : p1 <= p0 }         (null: no harm)
  no-harm statistic  E_safe(R) = Q / max{ L(p0, p1) : p1 >= p0 + m }     (null: harm of m or more)

where L is the binomial likelihood of both arms and Q is L averaged over independent Jeffreys
Beta(1/2, 1/2) priors on p0 and p1 (closed form: a product of Beta functions). The canary is rolled back
("harm") as soon as E_harm(R) >= k / `canary.alpha` for some R; it is declared harmless ("no_harm") as
soon as E_safe(R) >= 1 / `canary.beta` for every R; once both versions served `canary.max_requests`
without either, the decision is "inconclusive" and the canary is kept for a person to judge. Otherwise it
continues. CanaryStatus.evidence carries the logs of both statistics for every rate and the thresholds
log(k / alpha) and log(1 / beta).

Guarantees. For any (p0, p1) in a null, the statistic is at most Q / L(p0, p1), the ratio of the Bayes
mixture's probability of the observed requests to the true one's: a non-negative martingale starting at
1, so by Ville's inequality it ever reaches c with probability at most 1/c (the sequential form of
universal inference, Wasserman, Ramdas & Balakrishnan 2020; Robbins' mixture SPRT with a composite null).
Hence, however often and whenever the canary is observed:
  - P(roll back | no rate is higher on the canary than on the champion) <= alpha (Bonferroni over k);
  - P(say no_harm | some rate is higher by m or more) <= beta.
A rise between 0 and m is the indifference zone: either decision is acceptable there. Unlike Wald's
SPRT it needs no guess of the champion's rate, and Ville's bound replaces Wald's approximate thresholds
(so the error rates are upper bounds: the real ones are lower). The harm test keeps running after
"no_harm" or "inconclusive"; a later observation can still roll back, within the same alpha.

Assumptions: each request's outcome is an independent draw with its version's rates, constant while the
canary runs; which version serves a request does not depend on that request's outcome (routing by user
id does not; the share may change); k is fixed by the taxonomy (a type outside it adds a rate after the
fact); and an outcome is final when counted: triage (and the judge) have run over the window, a failure
captured later counted as a success until then. Many requests of one user, or traffic whose mix drifts
during the canary, bend the first assumption: the floor `min_requests` is a guard, not a cure.

**fixed**: a canary whose rate of any problem type, or whose overall failure rate, exceeds the
champion's by more than `canary.harm_margin` (absolute) is rolled back. No error rate is controlled:
with a few dozen requests, noise alone exceeds a margin of a few points often.

A rolled-back canary is taken back at once: the alias is removed, the version becomes rolled_back and a
canary_events row says why. Every observation is recorded in canary_events with its evidence, so the
history of a canary can be read back, and the approval request carries the newest (`approval_evidence`).
The SQL, events and window queries alike, is in flywheel.store.canary_events.
"""

from __future__ import annotations

import math
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
from flywheel.release.sequential import log_lr_harm, log_lr_no_harm
from flywheel.settings import Settings
from flywheel.settings_sections import CanarySettings
from flywheel.store import canary_events as events
from flywheel.store import failures as failure_repo
from flywheel.store import versions as version_store
from flywheel.store.db import Store

OVERALL = "overall"  # the harm check on the overall failure rate
UNJUDGED = "unjudged"  # caught by a capture rule, no verdict yet
EPS = 1e-12


CanaryState = Literal["none", "collecting", "healthy", "rolled_back"]
CanaryDecision = Literal["harm", "no_harm", "inconclusive", "continue"]
STATE_OF: dict[str, CanaryState] = {"harm": "rolled_back", "no_harm": "healthy", "inconclusive": "healthy", "continue": "collecting"}


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


class RateTest(Record):
    """One rate (a problem type, "unjudged", or "overall") on both versions, and its two statistics."""

    name: str
    champion_failures: int
    canary_failures: int
    difference: float  # canary rate minus champion rate
    log_lr_harm: float | None = None  # log E_harm (sequential rule only)
    log_lr_no_harm: float | None = None  # log E_safe (sequential rule only)

    def points(self) -> str:
        return f"{self.name} {self.difference * 100:+.1f} pts"


class CanaryEvidence(Record):
    """What decided a canary, or why it is not decided yet: recorded with every observation, returned by
    the canary tool, and carried by the approval request (flywheel.release.decisions)."""

    rule: Literal["sequential", "fixed"]
    decision: CanaryDecision
    version: str
    champion: str
    champion_requests: int
    canary_requests: int
    min_requests: int
    max_requests: int | None = None  # sequential only
    harm_margin: float
    alpha: float | None = None
    beta: float | None = None
    rates_tested: int = 0  # k, the Bonferroni divisor of alpha
    harm_threshold: float | None = None  # log(k / alpha): a log E_harm at or above it rolls back
    no_harm_threshold: float | None = None  # log(1 / beta): every log E_safe at or above it says no harm
    deciding: RateTest | None = None  # harm: the rate that decided; otherwise the one furthest from no harm
    tests: list[RateTest] = []

    def sentence(self) -> str:
        """One line for a person: the decision, the requests, and the numbers behind it."""
        head = f"canary {self.version} vs {self.champion}: {self.decision.replace('_', ' ')}"
        seen = f"after {self.canary_requests} canary / {self.champion_requests} champion requests"
        if self.rule == "fixed":
            why = f"; {self.deciding.points()}" if self.deciding else ""
            return f"{head} (fixed rule: margin {self.harm_margin:g}, {self.min_requests} requests each) {seen}{why}"
        head = f"{head} (sequential test, alpha {self.alpha:g}, beta {self.beta:g}, margin {self.harm_margin:g}) {seen}"
        d = self.deciding
        if self.decision == "continue" and (d is None or d.log_lr_harm is None):
            return f"{head}; collecting until {self.min_requests} requests each"
        assert d is not None and d.log_lr_harm is not None and d.log_lr_no_harm is not None
        if self.decision == "harm":
            return f"{head}: {d.points()}, log LR {d.log_lr_harm:.2f} >= {self.harm_threshold:.2f}"
        if self.decision == "no_harm":
            return f"{head}: every rate's log LR against a {self.harm_margin * 100:g}-point rise >= {self.no_harm_threshold:.2f}, the lowest {d.points()} at {d.log_lr_no_harm:.2f}"
        numbers = (
            f"{d.points()}: log LR harm {d.log_lr_harm:.2f} of {self.harm_threshold:.2f}, "
            f"no harm {d.log_lr_no_harm:.2f} of {self.no_harm_threshold:.2f}"
        )
        if self.decision == "inconclusive":
            return f"{head}: inconclusive at max_requests {self.max_requests}, kept for a person; {numbers}"
        return f"{head}: {numbers}; at most {self.max_requests} requests each"


class CanaryStatus(Record):
    state: CanaryState
    version: str | None = None
    champion: str | None = None
    share: float = 0.0
    started_at: datetime | None = None
    rule: Literal["sequential", "fixed"] = "sequential"
    decision: CanaryDecision = "continue"
    min_requests: int = 0
    harm_margin: float = 0.0
    champion_stats: ArmStats | None = None
    canary_stats: ArmStats | None = None
    harms: list[Harm] = []
    evidence: CanaryEvidence | None = None
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


# --- the sequential test (see the module docstring) -------------------------------------------------------


def rate_counts(champion: ArmStats, canary: ArmStats, problem_types: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(champion failures, canary failures) of every rate the sequential test watches: overall, and each
    problem type the taxonomy names, "unjudged", "unspecified" and any other a verdict gave."""
    names = set(problem_types) | {UNJUDGED, "unspecified"} | set(champion.problem_rates) | set(canary.problem_rates)
    counts = {OVERALL: (champion.failure_rate.count, canary.failure_rate.count)}
    for name in sorted(names):
        before, after = champion.problem_rates.get(name), canary.problem_rates.get(name)
        counts[name] = (before.count if before else 0, after.count if after else 0)
    return counts


def sequential_test(
    counts: dict[str, tuple[int, int]], n0: int, n1: int, cfg: CanarySettings, *, version: str = "canary", champion: str = "champion"
) -> CanaryEvidence:
    """The decision of the sequential rule on these counts (n0 champion, n1 canary requests). Pure: the
    same counts give the same decision, whenever and however often it is asked."""
    evidence = CanaryEvidence(
        rule="sequential",
        decision="continue",
        version=version,
        champion=champion,
        champion_requests=n0,
        canary_requests=n1,
        min_requests=cfg.min_requests,
        max_requests=cfg.max_requests,
        harm_margin=cfg.harm_margin,
        alpha=cfg.alpha,
        beta=cfg.beta,
        rates_tested=len(counts),
        harm_threshold=round(math.log(len(counts) / cfg.alpha), 6),
        no_harm_threshold=round(math.log(1 / cfg.beta), 6),
    )
    if min(n0, n1) < cfg.min_requests:
        return evidence
    evidence.tests = [
        RateTest(
            name=name,
            champion_failures=x0,
            canary_failures=x1,
            difference=round(x1 / n1 - x0 / n0, 6),
            log_lr_harm=round(log_lr_harm(x0, n0, x1, n1), 6),
            log_lr_no_harm=round(log_lr_no_harm(x0, n0, x1, n1, cfg.harm_margin), 6),
        )
        for name, (x0, x1) in counts.items()
    ]
    harmful = max(evidence.tests, key=lambda t: t.log_lr_harm or 0.0)
    weakest = min(evidence.tests, key=lambda t: t.log_lr_no_harm or 0.0)
    assert evidence.harm_threshold is not None and evidence.no_harm_threshold is not None
    if (harmful.log_lr_harm or 0.0) >= evidence.harm_threshold:
        evidence.decision, evidence.deciding = "harm", harmful
    elif (weakest.log_lr_no_harm or 0.0) >= evidence.no_harm_threshold:
        evidence.decision, evidence.deciding = "no_harm", weakest
    else:
        evidence.decision = "inconclusive" if min(n0, n1) >= cfg.max_requests else "continue"
        evidence.deciding = weakest
    return evidence


def _sequential(champion: ArmStats, canary: ArmStats, settings: Settings) -> tuple[CanaryEvidence, list[Harm]]:
    counts = rate_counts(champion, canary, list(settings.taxonomy.problem_types))
    evidence = sequential_test(
        counts, champion.requests, canary.requests, settings.canary, version=canary.version, champion=champion.version
    )
    threshold = evidence.harm_threshold or math.inf
    harms = [
        Harm(
            problem_type=t.name,
            champion_rate=round(t.champion_failures / champion.requests, 6),
            canary_rate=round(t.canary_failures / canary.requests, 6),
            margin=settings.canary.harm_margin,
        )
        for t in evidence.tests
        if (t.log_lr_harm or 0.0) >= threshold
    ]
    return evidence, harms


def _fixed(champion: ArmStats, canary: ArmStats, cfg: CanarySettings) -> tuple[CanaryEvidence, list[Harm]]:
    """The fixed rule: after min_requests each, any rate above the champion's by more than the margin harms."""
    evidence = CanaryEvidence(
        rule="fixed",
        decision="continue",
        version=canary.version,
        champion=champion.version,
        champion_requests=champion.requests,
        canary_requests=canary.requests,
        min_requests=cfg.min_requests,
        harm_margin=cfg.harm_margin,
    )
    if min(champion.requests, canary.requests) < cfg.min_requests:
        return evidence, []
    counts = rate_counts(champion, canary, [])
    evidence.tests = [
        RateTest(name=name, champion_failures=x0, canary_failures=x1, difference=round(x1 / canary.requests - x0 / champion.requests, 6))
        for name, (x0, x1) in counts.items()
        if x0 or x1 or name == OVERALL
    ]
    harms = find_harms(champion, canary, cfg.harm_margin)
    evidence.decision = "harm" if harms else "no_harm"
    by_name = {t.name: t for t in evidence.tests}
    evidence.deciding = by_name[harms[0].problem_type] if harms else max(evidence.tests, key=lambda t: t.difference)
    return evidence, harms


def _reason(status: CanaryStatus, evidence: CanaryEvidence) -> str:
    """The old fixed rule's sentences (scripts read them); the evidence's sentence for the sequential test."""
    if evidence.rule == "sequential":
        return evidence.sentence()
    champ, cand = status.champion_stats, status.canary_stats
    assert champ is not None and cand is not None
    if evidence.decision == "continue":
        return f"collecting: champion {champ.requests}, canary {cand.requests} requests of {evidence.min_requests} each"
    if status.harms:
        return "; ".join(h.sentence for h in status.harms)
    return "no problem rate above the champion's by more than the margin"


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
        rule=cfg.rule,
        min_requests=cfg.min_requests,
        harm_margin=cfg.harm_margin,
        champion_stats=stats[champion],
        canary_stats=stats[version],
    )
    if cfg.rule == "sequential":
        evidence, status.harms = _sequential(stats[champion], stats[version], settings)
    else:
        evidence, status.harms = _fixed(stats[champion], stats[version], cfg)
    status.evidence, status.decision, status.state = evidence, evidence.decision, STATE_OF[evidence.decision]
    status.reason = _reason(status, evidence)
    with store.begin() as conn:
        version_store.release_lock(conn)
        # Someone may have promoted, stopped or restarted the canary while we counted: then this
        # observation is about a canary that no longer runs, and it changes nothing.
        if (
            version_store.alias_map(conn).get(CANARY, (None, None))[0] != version
            or (events.last_started(conn, version) or (0,))[0] != started[0]
        ):
            status.state, status.decision, status.harms = "none", "continue", []
            status.reason = "the canary changed while it was observed; observe again"
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


def approval_evidence(store: Store, version: str) -> CanaryEvidence | None:
    """The evidence of the newest observation of `version`'s current canary window (None: not observed
    since it last started, or never a canary), for the approval request."""
    with store.engine.connect() as conn:
        recent = events.events(conn, version, limit=50)
    for event in reversed(recent):
        if event.kind == "started":
            return None
        if event.kind == "observation":
            found = event.detail.get("evidence")
            return CanaryEvidence.model_validate(found) if found else None
    return None


def canary_history(store: Store, version: str, limit: int = 100) -> list[dict[str, Any]]:
    """A canary's recorded events, oldest first."""
    with store.engine.connect() as conn:
        return [event.model_dump() for event in events.events(conn, version, limit)]
