"""The promotion gate: a pure function from champion and candidate metrics to a verdict with reasons.

The candidate passes only if
  1. every targeted problem type falls by at least `targeted_min_relative_drop` (relative) on the
     fixed test set and on the problem set,
  2. no other problem type rises by more than `max_regression` (absolute) on those sets,
  3. no intent with at least `min_intent_samples` items on the fixed test set loses more than
     `max_regression` success (the test set is drawn to stand for the traffic; the problem set's
     intents are a handful of failures each, where one answer moves a rate by tens of points),
  4. success on the baseline-regression set drops by no more than `max_regression`,
  5. it breaks at most `core_baseline_max_failures` (default 0) core baseline samples: a core sample
     is broken when it passes with the champion and fails with the candidate; one the champion fails
     too is reported, not blamed on the candidate,
  6. no problem type shows up at a blocked severity that the champion never had at a blocked severity,
  7. there is a fixed test set at all: without one, nothing stands for the traffic the candidate will
     serve, so the gate fails and says how to add one.

How a drop beyond `max_regression` in 2 and 3 is judged (`type_rule`, `intent_rule`):
  paired (the default)  both models answer the same items, so the evidence is in the items whose
        outcome changed: `fixed` (failed with the champion, pass with the candidate) and `broken`.
        McNemar's exact test asks whether a split that uneven is likely if neither model were better;
        it is far sharper than comparing two independent rates (an intent of 45 items that loses 7
        items and gains none is a clear regression, p = 0.016, although the independent 95% intervals
        of 78% and 62% overlap), and it also forgives what independent intervals blame (many items
        flipping both ways is a noisy model, not a worse one). The drop fails the gate only when its
        p value, corrected for the number of intents (or problem types) tested on that set, is at
        most `alpha`. Why a correction: with ~77 intents each tested at 5%, a candidate that changes
        nothing would still show about four "significant" drops by chance and never pass. `holm`
        (default) keeps the chance of refusing a candidate for any intent that did not really drop at
        `alpha`; `bh` (Benjamini-Hochberg) keeps the expected share of such intents among the flagged
        ones at `alpha`, which flags more when many intents really moved; `none` tests each alone.
  significant  (intents only) the drop's independent Newcombe 95% interval must exclude zero.
  point        any drop beyond the margin fails.
The targeted drop (1) is a required improvement and stays a point rule; its reason carries the paired
numbers too. Every check leaves a sentence with its numbers, passing ones too, so a person approving the
candidate sees what was measured and what was not (an empty problem or baseline set is reported as not
checked, never as a failure; only the fixed test set is required).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from flywheel.evals.metrics import NO_INTENT, ItemOutcome, Paired, Rate, SetMetrics, adjust_p_values, difference_interval, paired, points
from flywheel.records import SampleTier
from flywheel.settings_sections import GateSettings

TEST, BASELINE, PROBLEM = "test", "baseline", "problem"
SET_LABELS = {TEST: "fixed test set", BASELINE: "baseline-regression set", PROBLEM: "problem set"}
# Problem types are gated where the items represent the traffic (test) or the cycle's problems
# (problem), intents on the test set; the baseline set is gated on its overall success.
TYPE_SETS = (TEST, PROBLEM)
INTENT_SETS = (TEST,)
EPS = 1e-9  # float slack so that a drop of exactly the threshold passes
# Why the gate fails without the fixed test set, and how to fix it: the problem set only holds this cycle's
# failures and the baseline set only graduated ones, so neither says how the candidate does on the traffic.
NO_TEST_SET = (
    'no fixed test set: set eval.test_set in flywheel.toml to a JSONL file of {"messages": [...], '
    '"reference": {"intent": ...}} rows the loop never trains on'
)


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str  # targeted | problem_type | intent | baseline | core_baseline | new_severity | test_set
    subject: str  # the problem type, intent or set the check is about
    set: str = ""  # test | baseline | problem ("" for checks across sets)
    passed: bool
    skipped: bool = False  # nothing to measure (empty set, too few items): passes, says so
    before: float | None = None
    after: float | None = None
    limit: float | None = None  # the bound `after` was held to
    ci_change: tuple[float, float] | None = None  # 95% interval of after - before (independent samples)
    paired: Paired | None = None  # McNemar's test on the items both models answered ("ok": no such problem)
    p_adjusted: float | None = None  # its p value corrected for the other intents / types of the set
    reason: str


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passed: bool
    reasons: list[str]  # every check's sentence, failing ones first
    checks: list[Check]
    targeted: list[str] = []

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def evaluate_gate(
    before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], targeted: Sequence[str], settings: GateSettings
) -> GateResult:
    """Compare the champion's metrics (`before`) with the candidate's (`after`), set by set."""
    targeted = list(dict.fromkeys(targeted))
    checks: list[Check] = []
    for set_name in TYPE_SETS:
        pair = _pair(before, after, set_name)
        for problem_type in targeted:
            checks.append(_targeted(problem_type, set_name, pair, settings))
        if pair is not None:
            checks.extend(_type_checks([t for t in _types(*pair) if t not in targeted], set_name, pair, settings))
            if set_name in INTENT_SETS:
                checks.extend(_intent_checks(set_name, pair, settings))
        elif set_name == TEST:
            checks.append(Check(kind="test_set", subject=TEST, set=TEST, passed=False, reason=NO_TEST_SET))
    baseline = _pair(before, after, BASELINE)
    checks.append(_baseline(baseline, settings))
    checks.append(_core_baseline(baseline, settings))
    checks.extend(_new_severities(before, after, settings))
    if not targeted:
        checks.append(
            Check(
                kind="targeted",
                subject="",
                passed=True,
                skipped=True,
                reason="no targeted problem types were named, so no drop was required",
            )
        )
    reasons = [c.reason for c in checks if not c.passed] + [c.reason for c in checks if c.passed]
    return GateResult(passed=all(c.passed for c in checks), reasons=reasons, checks=checks, targeted=targeted)


# --- helpers -----------------------------------------------------------------------------------------------


def _pair(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], name: str) -> tuple[SetMetrics, SetMetrics] | None:
    b, a = before.get(name), after.get(name)
    if b is None or a is None or b.empty or a.empty:
        return None
    return b, a


def _types(b: SetMetrics, a: SetMetrics) -> list[str]:
    return list(dict.fromkeys([*b.problem_rates, *a.problem_rates]))


def _rate(metrics: SetMetrics, problem_type: str) -> Rate:
    return metrics.problem_rates.get(problem_type) or Rate.of(0, metrics.size)


def _fmt(rate: Rate) -> str:
    return f"{rate.rate:.1%} ({rate.count}/{rate.n})"


def _free_of(problem_type: str) -> Callable[[ItemOutcome], bool]:
    """An item "passes" for a problem type when no finding of that type was made on it."""
    return lambda outcome: all(f.problem_type != problem_type for f in outcome.findings)


def _of_intent(outcomes: Sequence[ItemOutcome], intent: str) -> list[ItemOutcome]:
    return [o for o in outcomes if (o.intent or NO_INTENT) == intent]


def _adjusted(tests: Mapping[str, Paired | None], gs: GateSettings) -> dict[str, float]:
    """Each subject's McNemar p value corrected over every subject of the family that could be tested."""
    tested = [(subject, test) for subject, test in tests.items() if test is not None]
    adjusted = adjust_p_values([test.p_value for _, test in tested], gs.multiple_testing)
    return {subject: p for (subject, _), p in zip(tested, adjusted)}


