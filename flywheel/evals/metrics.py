"""Numbers over judged answers: task success, per-intent success, problem-type rates, severities.

An evaluation judges one answer per test item; `ItemOutcome` holds what the judge found and
`compute_metrics` turns a list of them into a `SetMetrics`. Every rate carries a Wilson 95% interval
(cheap, and well-behaved near 0 and 1 where bootstrap intervals of small sets collapse to a point).

Champion and candidate answer the same items, so the gate compares them item by item (`paired`,
McNemar's exact test) and corrects for testing many intents at once (`adjust_p_values`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from flywheel.evals.text_metrics import ReferenceScores
from flywheel.records import Finding
from flywheel.settings import SEVERITIES

Z95 = 1.959963984540054  # two-sided 95% normal quantile
NO_INTENT = "(none)"  # the intent bucket of items that carry no intent
POLICY_CHECK = "policy:"  # the rule judge's check name for a policy pattern: "policy:<pattern name>"


def points(share: float) -> str:
    """A change in a share as signed percentage points, "+3.0"; never "-0.0"."""
    return f"{round(share * 100, 1) + 0.0:+.1f}"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there is nothing to estimate."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(before: Rate, after: Rate) -> tuple[float, float]:
    """Newcombe's hybrid score interval of after.rate - before.rate from the two Wilson intervals.

    It treats the two samples as independent; both models answer the same items, so the true
    (paired) interval is narrower and this one errs on the wide side."""
    if before.n == 0 or after.n == 0:
        return -1.0, 1.0
    d = after.rate - before.rate
    low = d - math.sqrt((after.rate - after.low) ** 2 + (before.high - before.rate) ** 2)
    high = d + math.sqrt((after.high - after.rate) ** 2 + (before.rate - before.low) ** 2)
    return max(-1.0, low), min(1.0, high)


class Paired(BaseModel):
    """McNemar's exact test of two models answering the same items: `fixed` items went from failing to
    passing, `broken` the other way; `p_value` is the two-sided exact binomial probability of a split
    at least this uneven among the discordant items if neither model were better."""

    model_config = ConfigDict(extra="forbid")
    n: int  # items both answered
    before: int  # items passing before
    after: int  # items passing after
    fixed: int
    broken: int
    p_value: float

    @property
    def change(self) -> float:
        return (self.after - self.before) / self.n if self.n else 0.0


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of `wins` against `losses` at even odds; 1.0 with none of either."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def outcome_passed(outcome: Mapping[str, Any], problem_type: str | None = None) -> bool:
    """Whether one item of an eval report's `outcomes` passed: no error and no finding at all, or with
    `problem_type`, no finding of that type."""
    if outcome.get("error"):
        return False
    findings = outcome.get("findings") or []
    return not findings if problem_type is None else all(f["problem_type"] != problem_type for f in findings)


def mcnemar(before_ok: Sequence[bool], after_ok: Sequence[bool]) -> Paired:
    """McNemar's exact test over paired outcomes (True: the item passed): the sign test on the items
    whose outcome changed."""
    if len(before_ok) != len(after_ok):
        raise ValueError("paired outcomes must have the same length")
    fixed = sum(1 for b, a in zip(before_ok, after_ok) if not b and a)
    broken = sum(1 for b, a in zip(before_ok, after_ok) if b and not a)
    return Paired(
        n=len(before_ok), before=sum(before_ok), after=sum(after_ok), fixed=fixed, broken=broken, p_value=sign_test_p(fixed, broken)
    )


def paired(before: Sequence[ItemOutcome], after: Sequence[ItemOutcome], ok: Callable[[ItemOutcome], bool]) -> Paired | None:
    """McNemar's test over the items both outcome lists hold, matched by item id (`ok`: the item passed);
    None when they share no item (outcomes of different sets, or metrics stored without outcomes)."""
    answered = {o.id: o for o in after}
    matched = [(b, answered[b.id]) for b in before if b.id in answered]
    if not matched:
        return None
    return mcnemar([ok(b) for b, _ in matched], [ok(a) for _, a in matched])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values: rejecting where adjusted <= alpha keeps the chance of any
    false rejection in the family at alpha, whatever the dependence between the tests."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p values (q values): rejecting where adjusted <= alpha keeps the
    expected share of false rejections among the rejections at alpha (independent or positively
    dependent tests)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i], reverse=True)
    adjusted = [1.0] * m
    running = 1.0
    for position, index in enumerate(order):
        rank = m - position  # 1-based rank of this p value in ascending order
        running = min(running, p_values[index] * m / rank)
        adjusted[index] = running
    return adjusted


def adjust_p_values(p_values: Sequence[float], method: str) -> list[float]:
    """`method` "holm", "bh" or "none" (the p values as they are)."""
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    if method == "none":
        return list(p_values)
    raise ValueError(f"unknown multiple-testing method {method!r}")


class Metric(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rate(Metric):
    """`count` of `n` items, as a share with its 95% interval."""

    count: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, count: int, n: int) -> Rate:
        low, high = wilson_interval(count, n)
        return cls(count=count, n=n, rate=count / n if n else 0.0, low=low, high=high)


class ItemOutcome(Metric):
    """One judged answer: success means the judge found nothing."""

    id: str
    intent: str | None = None
    tier: str | None = None  # baseline items: the sample's tier (candidate_, secondary_, core_baseline)
    answer: str = ""
    findings: list[Finding] = []
    error: str = ""  # generation failed for this item (counts as a failure, not as a problem type)

    @property
    def success(self) -> bool:
        return not self.findings and not self.error


class SetMetrics(Metric):
    """Everything measured on one test set for one model."""

    name: str  # "test", "baseline", "problem"
    size: int
    task_success: Rate
    per_intent: dict[str, Rate] = {}  # intent -> success rate
    problem_rates: dict[str, Rate] = {}  # problem type -> share of items with that type
    severity_counts: dict[str, int] = {}  # severity -> findings at that severity
    # problem type -> severity -> items with a finding of that type at that severity
    type_severities: dict[str, dict[str, int]] = {}
    per_tier: dict[str, Rate] = {}  # baseline tier -> success rate (items that carry a tier)
    # policy pattern name -> items with an affirmed match of it (the rule judge's policy:<name> findings)
    compliance_hits: dict[str, int] = {}
    reference_scores: ReferenceScores | None = None  # ROUGE-L/BLEU against reference answers, where any
    generation_errors: int = 0
    judge: str = "rule"  # "rule" or "rule+llm:<model>"
    llm_unjudged: int = 0  # answers the LLM judge gave no valid verdict on (their rule findings stand)
    outcomes: list[ItemOutcome] = []

    @property
    def empty(self) -> bool:
        return self.size == 0


def compute_metrics(
    name: str, outcomes: Sequence[ItemOutcome], problem_types: Iterable[str], policy_names: Iterable[str] = ()
) -> SetMetrics:
    """Aggregate judged answers. Every taxonomy type gets a rate (0 when absent), so before/after
    comparisons line up; a type the judge reported outside the taxonomy is kept, not dropped. The same
    holds for compliance hits: every configured policy pattern (`policy_names`) gets a count."""
    n = len(outcomes)
    types = list(dict.fromkeys(problem_types))
    with_type: Counter[str] = Counter()
    type_sev: dict[str, Counter[str]] = defaultdict(Counter)
    severities: Counter[str] = Counter({s: 0 for s in SEVERITIES})
    intent_total: Counter[str] = Counter()
    intent_ok: Counter[str] = Counter()
    tier_total: Counter[str] = Counter()
    tier_ok: Counter[str] = Counter()
    hits: Counter[str] = Counter({p: 0 for p in policy_names})
    for outcome in outcomes:
        intent = outcome.intent or NO_INTENT
        intent_total[intent] += 1
        intent_ok[intent] += outcome.success
        if outcome.tier:
            tier_total[outcome.tier] += 1
            tier_ok[outcome.tier] += outcome.success
        for check in {f.check for f in outcome.findings if f.check.startswith(POLICY_CHECK)}:
            hits[check.removeprefix(POLICY_CHECK)] += 1
        for finding in outcome.findings:
            severities[finding.severity] += 1
        # an item counts once per type (and once per type and severity), however many findings it has
        for problem_type in {f.problem_type for f in outcome.findings}:
            with_type[problem_type] += 1
            if problem_type not in types:
                types.append(problem_type)
        for problem_type, severity in {(f.problem_type, f.severity) for f in outcome.findings}:
            type_sev[problem_type][severity] += 1
    return SetMetrics(
        name=name,
        size=n,
        task_success=Rate.of(sum(o.success for o in outcomes), n),
        per_intent={intent: Rate.of(intent_ok[intent], intent_total[intent]) for intent in sorted(intent_total)},
        problem_rates={t: Rate.of(with_type[t], n) for t in types},
        severity_counts=dict(severities),
        type_severities={t: dict(type_sev[t]) for t in types if type_sev[t]},
        per_tier={tier: Rate.of(tier_ok[tier], tier_total[tier]) for tier in sorted(tier_total)},
        compliance_hits=dict(sorted(hits.items())),
        generation_errors=sum(1 for o in outcomes if o.error),
        outcomes=list(outcomes),
    )
