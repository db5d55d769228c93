"""The "toolcalls" generator: staged tool-call samples from captured tool-calling traffic.

A model that calls tools does three things in one turn: it picks a tool, writes the tool's arguments,
and, once the results are back, turns them into the reply. Trained on whole turns, a small adapter has
to learn all three from one target; split in stages, each row has one short, checkable answer. For
every assistant turn that calls tools in a stable interaction (`inputs.tool_interactions`: never
captured as a failure) this writes up to three rows, by `Generated.kind`:

  tool_choice     the conversation before the turn, then the TOOL_CHOICE stage message
                  -> {"tool": "<name>"}
  tool_arguments  the same conversation, then the TOOL_ARGUMENTS stage message naming the tool
                  -> the arguments, as canonical compact JSON (keys sorted)
  tool_reply      the conversation through the tool results
                  -> the assistant's text reply that follows (only when there is one)

The stage messages are constants here (and `stage_message` builds them) so the code that runs the
staged model at inference sends exactly what the model was trained on.

A turn whose calls the rule judge would flag (a tool outside `policies.allowed_tools`, arguments that
are not a JSON object: flywheel.evals.rule_judge) gives no rows and one GeneratorProblem naming the
interaction and why; the interaction's other turns still give theirs. Rows are pure functions of the
interactions and the settings, so their ids are the same on every run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flywheel.evals.rule_judge import RuleJudge
from flywheel.prompts import fill
from flywheel.records import Interaction, Message, ToolCall
from flywheel.synthesis.records import Generated, GeneratorOutput, GeneratorProblem, SynthesisInputs

GENERATOR = "toolcalls"
PROBLEM_TYPE = "wrong_tool_call"  # the taxonomy's type these rows teach against
DEFAULT_INTENT = "tool_use"  # for interactions logged without an intent

# The stage messages, appended as a system message after the conversation: the last thing the model
# reads before it answers, and the only thing that tells the two stages apart (their conversations are
# the same). `{tools}` is the allowed tool list, `{tool}` the tool whose arguments are wanted.
TOOL_CHOICE_STAGE = (
    'Stage: tool choice. Choose the tool to call next. Allowed tools: {tools}. Reply with only the JSON object {"tool": "<tool name>"}.'
)
TOOL_ARGUMENTS_STAGE = (
    "Stage: tool arguments. Write the arguments for a call of the tool {tool}. Reply with only the arguments, as one JSON object."
)
# With no allowed_tools configured there is no list to give; a fixed phrase (rather than, say, the tools
# seen in the traffic) keeps the prompt, and so the row ids, the same as traffic grows.
ANY_TOOL = "any tool the agent has"


def stage_message(kind: str, allowed_tools: Sequence[str], tool: str = "") -> Message:
    """The system message that opens stage `kind` ("tool_choice" or "tool_arguments"), for training
    rows and for inference alike."""
    tools = ", ".join(sorted(allowed_tools)) or ANY_TOOL
    if kind == "tool_choice":
        return Message(role="system", content=fill(TOOL_CHOICE_STAGE, {"tools": tools}))
    if kind == "tool_arguments":
        return Message(role="system", content=fill(TOOL_ARGUMENTS_STAGE, {"tool": tool}))
    raise ValueError(f"no stage message for kind {kind!r}")


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: one spelling per value, so equal arguments give equal targets."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    out = GeneratorOutput()
    allowed = list(inputs.settings.policies.allowed_tools)
    judge = RuleJudge(inputs.settings)  # the same tool-call check that judges production answers
    for interaction in inputs.tool_interactions:
        for turn, message in enumerate(interaction.messages):
            if message.role != "assistant" or not message.tool_calls:
                continue
            problems = [p for call in message.tool_calls for p in _call_problems(judge, allowed, call)]
            if problems:
                detail = "; ".join(problems)
                out.problems.append(GeneratorProblem(generator=GENERATOR, source=interaction.id, problem=f"turn {turn}: {detail}"))
                continue
            out.samples.extend(_turn_rows(interaction, turn, allowed))
    return out


def _call_problems(judge: RuleJudge, allowed: list[str], call: ToolCall) -> list[str]:
    """Why this call cannot be a training target (empty: it can)."""
    findings = judge.check_answer(Message(role="assistant", tool_calls=[call]))
    problems = [f.detail for f in findings if f.check == "tool_call"]
    if problems:
        return problems
    # The judge switches its tool-call check off when the taxonomy has no wrong_tool_call type; a
    # training row must still never teach a tool outside the list, nor arguments we cannot parse.
    if allowed and call.function.name not in allowed:
        return [f"unknown tool {call.function.name!r} (allowed: {', '.join(sorted(allowed))})"]
    if _arguments(call) is None:
        return [f"arguments of {call.function.name!r} are not a JSON object"]
    return []


def _arguments(call: ToolCall) -> dict[str, Any] | None:
    """The call's arguments as a dict; None when they are not a JSON object. No arguments at all is
    an empty object, as the rule judge reads it."""
    try:
        value = json.loads(call.function.arguments or "{}")
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _turn_rows(interaction: Interaction, turn: int, allowed: list[str]) -> list[Generated]:
    messages = interaction.messages
    calls = messages[turn].tool_calls or []
    # Parallel calls: the stages train on the first call only. A row per call would give the same
    # prompt (the conversation and the stage message) several different targets, and the model would
    # learn to pick among them at random; the first call is the one the model itself emitted first.
    # The tool_reply row still sees every call's result. `calls` in params says how many there were.
    first = calls[0]
    name = first.function.name
    arguments = _arguments(first)
    assert arguments is not None  # _call_problems passed every call of this turn
    before = list(messages[:turn])
    common: dict[str, Any] = {
        "generator": GENERATOR,
        "params": {"turn": turn, "tool": name, "calls": len(calls)},
        "source_id": interaction.id,
        "source_text": _last_user(before),
        "intent": interaction.intent or DEFAULT_INTENT,
        "problem_type": PROBLEM_TYPE,
    }
    rows = [
        Generated(
            **common, kind="tool_choice", messages=[*before, stage_message("tool_choice", allowed)], answer=canonical_json({"tool": name})
        ),
        Generated(
            **common,
            kind="tool_arguments",
            messages=[*before, stage_message("tool_arguments", allowed, name)],
            answer=canonical_json(arguments),
        ),
    ]
    reply = _reply_after(messages, turn)
    if reply is not None:
        end, text = reply
        rows.append(Generated(**common, kind="tool_reply", messages=list(messages[:end]), answer=text))
    return rows


def _reply_after(messages: Sequence[Message], turn: int) -> tuple[int, str] | None:
    """(index of the reply, its text) when the tool results of `turn` are followed by an assistant
    text reply; None otherwise."""
    end = turn + 1
    while end < len(messages) and messages[end].role == "tool":
        end += 1
    if end == turn + 1 or end >= len(messages):
        return None  # no tool results logged, or the conversation stops after them
    reply = messages[end]
    text = (reply.content or "").strip()
    # An assistant message that calls tools again is the next step, not the reply: its text is a
    # preamble ("let me check ..."), and as a target it would teach the model to stop before the call.
    if reply.role != "assistant" or reply.tool_calls or not text:
        return None
    return end, text


def _last_user(messages: Sequence[Message]) -> str:
    return next((m.content or "" for m in reversed(messages) if m.role == "user"), "")