def _paired_text(test: Paired | None, p_adjusted: float | None, family: int, noun: str, gs: GateSettings) -> str:
    if test is None:
        return "; no item was answered by both models (nothing to pair)"
    text = f"; paired over {test.n} items: {test.fixed} fixed, {test.broken} broken, McNemar p={test.p_value:.2g}"
    if p_adjusted is not None and family > 1 and gs.multiple_testing != "none":
        text += f" ({gs.multiple_testing}-adjusted over {family} {noun}: {p_adjusted:.2g})"
    return text


def _paired_verdict(test: Paired | None, p_adjusted: float | None, gs: GateSettings) -> tuple[bool, str]:
    """Under the paired rule, whether a change beyond the margin passes, and the words that say why."""
    if test is None or p_adjusted is None:
        return False, ", so the point rule applies"
    if p_adjusted > gs.alpha:
        return True, f": not significant at alpha {gs.alpha:g}, reported, not gated"
    return False, f": significant at alpha {gs.alpha:g}"


# --- the checks --------------------------------------------------------------------------------------------


def _targeted(problem_type: str, set_name: str, pair: tuple[SetMetrics, SetMetrics] | None, gs: GateSettings) -> Check:
    label = SET_LABELS[set_name]
    if pair is None:
        return Check(
            kind="targeted",
            subject=problem_type,
            set=set_name,
            passed=True,
            skipped=True,
            reason=f"targeted {problem_type} not checked on the {label}: the set is empty",
        )
    b, a = _rate(pair[0], problem_type), _rate(pair[1], problem_type)
    test = paired(pair[0].outcomes, pair[1].outcomes, _free_of(problem_type))
    note = _paired_text(test, None, 1, "", gs)
    common = dict(
        kind="targeted", subject=problem_type, set=set_name, before=b.rate, after=a.rate, ci_change=difference_interval(b, a), paired=test
    )
    if b.count == 0:
        ok = a.count == 0
        verdict = "stays absent" if ok else "appears although the champion had none"
        return Check(
            **common, passed=ok, limit=0.0, reason=f"targeted {problem_type} on the {label}: {_fmt(b)} -> {_fmt(a)}, {verdict}{note}"
        )
    if b.count < gs.targeted_min_count:
        # A relative drop of two occurrences is noise: a rare targeted type only must not get worse.
        regression = _type_regression(problem_type, set_name, pair, gs, test, test.p_value if test else None, 1)
        return regression.model_copy(
            update={
                "kind": "targeted",
                "reason": regression.reason
                + (
                    f" (targeted, but the champion had only {b.count}: fewer than targeted_min_count {gs.targeted_min_count} to demand a drop)"
                ),
            }
        )
    limit = b.rate * (1 - gs.targeted_min_relative_drop)
    drop = (b.rate - a.rate) / b.rate
    ok = a.rate <= limit + EPS
    return Check(
        **common,
        passed=ok,
        limit=limit,
        reason=(
            f"targeted {problem_type} on the {label}: {_fmt(b)} -> {_fmt(a)}, a relative drop of "
            f"{drop:.0%} {'meets' if ok else 'misses'} the required {gs.targeted_min_relative_drop:.0%}{note}"
        ),
    )


