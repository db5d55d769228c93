"""The rule judge: one test per check, the verdict semantics, and the evaluation entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.errors import SettingsError
from flywheel.evals.judge import RuleJudge, judge_answer, verdict_from_findings
from flywheel.evals.rule_judge import NO_FINDING_REASON
from flywheel.records import Finding, Interaction, Message, Reference, ToolCall, ToolCallFunction
from flywheel.settings import Settings, load_settings

SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string"}, "reply": {"type": "string", "minLength": 1}},
    "required": ["intent", "reply"],
    "additionalProperties": False,
}


def conv(*messages: Message) -> Interaction:
    return Interaction(id="i1", timestamp="2026-01-01T00:00:00Z", messages=[Message(role="user", content="where is my card?"), *messages])


def said(text: str | None, calls: list[tuple[str, str]] | None = None) -> Message:
    tool_calls = [ToolCall(id=f"c{i}", function=ToolCallFunction(name=n, arguments=a)) for i, (n, a) in enumerate(calls or [])]
    return Message(role="assistant", content=text, tool_calls=tool_calls or None)


def judge_with(project: Path, **overrides) -> RuleJudge:
    return RuleJudge(load_settings(project, **overrides))


def kinds(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.problem_type, f.severity, f.check) for f in findings]


# --- checks ------------------------------------------------------------------------------------------------


def test_a_plain_good_answer_has_no_finding(settings: Settings) -> None:
    assert RuleJudge(settings).check(conv(said("Your card ships within 5 days."))) == []


@pytest.mark.parametrize("answer", [said(""), said("   \n"), said(None)])
def test_an_empty_answer_is_a_format_error(settings: Settings, answer: Message) -> None:
    assert kinds(RuleJudge(settings).check(conv(answer))) == [("format_error", "low", "empty")]


def test_no_assistant_message_at_all_is_a_format_error(settings: Settings) -> None:
    assert kinds(RuleJudge(settings).check(conv())) == [("format_error", "low", "empty")]


def test_output_schema_not_json_and_schema_violations(project: Path) -> None:
    judge = judge_with(project, policies={"output_schema": SCHEMA})
    not_json = judge.check(conv(said("Sure! It ships soon.")))
    assert kinds(not_json) == [("format_error", "low", "output_schema")] and "not JSON" in not_json[0].detail
    missing = judge.check(conv(said(json.dumps({"intent": "card_arrival"}))))
    assert kinds(missing) == [("format_error", "low", "output_schema")] and "'reply' is a required property" in missing[0].detail
    nested = judge.check(conv(said(json.dumps({"intent": 3, "reply": ""}))))
    assert "schema violation at intent" in nested[0].detail and "(+1 more)" in nested[0].detail
    assert judge.check(conv(said(json.dumps({"intent": "card_arrival", "reply": "Five days."})))) == []


def test_a_broken_output_schema_is_a_settings_error(project: Path) -> None:
    with pytest.raises(SettingsError) as err:
        judge_with(project, policies={"output_schema": {"type": "objekt"}})
    assert str(err.value).startswith("setting policies.output_schema: not a valid JSON schema")


def test_forbidden_phrases_default_and_custom(project: Path) -> None:
    findings = judge_with(project).check(conv(said("We GUARANTEE you will get a full refund by Friday.")))
    assert kinds(findings) == [("over_promise", "high", "policy:guaranteed_refund")]
    assert "GUARANTEE you will get a full refund" in findings[0].detail
    custom = {
        "forbidden_phrases": [
            {"name": "legal_advice", "pattern": r"\byou should sue\b", "problem_type": "policy_boundary_risk", "severity": "critical"}
        ]
    }
    judge = judge_with(project, policies=custom)
    assert kinds(judge.check(conv(said("Honestly you should sue them.")))) == [("policy_boundary_risk", "critical", "policy:legal_advice")]
    assert judge.check(conv(said("We guarantee a refund."))) == []  # the custom list replaced the defaults


NEGATED = [
    "Never promise or guarantee a refund, a refund date or a fee waiver: refunds are decided by the merchant.",
    "I'm sorry, we cannot guarantee a refund for this payment.",
    "We do not promise refunds before the merchant answers.",
    "There is no guarantee of a refund here.",
    "We won't promise a refund date.",
    "We can’t promise a refund today.",
    "A refund isn't guaranteed: refunds are decided by the merchant.",
    "We are not able to promise a refund.",
    "We will never waive fees for this.",  # no match at all: the pattern wants "we will waive"
]

AFFIRMED = [
    ("We guarantee a full refund within 24 hours.", "guarantee a full refund"),
    # the negation ends at the clause boundary: the second clause is a promise
    ("I can't promise a refund, but we guarantee a full refund within 24 hours", "guarantee a full refund"),
    ("I can't promise a refund but we guarantee a full refund within 24 hours", "guarantee a full refund"),
    ("Don't worry, we guarantee a refund.", "guarantee a refund"),
    ("No problem we guarantee a refund.", "guarantee a refund"),  # "no" negates only the word right after it
    ("We never charge fees for this and we guarantee a refund.", "guarantee a refund"),  # too far back
    ('{"intent": "refund", "reply": "Not a problem. We promise your refund by Friday."}', "promise your refund"),
]


@pytest.mark.parametrize("text", NEGATED)
def test_a_forbidden_phrase_in_a_negated_clause_is_not_a_finding(settings: Settings, text: str) -> None:
    assert RuleJudge(settings).check_answer(text) == []


@pytest.mark.parametrize("text, matched", AFFIRMED)
def test_a_forbidden_phrase_outside_a_negated_clause_is_a_finding(settings: Settings, text: str, matched: str) -> None:
    findings = RuleJudge(settings).check_answer(text)
    assert kinds(findings) == [("over_promise", "high", "policy:guaranteed_refund")]
    assert findings[0].detail == f"matched {matched!r}"


def test_negation_applies_to_custom_patterns_too(project: Path) -> None:
    custom = {"forbidden_phrases": [{"name": "legal_advice", "pattern": r"\byou should sue\b", "problem_type": "policy_boundary_risk"}]}
    judge = judge_with(project, policies=custom)
    assert judge.check_answer("I would never say you should sue them.") == []
    assert kinds(judge.check_answer("Honestly, you should sue them.")) == [("policy_boundary_risk", "high", "policy:legal_advice")]


@pytest.mark.parametrize(
    "policy, where, problem",
    [
        (
            {"name": "bad", "pattern": "(unclosed", "problem_type": "over_promise"},
            "forbidden_phrases[0] (bad)",
            "not a valid regular expression",
        ),
        ({"name": "odd", "pattern": "x", "problem_type": "made_up_type"}, "forbidden_phrases[0] (odd)", "not in taxonomy.problem_types"),
    ],
)
def test_a_bad_policy_pattern_names_itself(project: Path, policy: dict, where: str, problem: str) -> None:
    with pytest.raises(SettingsError) as err:
        judge_with(project, policies={"forbidden_phrases": [policy]})
    assert f"policies.{where}" in str(err.value) and problem in str(err.value)


def test_tool_calls_unknown_tool_and_bad_arguments(project: Path) -> None:
    judge = judge_with(project, policies={"allowed_tools": ["lookup_order"]})
    assert judge.check(conv(said(None, [("lookup_order", '{"order_id": "A1"}')]))) == []
    unknown = judge.check(conv(said(None, [("delete_account", "{}")])))
    assert kinds(unknown) == [("wrong_tool_call", "medium", "tool_call")] and "delete_account" in unknown[0].detail
    bad_args = judge.check(conv(said(None, [("lookup_order", '{"order_id": ')])))
    assert "not a JSON object" in bad_args[0].detail
    assert len(judge.check(conv(said(None, [("lookup_order", "[1, 2]")])))) == 1  # JSON, but not an object


def test_any_tool_name_passes_when_no_list_is_configured(settings: Settings) -> None:
    assert RuleJudge(settings).check(conv(said(None, [("anything_goes", "{}")]))) == []


def test_tool_calls_of_the_whole_final_turn_count_but_not_earlier_turns(project: Path) -> None:
    judge = judge_with(project, policies={"allowed_tools": ["lookup_order"]})
    earlier_bad = Interaction(
        id="i2",
        timestamp="2026-01-01T00:00:00Z",
        messages=[
            Message(role="user", content="first question"),
            said(None, [("old_tool", "{}")]),
            Message(role="tool", content="{}", tool_call_id="c0"),
            said("first answer"),
            Message(role="user", content="second question"),
            said(None, [("rogue_tool", "{}")]),
            Message(role="tool", content="{}", tool_call_id="c0"),
            said("Here is what I found."),
        ],
    )
    findings = judge.check(earlier_bad)
    assert len(findings) == 1 and "rogue_tool" in findings[0].detail
    # an answer given explicitly (an eval output) is judged alone
    assert judge.check(earlier_bad, answer=said("fine")) == []


def test_wrong_intent_against_the_reference(settings: Settings) -> None:
    judge = RuleJudge(settings)
    answer = said(json.dumps({"intent": "card_arrival", "reply": "5 days"}))
    wrong = judge.check(conv(answer), reference=Reference(intent="lost_card", source="label:ana"))
    assert kinds(wrong) == [("wrong_intent", "medium", "intent")] and "lost_card" in wrong[0].detail
    assert judge.check(conv(answer), reference=Reference(intent="Card_Arrival")) == []
    assert judge.check(conv(said("plain text answer")), reference=Reference(intent="lost_card")) == []


def test_a_check_whose_type_is_not_in_the_taxonomy_is_switched_off(project: Path) -> None:
    taxonomy = {"problem_types": {"over_promise": "promises"}, "categories": {}, "default_severity": {}}
    judge = judge_with(project, taxonomy=taxonomy)
    assert judge.disabled == ["empty", "intent", "label_answer", "output_schema", "tool_call"]
    assert judge.check(conv(said(""))) == []
    assert kinds(judge.check(conv(said("we promise a refund")))) == [("over_promise", "high", "policy:guaranteed_refund")]


def test_check_is_pure(project: Path) -> None:
    judge = judge_with(project, policies={"output_schema": SCHEMA, "allowed_tools": ["x"]})
    interaction = conv(said("we promise a refund", [("y", "{")]))
    before = interaction.model_dump()
    first = judge.check(interaction, reference=Reference(intent="a"))
    assert judge.check(interaction, reference=Reference(intent="a")) == first
    assert interaction.model_dump() == before
    assert {f.check for f in first} == {"output_schema", "policy:guaranteed_refund", "tool_call"}


# --- verdicts ----------------------------------------------------------------------------------------------


def test_the_worst_finding_decides_the_verdict(settings: Settings) -> None:
    findings = [
        Finding(problem_type="format_error", severity="low", check="output_schema", detail="not JSON"),
        Finding(problem_type="over_promise", severity="high", check="policy:guaranteed_refund"),
        Finding(problem_type="policy_boundary_risk", severity="high", check="policy:other"),
    ]
    verdict = verdict_from_findings("f-1", findings, settings)
    assert (verdict.is_failure, verdict.problem_type, verdict.severity, verdict.acceptance) == (True, "over_promise", "high", "Reject")
    assert verdict.status == "judged" and verdict.judge == "rule" and "not JSON" in verdict.rationale


@pytest.mark.parametrize("severity, acceptance", [("low", "Accept"), ("medium", "Risk"), ("high", "Reject"), ("critical", "Reject")])
def test_acceptance_follows_severity(settings: Settings, severity: str, acceptance: str) -> None:
    verdict = verdict_from_findings("f-1", [Finding(problem_type="format_error", severity=severity, check="x")], settings)
    assert verdict.acceptance == acceptance


def test_no_finding_is_unjudged_not_fine(settings: Settings) -> None:
    verdict = verdict_from_findings("f-1", [], settings)
    assert verdict.status == "unjudged" and verdict.reason == NO_FINDING_REASON and verdict.problem_type is None


def test_a_matching_reference_answer_proves_the_answer_fine(settings: Settings) -> None:
    judge = RuleJudge(settings)
    answer = said('{"intent": "card_arrival", "reply": "Five days."}')
    assert judge.confirms(answer, Reference(answer='{"reply": "Five days.", "intent": "card_arrival"}'))
    assert judge.confirms(said("Your card  arrives in FIVE days."), Reference(answer="your card arrives in five days."))
    assert not judge.confirms(answer, Reference(intent="card_arrival"))  # an intent says nothing about the rest
    assert not judge.confirms(said("Ten days."), Reference(answer="Five days."))
    ref = Reference(answer="Five days.", source="label:ana")
    verdict = verdict_from_findings("f-1", [], settings, confirmed_by=ref)
    assert (verdict.status, verdict.is_failure, verdict.acceptance) == ("judged", False, "Accept") and "label:ana" in verdict.rationale


# --- evaluation entry point ---------------------------------------------------------------------------------


def test_judge_answer_for_evaluation(project: Path) -> None:
    settings = load_settings(project, policies={"output_schema": SCHEMA})
    prompt = [Message(role="user", content="where is my card?")]
    good = json.dumps({"intent": "card_arrival", "reply": "Five days."})
    assert judge_answer(settings, prompt, good, Reference(intent="card_arrival")) == (False, [])
    failed, findings = judge_answer(settings, prompt, good, Reference(intent="lost_card"))
    assert failed and [f.problem_type for f in findings] == ["wrong_intent"]
    judge = RuleJudge(settings)
    assert judge_answer(settings, prompt, None, rule_judge=judge)[0]
    assert judge_answer(settings, prompt, said("not json"), rule_judge=judge)[1][0].check == "output_schema"
