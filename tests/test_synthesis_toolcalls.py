"""The "toolcalls" generator: staged rows (tool_choice, tool_arguments, tool_reply) from real Interaction
records with tool calls, the rule judge's tool-call checks as validation, and stable ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flywheel.records import Interaction, Message, ToolCall, ToolCallFunction
from flywheel.settings import Settings, load_settings
from flywheel.synthesis import registry
from flywheel.synthesis.records import Generated, SynthesisInputs
from flywheel.synthesis.toolcalls import ANY_TOOL, generate, stage_message

SYSTEM = Message(role="system", content="You are ACME's support assistant. Use the tools to look up orders.")
ALLOWED = ["lookup_order", "refund", "track_parcel"]


def call(name: str, arguments: str, call_id: str) -> Message:
    return Message(role="assistant", tool_calls=[ToolCall(id=call_id, function=ToolCallFunction(name=name, arguments=arguments))])


def calls(*items: tuple[str, str, str]) -> Message:
    return Message(role="assistant", tool_calls=[ToolCall(id=i, function=ToolCallFunction(name=n, arguments=a)) for n, a, i in items])


def result(call_id: str, name: str, content: str) -> Message:
    return Message(role="tool", tool_call_id=call_id, name=name, content=content)


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def interaction(id: str, messages: list[Message], intent: str | None = "order_status") -> Interaction:
    return Interaction(id=id, timestamp="2026-01-05T10:00:00Z", model_version="support-v3", intent=intent, messages=messages)


def two_turns(id: str = "conv-1", refund_args: str = '{"order_id": "12345", "amount": 45.1}', refund_tool: str = "refund") -> Interaction:
    """Look an order up, answer; then refund it, answer."""
    return interaction(
        id,
        [
            SYSTEM,
            user("Where is my order 12345?"),
            call("lookup_order", '{"order_id": "12345"}', "c1"),
            result("c1", "lookup_order", '{"status": "shipped", "eta": "tomorrow"}'),
            assistant("Your order 12345 has shipped and arrives tomorrow."),
            user("It is damaged, refund it please."),
            call(refund_tool, refund_args, "c2"),
            result("c2", refund_tool, '{"ok": true}'),
            assistant("Done: $45.10 goes back to your card within 5 days."),
        ],
    )


def run(settings: Settings, *interactions: Interaction) -> Any:
    return generate(SynthesisInputs(settings=settings, seeds=(), tool_interactions=interactions))


def by_kind(samples: list[Generated], turn: int) -> dict[str, Generated]:
    rows = [s for s in samples if s.params["turn"] == turn]
    out = {s.kind: s for s in rows}
    assert len(out) == len(rows), "one row per kind and turn"
    return out


@pytest.fixture
def allowed(project: Path) -> Settings:
    return load_settings(project, policies={"allowed_tools": ALLOWED})


def test_the_registry_names_this_generator() -> None:
    assert registry.get("toolcalls") is generate


def test_a_tool_calling_turn_gives_choice_arguments_and_reply_rows(allowed: Settings) -> None:
    conv = two_turns()
    out = run(allowed, conv)
    assert out.problems == []
    assert len(out.samples) == 6

    first = by_kind(out.samples, 2)
    choice, arguments, reply = first["tool_choice"], first["tool_arguments"], first["tool_reply"]
    # choice: the conversation before the turn, then the stage message listing the allowed tools
    assert choice.messages == [*conv.messages[:2], stage_message("tool_choice", ALLOWED)]
    assert choice.messages[-1].role == "system"
    assert "tool choice" in (choice.messages[-1].content or "") and "lookup_order, refund, track_parcel" in (
        choice.messages[-1].content or ""
    )
    assert choice.answer == '{"tool":"lookup_order"}'
    # arguments: the same conversation, the stage message names the tool; canonical compact JSON
    assert arguments.messages == [*conv.messages[:2], stage_message("tool_arguments", ALLOWED, "lookup_order")]
    assert "lookup_order" in (arguments.messages[-1].content or "")
    assert arguments.answer == '{"order_id":"12345"}'
    # reply: the conversation through the tool result, then the assistant's text
    assert reply.messages == conv.messages[:4]
    assert reply.messages[-1].role == "tool"
    assert reply.answer == "Your order 12345 has shipped and arrives tomorrow."

    for row in first.values():
        assert row.generator == "toolcalls"
        assert row.intent == "order_status" and row.problem_type == "wrong_tool_call"
        assert row.source_id == "conv-1" and row.source_text == "Where is my order 12345?"
        assert row.params == {"turn": 2, "tool": "lookup_order", "calls": 1}

    second = by_kind(out.samples, 6)
    assert second["tool_choice"].answer == '{"tool":"refund"}'
    # keys sorted, no spaces: one spelling for equal arguments
    assert second["tool_arguments"].answer == '{"amount":45.1,"order_id":"12345"}'
    assert json.loads(second["tool_arguments"].answer) == {"order_id": "12345", "amount": 45.1}
    # the second turn's prompts carry the whole first exchange, tool call and result included
    assert second["tool_choice"].messages[:-1] == conv.messages[:6]
    assert second["tool_reply"].messages == conv.messages[:8]
    assert second["tool_reply"].source_text == "It is damaged, refund it please."


def test_without_an_allowed_list_any_tool_is_taken_and_the_stage_says_so(settings: Settings) -> None:
    out = run(settings, two_turns(refund_tool="some_internal_tool"))
    assert out.problems == []
    choice = by_kind(out.samples, 6)["tool_choice"]
    assert choice.answer == '{"tool":"some_internal_tool"}'
    assert ANY_TOOL in (choice.messages[-1].content or "")


def test_a_disallowed_tool_is_reported_and_the_other_turns_are_kept(allowed: Settings) -> None:
    out = run(allowed, two_turns("conv-bad-tool", refund_tool="delete_account"))
    assert [p.source for p in out.problems] == ["conv-bad-tool"]
    problem = out.problems[0]
    assert problem.generator == "toolcalls"
    assert "turn 6" in problem.problem and "delete_account" in problem.problem and "unknown tool" in problem.problem
    # the bad turn gives nothing, the good one all three rows
    assert {s.params["turn"] for s in out.samples} == {2}
    assert {s.kind for s in out.samples} == {"tool_choice", "tool_arguments", "tool_reply"}
    assert all("delete_account" not in s.answer for s in out.samples)


@pytest.mark.parametrize("broken", ['{"order_id": "12345"', '["12345"]', "refund 12345"])
def test_arguments_that_are_not_a_json_object_are_reported(allowed: Settings, broken: str) -> None:
    out = run(allowed, two_turns("conv-bad-json", refund_args=broken), two_turns("conv-good"))
    assert [p.source for p in out.problems] == ["conv-bad-json"]
    assert "turn 6" in out.problems[0].problem and "not a JSON object" in out.problems[0].problem
    assert {(s.source_id, s.params["turn"]) for s in out.samples} == {("conv-bad-json", 2), ("conv-good", 2), ("conv-good", 6)}


def test_checks_hold_even_when_the_taxonomy_switches_the_judges_tool_check_off(project: Path) -> None:
    from flywheel.settings_sections import TaxonomySettings

    default = TaxonomySettings()
    taxonomy = {
        "problem_types": {k: v for k, v in default.problem_types.items() if k != "wrong_tool_call"},
        "categories": {k: v for k, v in default.categories.items() if k != "wrong_tool_call"},
        "default_severity": {k: v for k, v in default.default_severity.items() if k != "wrong_tool_call"},
    }
    settings = load_settings(project, policies={"allowed_tools": ALLOWED}, taxonomy=taxonomy)
    out = run(settings, two_turns("conv-a", refund_tool="delete_account"), two_turns("conv-b", refund_args="[1]"))
    assert [p.source for p in out.problems] == ["conv-a", "conv-b"]
    assert "unknown tool" in out.problems[0].problem and "not a JSON object" in out.problems[1].problem


def test_parallel_calls_train_the_first_call_and_the_reply_sees_every_result(allowed: Settings) -> None:
    conv = interaction(
        "conv-parallel",
        [
            SYSTEM,
            user("Where are orders 1 and 2?"),
            calls(("lookup_order", '{"order_id": "1"}', "p1"), ("lookup_order", '{"order_id": "2"}', "p2")),
            result("p1", "lookup_order", '{"status": "shipped"}'),
            result("p2", "lookup_order", '{"status": "packing"}'),
            assistant("Order 1 has shipped; order 2 is being packed."),
        ],
    )
    out = run(allowed, conv)
    rows = by_kind(out.samples, 2)
    assert len(out.samples) == 3  # one row per kind, not one per call: one prompt, one target
    assert rows["tool_choice"].answer == '{"tool":"lookup_order"}'
    assert rows["tool_arguments"].answer == '{"order_id":"1"}'
    assert rows["tool_reply"].messages == conv.messages[:5]
    assert all(r.params["calls"] == 2 for r in rows.values())


def test_a_bad_parallel_call_drops_the_whole_turn(allowed: Settings) -> None:
    conv = interaction(
        "conv-parallel-bad",
        [SYSTEM, user("Refund 1"), calls(("lookup_order", '{"order_id": "1"}', "p1"), ("wire_money", "{}", "p2")), result("p1", "x", "ok")],
    )
    out = run(allowed, conv)
    assert out.samples == []
    assert len(out.problems) == 1 and "wire_money" in out.problems[0].problem


def test_no_reply_row_without_a_text_reply(allowed: Settings) -> None:
    conv = interaction(
        "conv-chain",
        [
            SYSTEM,
            user("Where is my parcel for order 7?"),
            call("lookup_order", '{"order_id": "7"}', "a"),
            result("a", "lookup_order", '{"parcel": "P-9"}'),
            # the next step calls a tool again: its preamble is not the reply to the first results
            Message(
                role="assistant",
                content="Let me track the parcel.",
                tool_calls=[ToolCall(id="b", function=ToolCallFunction(name="track_parcel", arguments='{"parcel": "P-9"}'))],
            ),
            result("b", "track_parcel", '{"at": "depot"}'),
            assistant("   "),  # blank: no reply row either
            user("Hello?"),
            call("track_parcel", "", "c"),  # no arguments: an empty object, as the rule judge reads it
        ],
        intent=None,
    )
    out = run(allowed, conv)
    assert out.problems == []
    assert sorted((s.params["turn"], s.kind) for s in out.samples) == [
        (2, "tool_arguments"),
        (2, "tool_choice"),
        (4, "tool_arguments"),
        (4, "tool_choice"),
        (8, "tool_arguments"),
        (8, "tool_choice"),
    ]
    assert {s.intent for s in out.samples} == {"tool_use"}  # no logged intent
    assert by_kind(out.samples, 8)["tool_arguments"].answer == "{}"


def test_ids_are_deterministic_and_distinct(allowed: Settings) -> None:
    first = run(allowed, two_turns(), two_turns("conv-2"))
    again = run(allowed, two_turns(), two_turns("conv-2"))
    ids = [s.id for s in first.samples]
    assert ids == [s.id for s in again.samples]
    assert len(set(ids)) == len(ids)  # the same turn in another interaction is another row (its source)
    changed = run(allowed, two_turns(refund_args='{"order_id": "99999"}'))
    # other arguments: that turn's arguments and reply rows are new, the rest (its tool choice too) the same
    assert sorted((s.params["turn"], s.kind) for s in changed.samples if s.id not in ids) == [(6, "tool_arguments"), (6, "tool_reply")]
    # the canonical spelling: the same arguments written differently give the same staged rows (the
    # reply row's prompt holds the logged call as it was written, so it is another row)
    respaced = run(allowed, two_turns(refund_args='{ "amount":45.1 ,"order_id":"12345" }'))
    original = [s for s in first.samples if s.source_id == "conv-1"]
    same = [a.id == b.id for a, b in zip(respaced.samples, original)]
    assert [(s.params["turn"], s.kind) for s, kept in zip(original, same) if not kept] == [(6, "tool_reply")]


def test_no_tool_interactions_give_nothing(allowed: Settings) -> None:
    out = run(allowed, interaction("plain", [SYSTEM, user("hi"), assistant("hello")]))
    assert out.samples == [] and out.problems == []