def _type_checks(types: Sequence[str], set_name: str, pair: tuple[SetMetrics, SetMetrics], gs: GateSettings) -> list[Check]:
    """The non-targeted problem types of one set: one family for the multiple-testing correction."""
    tests = {t: paired(pair[0].outcomes, pair[1].outcomes, _free_of(t)) for t in types}
    adjusted = _adjusted(tests, gs)
    return [_type_regression(t, set_name, pair, gs, tests[t], adjusted.get(t), len(adjusted)) for t in types]


def _type_regression(
    problem_type: str,
    set_name: str,
    pair: tuple[SetMetrics, SetMetrics],
    gs: GateSettings,
    test: Paired | None,
    p_adjusted: float | None,
    family: int,
) -> Check:
    b, a = _rate(pair[0], problem_type), _rate(pair[1], problem_type)
    rise = a.rate - b.rate
    beyond = rise > gs.max_regression + EPS
    ok, verdict = not beyond, ""
    p_adjusted = p_adjusted if gs.type_rule == "paired" else None  # the correction only matters to that rule
    if beyond and gs.type_rule == "paired":
        ok, verdict = _paired_verdict(test, p_adjusted, gs)
    return Check(
        kind="problem_type",
        subject=problem_type,
        set=set_name,
        passed=ok,
        before=b.rate,
        after=a.rate,
        limit=b.rate + gs.max_regression,
        ci_change=difference_interval(b, a),
        paired=test,
        p_adjusted=p_adjusted,
        reason=(
            f"{problem_type} on the {SET_LABELS[set_name]}: {_fmt(b)} -> {_fmt(a)}, a change of "
            f"{points(rise)} points, {'beyond' if beyond else 'within'} the allowed rise of {gs.max_regression * 100:.1f}"
            f"{_paired_text(test, p_adjusted, family, 'problem types', gs)}{verdict}"
        ),
    )


