"""The promotion gate over hand-built metrics: it passes, and it fails for each of its reasons (a missing
fixed test set among them); the paired rule (McNemar's exact test with a multiple-testing correction)
against the point and independent-interval rules; core baseline samples."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from flywheel.evals.gate import Check, GateResult, evaluate_gate
from flywheel.evals.metrics import ItemOutcome, SetMetrics, compute_metrics
from flywheel.records import Finding
from flywheel.settings_sections import GateSettings, TaxonomySettings

TYPES = list(TaxonomySettings().problem_types)
SEVERITY = dict(TaxonomySettings().default_severity)
GATE = GateSettings(
    targeted_min_relative_drop=0.3,
    max_regression=0.02,
    min_intent_samples=5,
    block_new_severities=["high", "critical"],
    intent_rule="point",
    type_rule="point",
)

# A block of items: (how many, intent, problem types found in each; a type may be "type@severity")
Block = tuple[int, str, Sequence[str]]


def build(name: str, blocks: Sequence[Block]) -> SetMetrics:
    outcomes: list[ItemOutcome] = []
    for count, intent, found in blocks:
        for _ in range(count):
            findings = []
            for spec in found:
                problem_type, _, severity = spec.partition("@")
                findings.append(Finding(problem_type=problem_type, severity=severity or SEVERITY[problem_type], check="test"))
            outcomes.append(ItemOutcome(id=f"{name}-{len(outcomes)}", intent=intent, findings=findings))
    return compute_metrics(name, outcomes, TYPES)


# Champion: 100 test items. over_promise 20%, format_error 10%; billing 35/55 ok, cards 35/45 ok.
CHAMPION_TEST: list[Block] = [(20, "billing", ["over_promise"]), (10, "cards", ["format_error"]), (35, "billing", []), (35, "cards", [])]
CHAMPION_PROBLEM: list[Block] = [(8, "billing", ["over_promise"]), (2, "billing", [])]
CHAMPION_BASELINE: list[Block] = [(50, "cards", []), (0, "cards", [])]


def champion(
    test: list[Block] = CHAMPION_TEST, problem: list[Block] = CHAMPION_PROBLEM, baseline: list[Block] = CHAMPION_BASELINE
) -> dict[str, SetMetrics]:
    return {"test": build("test", test), "problem": build("problem", problem), "baseline": build("baseline", baseline)}


def candidate(
    test: list[Block] | None = None, problem: list[Block] | None = None, baseline: list[Block] | None = None
) -> dict[str, SetMetrics]:
    """By default a good candidate: over_promise halves on the test set and falls 8 -> 2 on the problem set."""
    test = (
        test
        if test is not None
        else [(10, "billing", ["over_promise"]), (10, "cards", ["format_error"]), (45, "billing", []), (35, "cards", [])]
    )
    problem = problem if problem is not None else [(2, "billing", ["over_promise"]), (8, "billing", [])]
    baseline = baseline if baseline is not None else [(50, "cards", [])]
    return {"test": build("test", test), "problem": build("problem", problem), "baseline": build("baseline", baseline)}


def failed(result: GateResult, kind: str) -> list[str]:
    return [c.reason for c in result.checks if not c.passed and c.kind == kind]


def test_good_candidate_passes_with_every_reason_listed() -> None:
    result = evaluate_gate(champion(), candidate(), ["over_promise"], GATE)
    assert result.passed, result.reasons
    assert result.targeted == ["over_promise"]
    assert len(result.reasons) == len(result.checks) and all(result.reasons)
    kinds = {c.kind for c in result.checks}
    assert kinds == {"targeted", "problem_type", "intent", "baseline", "core_baseline", "new_severity"}
    assert {(c.subject, c.set) for c in result.checks if c.kind == "intent"} == {("billing", "test"), ("cards", "test")}
    targeted = {c.set: c for c in result.checks if c.kind == "targeted"}
    assert targeted["test"].before == pytest.approx(0.20) and targeted["test"].after == pytest.approx(0.10)
    assert targeted["test"].limit == pytest.approx(0.14)
    assert "20.0% (20/100) -> 10.0% (10/100)" in targeted["test"].reason and "50%" in targeted["test"].reason
    assert "80.0% (8/10) -> 20.0% (2/10)" in targeted["problem"].reason
    # every other type is checked on both gated sets, passing ones included
    other = {(c.subject, c.set) for c in result.checks if c.kind == "problem_type"}
    assert other == {(t, s) for t in TYPES if t != "over_promise" for s in ("test", "problem")}
    assert any("baseline-regression success: 100.0% (50/50) -> 100.0% (50/50)" in r for r in result.reasons)
    low, high = targeted["test"].ci_change
    assert low < -0.10 < high < 0


def test_targeted_type_not_falling_enough_fails() -> None:
    # 20 -> 15 on the test set is a 25% drop; 30% is required
    weak = [(15, "billing", ["over_promise"]), (10, "cards", ["format_error"]), (40, "billing", []), (35, "cards", [])]
    result = evaluate_gate(champion(), candidate(test=weak), ["over_promise"], GATE)
    assert not result.passed
    reasons = failed(result, "targeted")
    assert len(reasons) == 1
    assert "targeted over_promise on the fixed test set: 20.0% (20/100) -> 15.0% (15/100)" in reasons[0]
    assert "25%" in reasons[0] and "misses the required 30%" in reasons[0]
    assert result.reasons[0] == reasons[0]  # failing reasons come first


def test_targeted_drop_of_exactly_the_threshold_passes() -> None:
    exact = [(14, "billing", ["over_promise"]), (10, "cards", ["format_error"]), (41, "billing", []), (35, "cards", [])]
    result = evaluate_gate(champion(), candidate(test=exact), ["over_promise"], GATE)
    assert not failed(result, "targeted"), result.reasons


def test_targeted_must_also_fall_on_the_problem_set() -> None:
    result = evaluate_gate(champion(), candidate(problem=[(7, "billing", ["over_promise"]), (3, "billing", [])]), ["over_promise"], GATE)
    assert not result.passed
    assert [c.set for c in result.checks if c.kind == "targeted" and not c.passed] == ["problem"]


def test_targeted_type_the_champion_never_had() -> None:
    # absent before and after: passes; appearing in the candidate: fails
    absent = evaluate_gate(champion(), candidate(), ["over_promise", "wrong_tool_call"], GATE)
    assert not failed(absent, "targeted")
    assert any("targeted wrong_tool_call on the fixed test set: 0.0% (0/100) -> 0.0% (0/100), stays absent" in r for r in absent.reasons)
    appears = [
        (10, "billing", ["over_promise"]),
        (1, "cards", ["wrong_tool_call"]),
        (9, "cards", ["format_error"]),
        (45, "billing", []),
        (35, "cards", []),
    ]
    result = evaluate_gate(champion(), candidate(test=appears), ["over_promise", "wrong_tool_call"], GATE)
    assert any("appears although the champion had none" in r for r in failed(result, "targeted"))


def test_another_problem_type_regressing_fails() -> None:
    # format_error rises 10% -> 13% (3 points > the allowed 2)
    worse = [(10, "billing", ["over_promise"]), (13, "cards", ["format_error"]), (45, "billing", []), (32, "cards", [])]
    result = evaluate_gate(champion(), candidate(test=worse), ["over_promise"], GATE)
    assert not result.passed
    reasons = failed(result, "problem_type")
    # the items are matched by id: 10 gained format_error, 7 lost it
    assert reasons == [
        "format_error on the fixed test set: 10.0% (10/100) -> 13.0% (13/100), a change of +3.0 points, beyond the allowed rise of 2.0; "
        "paired over 100 items: 7 fixed, 10 broken, McNemar p=0.63"
    ]
    # exactly the allowed rise passes
    edge = [(10, "billing", ["over_promise"]), (12, "cards", ["format_error"]), (45, "billing", []), (33, "cards", [])]
    assert not failed(evaluate_gate(champion(), candidate(test=edge), ["over_promise"], GATE), "problem_type")


def test_an_intent_regressing_fails_and_small_intents_are_not_gated() -> None:
    # cards loses 2 of its 35 successes (77.8% -> 73.3%); a 4-item intent "tiny" loses all of its successes
    base = champion(test=[*CHAMPION_TEST, (4, "tiny", [])])
    worse_cards = [
        (10, "billing", ["over_promise"]),
        (10, "cards", ["format_error"]),
        (45, "billing", []),
        (33, "cards", []),
        (2, "cards", ["format_error@low"]),
        (4, "tiny", ["format_error"]),
    ]
    result = evaluate_gate(base, candidate(test=worse_cards), ["over_promise"], GATE)
    intent_failures = failed(result, "intent")
    assert intent_failures and intent_failures[0].startswith("intent cards on the fixed test set: success 77.8% (35/45) -> 73.3% (33/45)")
    assert "beyond the allowed drop of 2.0" in intent_failures[0]
    # "tiny" (4 items) fell from 100% to 0% but has fewer than min_intent_samples items: reported, not gated
    assert all("intent tiny " not in r for r in intent_failures)
    small = [c for c in result.checks if c.kind == "intent" and c.skipped]
    assert small and "fewer than 5 items and are not gated: tiny" in small[0].reason and small[0].passed


def test_the_significant_intent_rule_gates_only_drops_whose_interval_excludes_no_change() -> None:
    significant = GATE.model_copy(update={"intent_rule": "significant"})
    # cards 35/45 -> 33/45: beyond the 2-point margin, but well within noise: reported, passes
    slight = [
        (10, "billing", ["over_promise"]),
        (10, "cards", ["format_error"]),
        (45, "billing", []),
        (33, "cards", []),
        (2, "cards", ["format_error@low"]),
    ]
    result = evaluate_gate(champion(), candidate(test=slight), ["over_promise"], significant)
    check = next(c for c in result.checks if c.kind == "intent" and c.subject == "cards")
    assert check.passed and "beyond the allowed drop of 2.0, but its 95% interval" in check.reason
    # cards 35/45 -> 10/45: a drop no interval explains away: fails
    collapse = [(10, "billing", ["over_promise"]), (35, "cards", ["format_error@low"]), (45, "billing", []), (10, "cards", [])]
    result = evaluate_gate(champion(), candidate(test=collapse), ["over_promise"], significant)
    assert any(r.startswith("intent cards on the fixed test set: success 77.8% (35/45) -> 22.2% (10/45)") for r in failed(result, "intent"))


def test_a_new_high_severity_type_fails() -> None:
    leak = [
        (10, "billing", ["over_promise"]),
        (10, "cards", ["format_error"]),
        (1, "cards", ["policy_boundary_risk"]),
        (44, "billing", []),
        (35, "cards", []),
    ]
    result = evaluate_gate(champion(), candidate(test=leak), ["over_promise"], GATE)
    assert not result.passed
    assert failed(result, "new_severity") == [
        "new high/critical problem type policy_boundary_risk: the candidate has 1 item(s) at high across all sets; the champion had none"
    ]
    # the same type at a severity that is not blocked is not "new at a blocked severity"
    mild = [
        (10, "billing", ["over_promise"]),
        (10, "cards", ["format_error"]),
        (1, "cards", ["policy_boundary_risk@low"]),
        (44, "billing", []),
        (35, "cards", []),
    ]
    assert not failed(evaluate_gate(champion(), candidate(test=mild), ["over_promise"], GATE), "new_severity")
    # a blocked-severity type the champion already had (over_promise, high) is not new either
    assert not failed(evaluate_gate(champion(), candidate(), ["over_promise"], GATE), "new_severity")
    # nothing blocked: the check says so
    open_gate = GATE.model_copy(update={"block_new_severities": []})
    assert not failed(evaluate_gate(champion(), candidate(test=leak), ["over_promise"], open_gate), "new_severity")


def test_baseline_regression_fails() -> None:
    result = evaluate_gate(champion(), candidate(baseline=[(48, "cards", []), (2, "cards", ["format_error"])]), ["over_promise"], GATE)
    assert not result.passed
    assert failed(result, "baseline") == [
        "baseline-regression success: 100.0% (50/50) -> 96.0% (48/50), -4.0 points, beyond the allowed drop of 2.0; "
        "paired over 50 items: 0 fixed, 2 broken, McNemar p=0.5"
    ]


def test_empty_sets_are_reported_not_failed() -> None:
    empty = build("baseline", [])
    before = {**champion(), "baseline": empty, "problem": build("problem", [])}
    after = {**candidate(), "baseline": empty, "problem": build("problem", [])}
    result = evaluate_gate(before, after, ["over_promise"], GATE)
    assert result.passed, result.reasons
    skipped = [c.reason for c in result.checks if c.skipped]
    assert "targeted over_promise not checked on the problem set: the set is empty" in skipped
    assert "the baseline-regression set is empty: no graduated samples to protect yet" in skipped


@pytest.mark.parametrize("side", ["both", "champion", "candidate", "missing"])
def test_no_fixed_test_set_fails_the_gate_and_says_how_to_fix_it(side: str) -> None:
    # an otherwise good candidate: without the test set nothing stands for the traffic it will serve
    before, after = champion(), candidate()
    if side == "missing":
        del before["test"], after["test"]
    if side in ("both", "champion"):
        before["test"] = build("test", [])
    if side in ("both", "candidate"):
        after["test"] = build("test", [])
    result = evaluate_gate(before, after, ["over_promise"], GATE)
    assert not result.passed
    assert len(result.failed_checks) == 1
    check = result.failed_checks[0]
    assert (check.kind, check.set) == ("test_set", "test")
    assert check.reason.startswith("no fixed test set: set eval.test_set in flywheel.toml to a JSONL file of")
    assert '{"messages": [...], "reference": {"intent": ...}}' in check.reason and "never trains on" in check.reason
    assert result.reasons[0] == check.reason
    # intents are gated on the fixed test set only: none are checked without it
    assert not [c for c in result.checks if c.kind == "intent"]


def test_nothing_targeted_says_so() -> None:
    result = evaluate_gate(champion(), champion(), [], GATE)
    assert result.passed
    assert "no targeted problem types were named, so no drop was required" in result.reasons


def test_every_failure_reason_at_once() -> None:
    bad_test = [
        (18, "billing", ["over_promise"]),
        (14, "cards", ["format_error"]),
        (1, "cards", ["policy_boundary_risk"]),
        (37, "billing", []),
        (30, "cards", []),
    ]
    result = evaluate_gate(
        champion(), candidate(test=bad_test, baseline=[(40, "cards", []), (10, "cards", ["format_error"])]), ["over_promise"], GATE
    )
    assert not result.passed
    assert {c.kind for c in result.failed_checks} == {"targeted", "problem_type", "intent", "baseline", "new_severity"}
    n_failed = len(result.failed_checks)
    assert result.reasons[:n_failed] == [c.reason for c in result.checks if not c.passed]


def test_mcnemar_is_the_exact_sign_test_on_the_items_that_changed() -> None:
    from flywheel.evals.metrics import mcnemar, outcome_passed, sign_test_p

    # 51 items fixed, 3 broken, 546 unchanged: only the 54 that changed count
    result = mcnemar([False] * 51 + [True] * 3 + [True] * 546, [True] * 51 + [False] * 3 + [True] * 546)
    assert (result.fixed, result.broken, result.n, result.after - result.before) == (51, 3, 600, 48)
    assert result.p_value == sign_test_p(51, 3) == pytest.approx(2.9188e-12, rel=1e-3)
    assert sign_test_p(0, 3) == 0.25 and sign_test_p(0, 0) == 1.0 and sign_test_p(2, 2) == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
    wrong = {"id": "a", "findings": [{"problem_type": "wrong_intent"}]}
    assert outcome_passed({"id": "b", "findings": []}) and not outcome_passed(wrong)
    assert outcome_passed(wrong, "over_promise") and not outcome_passed(wrong, "wrong_intent")
    assert not outcome_passed({"id": "c", "findings": [], "error": "timeout"}, "over_promise")


# --- the paired rule -------------------------------------------------------------------------------------------

PAIRED = GATE.model_copy(update={"intent_rule": "paired", "type_rule": "paired", "multiple_testing": "holm", "alpha": 0.05})
# An intent's items: (intent, items, passing with the champion, of those broken by the candidate, of the
# champion's failures fixed by the candidate). A failing item has a low-severity format_error.
IntentSpec = tuple[str, int, int, int, int]


def paired_test_sets(specs: Sequence[IntentSpec]) -> tuple[dict[str, SetMetrics], dict[str, SetMetrics]]:
    """Champion and candidate on the same fixed test set, item ids matching, flips placed exactly."""
    low = [Finding(problem_type="format_error", severity="low", check="test")]
    before: list[ItemOutcome] = []
    after: list[ItemOutcome] = []
    for intent, n, ok, broken, fixed in specs:
        for i in range(n):
            champion_ok = i < ok
            candidate_ok = (i >= broken) if champion_ok else (i - ok < fixed)
            item = f"{intent}-{i}"
            before.append(ItemOutcome(id=item, intent=intent, findings=[] if champion_ok else low))
            after.append(ItemOutcome(id=item, intent=intent, findings=[] if candidate_ok else low))
    return {"test": compute_metrics("test", before, TYPES)}, {"test": compute_metrics("test", after, TYPES)}


def intent_check(result: GateResult, intent: str) -> Check:
    return next(c for c in result.checks if c.kind == "intent" and c.subject == intent)


def test_a_drop_the_paired_test_finds_although_the_independent_intervals_overlap() -> None:
    # cards: 35 of 45 -> 28 of 45; the candidate broke 7 items and fixed none
    before, after = paired_test_sets([("cards", 45, 35, 7, 0)])
    significant = evaluate_gate(before, after, [], GATE.model_copy(update={"intent_rule": "significant"}))
    check = intent_check(significant, "cards")
    assert check.passed and check.ci_change is not None and check.ci_change[1] > 0  # independent: includes no change
    paired = evaluate_gate(before, after, [], PAIRED)
    check = intent_check(paired, "cards")
    assert not check.passed and not paired.passed
    assert check.paired is not None and (check.paired.fixed, check.paired.broken, check.paired.n) == (0, 7, 45)
    assert check.paired.p_value == pytest.approx(2 * 0.5**7)
    assert check.reason == (
        "intent cards on the fixed test set: success 77.8% (35/45) -> 62.2% (28/45), -15.6 points, beyond the allowed drop of 2.0; "
        "paired over 45 items: 0 fixed, 7 broken, McNemar p=0.016: significant at alpha 0.05"
    )


def test_a_drop_the_independent_intervals_blame_but_the_pairs_explain_as_noise() -> None:
    # cards: 28 of 45 -> 18 of 45, but 44 of the 45 items flipped: 27 broken, 17 fixed
    before, after = paired_test_sets([("cards", 45, 28, 27, 17)])
    significant = evaluate_gate(before, after, [], GATE.model_copy(update={"intent_rule": "significant"}))
    check = intent_check(significant, "cards")
    assert not check.passed and check.ci_change is not None and check.ci_change[1] < 0  # independent: excludes no change
    paired = evaluate_gate(before, after, [], PAIRED)
    check = intent_check(paired, "cards")
    assert check.passed and paired.passed, paired.reasons
    assert check.paired is not None and (check.paired.fixed, check.paired.broken) == (17, 27)
    assert check.paired.p_value == pytest.approx(0.1742, abs=1e-3)
    assert "beyond the allowed drop of 2.0; paired over 45 items: 17 fixed, 27 broken, McNemar p=0.17" in check.reason
    assert check.reason.endswith(": not significant at alpha 0.05, reported, not gated")
    # the point rule fails it either way
    assert not intent_check(evaluate_gate(before, after, [], GATE), "cards").passed


def test_holm_and_benjamini_hochberg_adjusted_p_values() -> None:
    from flywheel.evals.metrics import adjust_p_values, benjamini_hochberg, holm

    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust_p_values(p, "none") == p
    assert holm([]) == [] and benjamini_hochberg([0.2]) == [0.2]
    with pytest.raises(ValueError):
        adjust_p_values(p, "bonferroni")


def test_the_correction_over_many_intents() -> None:
    # ten intents of ten items; three lose 8 of 10 (p = 2/2^8 = 0.0078 each), seven do not move
    specs = [(f"drop{i}", 10, 10, 8, 0) for i in range(3)] + [(f"same{i}", 10, 10, 0, 0) for i in range(7)]
    before, after = paired_test_sets(specs)
    by_rule = {}
    for method in ("none", "holm", "bh"):
        result = evaluate_gate(before, after, [], PAIRED.model_copy(update={"multiple_testing": method}))
        by_rule[method] = sorted(c.subject for c in result.failed_checks if c.kind == "intent")
        drop = intent_check(result, "drop0")
        assert drop.paired is not None and drop.paired.p_value == pytest.approx(0.0078125)
        if method == "holm":
            assert drop.p_adjusted == pytest.approx(10 * 0.0078125)  # Holm: 10x, 9x, 8x, then the running maximum
            assert "(holm-adjusted over 10 intents: 0.078): not significant at alpha 0.05" in drop.reason
        if method == "bh":
            assert drop.p_adjusted == pytest.approx(10 / 3 * 0.0078125)  # three at rank <= 3 of 10
            assert "(bh-adjusted over 10 intents: 0.026): significant at alpha 0.05" in drop.reason
    # alone each drop is significant; Holm keeps the family-wise error at 5% and lets them pass; BH, which
    # bounds the share of false alarms among the flagged, flags all three
    assert by_rule == {"none": ["drop0", "drop1", "drop2"], "holm": [], "bh": ["drop0", "drop1", "drop2"]}


def test_paired_problem_type_rise_within_noise_is_reported_not_gated() -> None:
    # format_error appears on 4 of 100 items and leaves none: +4 points, p = 0.125
    before, after = paired_test_sets([("cards", 100, 100, 4, 0)])
    point = evaluate_gate(before, after, [], GATE)
    assert [c.subject for c in point.failed_checks if c.kind == "problem_type"] == ["format_error"]
    result = evaluate_gate(before, after, [], PAIRED.model_copy(update={"multiple_testing": "none"}))
    check = next(c for c in result.checks if c.kind == "problem_type" and c.subject == "format_error")
    assert check.passed and check.paired is not None and (check.paired.fixed, check.paired.broken) == (0, 4)
    assert "paired over 100 items: 0 fixed, 4 broken, McNemar p=0.12: not significant at alpha 0.05" in check.reason
    # 8 of 100 with none fixed: p = 0.0078, a real rise
    before, after = paired_test_sets([("cards", 100, 100, 8, 0)])
    result = evaluate_gate(before, after, [], PAIRED.model_copy(update={"multiple_testing": "none"}))
    assert [c.subject for c in result.failed_checks if c.kind == "problem_type"] == ["format_error"]


def test_without_matching_items_the_paired_rule_falls_back_to_the_point_rule() -> None:
    # champion() and candidate() name their items alike, so rename the candidate's: nothing pairs
    before, after = paired_test_sets([("cards", 45, 35, 7, 0)])
    renamed = [o.model_copy(update={"id": f"other-{o.id}"}) for o in after["test"].outcomes]
    after = {"test": compute_metrics("test", renamed, TYPES)}
    check = intent_check(evaluate_gate(before, after, [], PAIRED), "cards")
    assert not check.passed and check.paired is None
    assert check.reason.endswith("; no item was answered by both models (nothing to pair), so the point rule applies")


# --- core baseline samples -------------------------------------------------------------------------------------


def tiered(name: str, items: Sequence[tuple[str, str, bool]]) -> SetMetrics:
    """A baseline set of (id, tier, passed) items."""
    bad = [Finding(problem_type="wrong_intent", severity="medium", check="test")]
    outcomes = [ItemOutcome(id=i, intent="cards", tier=tier, findings=[] if ok else bad) for i, tier, ok in items]
    return compute_metrics(name, outcomes, TYPES)


def test_a_broken_core_baseline_sample_fails_the_gate_and_is_named() -> None:
    before = {
        **champion(),
        "baseline": tiered(
            "baseline",
            [
                *[(f"s{i}", "secondary_baseline", True) for i in range(60)],
                ("core-1", "core_baseline", True),
                ("core-2", "core_baseline", True),
            ],
        ),
    }
    after = {
        **candidate(),
        "baseline": tiered(
            "baseline",
            [
                *[(f"s{i}", "secondary_baseline", True) for i in range(60)],
                ("core-1", "core_baseline", False),
                ("core-2", "core_baseline", True),
            ],
        ),
    }
    result = evaluate_gate(before, after, ["over_promise"], GATE)
    # one item of 62 is within the baseline set's allowed drop of 2 points: only the core check fails
    assert [c.kind for c in result.failed_checks] == ["core_baseline"]
    check = result.failed_checks[0]
    assert check.reason == (
        "core baseline: the candidate breaks 1 of 2 core samples (pass with the champion, fail with the candidate): "
        "core-1 (cards); at most 0 allowed"
    )
    assert result.reasons[0] == check.reason
    # a setting that allows one
    assert evaluate_gate(before, after, ["over_promise"], GATE.model_copy(update={"core_baseline_max_failures": 1})).passed


def test_a_core_sample_the_champion_fails_too_is_reported_not_blamed() -> None:
    before = {
        **champion(),
        "baseline": tiered(
            "baseline", [("core-1", "core_baseline", True), ("core-2", "core_baseline", False), ("core-3", "core_baseline", False)]
        ),
    }
    after = {
        **candidate(),
        "baseline": tiered(
            "baseline", [("core-1", "core_baseline", True), ("core-2", "core_baseline", False), ("core-3", "core_baseline", True)]
        ),
    }
    result = evaluate_gate(before, after, ["over_promise"], GATE)
    assert result.passed, result.reasons
    check = next(c for c in result.checks if c.kind == "core_baseline")
    assert check.passed and not check.skipped
    assert check.reason == (
        "core baseline: the candidate breaks none of the 3 core samples (at most 0 allowed); 1 fail with the champion too, "
        "reported, not blamed on the candidate: core-2 (cards); the candidate fixes 1: core-3 (cards)"
    )
    # no core sample at all: said, not failed
    plain = evaluate_gate(champion(), candidate(), ["over_promise"], GATE)
    core = next(c for c in plain.checks if c.kind == "core_baseline")
    assert core.passed and core.skipped and core.reason == "no core baseline samples in the baseline-regression set yet"