def _intent_checks(set_name: str, pair: tuple[SetMetrics, SetMetrics], gs: GateSettings) -> list[Check]:
    """Every intent with enough items is one test of one family: the correction counts them all, the
    ones that improved too (leaving them out because they did not drop would be choosing the family
    after looking at the data)."""
    b_set, a_set = pair
    gated: dict[str, tuple[Rate, Rate]] = {}
    small: list[str] = []
    for intent in dict.fromkeys([*b_set.per_intent, *a_set.per_intent]):
        b = b_set.per_intent.get(intent) or Rate.of(0, 0)
        a = a_set.per_intent.get(intent) or Rate.of(0, 0)
        if min(a.n, b.n) < gs.min_intent_samples:
            small.append(intent)
        else:
            gated[intent] = (b, a)
    tests = {i: paired(_of_intent(b_set.outcomes, i), _of_intent(a_set.outcomes, i), lambda o: o.success) for i in gated}
    adjusted = _adjusted(tests, gs) if gs.intent_rule == "paired" else {}
    checks: list[Check] = []
    for intent, (b, a) in gated.items():
        drop = b.rate - a.rate
        interval = difference_interval(b, a)
        beyond = drop > gs.max_regression + EPS
        ok, note, verdict = not beyond, "", ""
        if beyond and gs.intent_rule == "significant" and interval[1] >= 0:
            # With ~40 items an intent moves by 2.5 points per answer: a drop whose 95% interval still
            # includes no change is reported, not gated on.
            ok, note = (True, f", but its 95% interval ({points(interval[0])} to {points(interval[1])}) includes no change")
        elif beyond and gs.intent_rule == "paired":
            ok, verdict = _paired_verdict(tests[intent], adjusted.get(intent), gs)
        checks.append(
            Check(
                kind="intent",
                subject=intent,
                set=set_name,
                passed=ok,
                before=b.rate,
                after=a.rate,
                limit=b.rate - gs.max_regression,
                ci_change=interval,
                paired=tests[intent],
                p_adjusted=adjusted.get(intent),
                reason=(
                    f"intent {intent} on the {SET_LABELS[set_name]}: success {_fmt(b)} -> {_fmt(a)}, "
                    f"{points(-drop)} points, {'beyond' if beyond else 'within'} the allowed drop of "
                    f"{gs.max_regression * 100:.1f}{note}{_paired_text(tests[intent], adjusted.get(intent), len(adjusted), 'intents', gs)}"
                    f"{verdict}"
                ),
            )
        )
    if small:
        shown = ", ".join(small[:8]) + (f" and {len(small) - 8} more" if len(small) > 8 else "")
        checks.append(
            Check(
                kind="intent",
                subject=f"{len(small)} small intents",
                set=set_name,
                passed=True,
                skipped=True,
                reason=(
                    f"{len(small)} intent(s) on the {SET_LABELS[set_name]} have fewer than "
                    f"{gs.min_intent_samples} items and are not gated: {shown}"
                ),
            )
        )
    return checks


def _baseline(pair: tuple[SetMetrics, SetMetrics] | None, gs: GateSettings) -> Check:
    if pair is None:
        return Check(
            kind="baseline",
            subject=BASELINE,
            set=BASELINE,
            passed=True,
            skipped=True,
            reason="the baseline-regression set is empty: no graduated samples to protect yet",
        )
    b, a = pair[0].task_success, pair[1].task_success
    drop = b.rate - a.rate
    ok = drop <= gs.max_regression + EPS
    test = paired(pair[0].outcomes, pair[1].outcomes, lambda o: o.success)
    return Check(
        kind="baseline",
        subject=BASELINE,
        set=BASELINE,
        passed=ok,
        before=b.rate,
        after=a.rate,
        limit=b.rate - gs.max_regression,
        ci_change=difference_interval(b, a),
        paired=test,
        reason=(
            f"baseline-regression success: {_fmt(b)} -> {_fmt(a)}, {points(-drop)} points, "
            f"{'within' if ok else 'beyond'} the allowed drop of {gs.max_regression * 100:.1f}{_paired_text(test, None, 1, '', gs)}"
        ),
    )


def _names(outcomes: Sequence[ItemOutcome], limit: int = 10) -> str:
    shown = ", ".join(f"{o.id} ({o.intent})" if o.intent else o.id for o in outcomes[:limit])
    return shown + (f" and {len(outcomes) - limit} more" if len(outcomes) > limit else "")


def _core_baseline(pair: tuple[SetMetrics, SetMetrics] | None, gs: GateSettings) -> Check:
    """Core samples are what earlier cycles fixed, graduated and a person confirmed twice: the candidate
    must not break them (beyond core_baseline_max_failures), whatever the set's overall rate does."""
    core = [o for o in pair[0].outcomes if o.tier == SampleTier.CORE] if pair is not None else []
    common = dict(kind="core_baseline", subject=str(SampleTier.CORE), set=BASELINE)
    if not core:
        return Check(**common, passed=True, skipped=True, reason="no core baseline samples in the baseline-regression set yet")
    answered = {o.id: o for o in pair[1].outcomes} if pair is not None else {}
    both = [(o, answered[o.id]) for o in core if o.id in answered]
    broken = [a for b, a in both if b.success and not a.success]
    still = [a for b, a in both if not b.success and not a.success]
    fixed = [a for b, a in both if not b.success and a.success]
    unanswered = [o for o in core if o.id not in answered]
    ok = len(broken) <= gs.core_baseline_max_failures and not unanswered
    allowed = f"at most {gs.core_baseline_max_failures} allowed"
    reason = (
        f"core baseline: the candidate breaks {len(broken)} of {len(core)} core samples (pass with the champion, fail with the "
        f"candidate): {_names(broken)}; {allowed}"
        if broken
        else f"core baseline: the candidate breaks none of the {len(core)} core samples ({allowed})"
    )
    if unanswered:
        reason += f"; {len(unanswered)} were not answered by the candidate: {_names(unanswered)}"
    if still:
        reason += f"; {len(still)} fail with the champion too, reported, not blamed on the candidate: {_names(still)}"
    if fixed:
        reason += f"; the candidate fixes {len(fixed)}: {_names(fixed)}"
    return Check(**common, passed=ok, after=float(len(broken)), limit=float(gs.core_baseline_max_failures), reason=reason)


def _blocked_types(metrics: Mapping[str, SetMetrics], blocked: Sequence[str]) -> dict[str, dict[str, int]]:
    """problem type -> blocked severity -> items, summed over every set."""
    found: dict[str, dict[str, int]] = {}
    for set_metrics in metrics.values():
        for problem_type, by_severity in set_metrics.type_severities.items():
            for severity, count in by_severity.items():
                if severity in blocked and count:
                    slot = found.setdefault(problem_type, {})
                    slot[severity] = slot.get(severity, 0) + count
    return found


def _new_severities(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], gs: GateSettings) -> list[Check]:
    blocked = list(gs.block_new_severities)
    if not blocked:
        return [
            Check(
                kind="new_severity",
                subject="",
                passed=True,
                skipped=True,
                reason="no severities are blocked (gate.block_new_severities is empty)",
            )
        ]
    had = _blocked_types(before, blocked)
    has = _blocked_types(after, blocked)
    new = {t: sev for t, sev in has.items() if t not in had}
    names = "/".join(blocked)
    if not new:
        present = ", ".join(sorted(has))
        return [
            Check(
                kind="new_severity",
                subject="",
                passed=True,
                reason=(
                    f"no new problem type at {names} severity: "
                    + (f"the candidate's ({present}) were already the champion's" if has else "the candidate has none")
                ),
            )
        ]
    return [
        Check(
            kind="new_severity",
            subject=t,
            passed=False,
            after=float(sum(sev.values())),
            reason=(
                f"new {names} problem type {t}: the candidate has "
                + ", ".join(f"{n} item(s) at {s}" for s, n in sorted(sev.items()))
                + " across all sets; the champion had none"
            ),
        )
        for t, sev in new.items()
    ]
