"""The scorer's LLM verifier: the verifier model judges each generated sample before it is kept.

    llm_verifier(settings) -> Verify    # (samples) -> per sample, None (accepted) or why it is rejected

The cheap checks (flywheel.synthesis.scorer) catch duplicates, drift, leaks and rule violations, but not
an answer that is simply wrong: a refund the policy does not allow, a fact a rewrite invented, a tool
call that does not fit the turn. A generated answer is taught to the agent as right, so with an
endpoint (llm.base_url) `settings.llm.verifier_model` reads every sample the other checks kept and
accepts or rejects it (prompts/synthesis_verifier.md), by its kind:

  reply, tool_reply            a correct, safe, policy-compliant reply to the conversation for the intent
                               (for tool_reply: faithful to the tool results), in the output format;
  tool_choice, tool_arguments  the tool, or its arguments, fit the conversation.

The sample's text (conversation, intent, answer) is untrusted: it reaches the model only inside
`untrusted_block` fences with a fresh nonce per request. The reply is schema-checked (`SampleVerdict`)
and re-asked up to LLM_RETRIES times (flywheel.llm.ask_until_valid). Samples run through
flywheel.llm.run_bounded (llm.max_in_flight at once, transient errors retried there).

A sample nobody could verify is not kept: a reply still unusable after the re-asks, or an endpoint that
keeps failing (or refuses the request), rejects the sample with that reason instead of raising. Only a
bug (an error that is not the endpoint's) raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.correct.llm import chat_messages, output_format
from flywheel.correct.verify import REASON_CHARS
from flywheel.llm import BadReply, ItemResult, Limits, ask_until_valid, async_chat_model, endpoint_failed, run_bounded, run_sync
from flywheel.prompts import Prompt, load_prompt
from flywheel.prompts.fence import new_nonce, render_messages, untrusted_block
from flywheel.settings import Settings
from flywheel.synthesis.llm_generate import LLM_RETRIES, unusable_reply
from flywheel.synthesis.records import Generated
from flywheel.synthesis.toolcalls import ANY_TOOL  # no allowed_tools: the phrase the tool_choice rows use

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from flywheel.synthesis.scorer import Verify

PROMPT = "synthesis_verifier"  # flywheel/prompts/synthesis_verifier.md


class SampleVerdict(BaseModel):
    """The verifier model's structured answer. No length limits in the schema (OpenAI's strict mode has
    none); the reason is clipped after parsing."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["accept", "reject"] = Field(description="whether the sample may train the agent")
    reason: str = Field(description="why, in one sentence")


def verifier_messages(prompt: Prompt, settings: Settings, sample: Generated) -> list[BaseMessage]:
    """The prompt for one sample: our instructions (and the settings' output format and tools, which are
    trusted) as the system message; the sample's own text fenced in the user message."""
    nonce = new_nonce()
    limit = settings.policies.max_message_chars
    return chat_messages(
        prompt,
        nonce,
        {"output_format": output_format(settings), "allowed_tools": ", ".join(sorted(settings.policies.allowed_tools)) or ANY_TOOL},
        {
            "kind": sample.kind,  # a SampleKind literal, checked by the record: ours, not the sample's text
            "conversation": untrusted_block("conversation", render_messages(sample.messages, limit), nonce),
            "intent": untrusted_block("intent", sample.intent, nonce),
            # not clipped: a verdict on the head of an answer would let its tail through unread
            "answer": untrusted_block("answer", sample.answer, nonce),
        },
    )


def _verdict(reply: Any) -> SampleVerdict:
    if reply is None:  # function calling: the model called no tool
        raise BadReply("the reply held no verdict object")
    verdict = reply if isinstance(reply, SampleVerdict) else SampleVerdict.model_validate(reply)
    # an accepted sample needs no reason; a rejection without one would tell nobody what to fix
    if verdict.verdict == "reject" and not verdict.reason.strip():
        raise BadReply("the reason for the rejection is blank")
    return verdict


def _problem(result: ItemResult) -> str | None:
    """The scorer's answer for one sample: None when accepted, else why, in one line."""
    if not result.ok:
        if not endpoint_failed(result):
            raise result.exception or RuntimeError(result.error)  # a bug, not the endpoint: keep its traceback
        return f"the LLM endpoint failed: {result.error} (after {result.attempts} attempt(s))"
    assert result.value is not None  # ask() returns a tuple
    verdict, why, calls = result.value
    if verdict is None:
        return f"no valid verdict in {calls} attempt(s): {why}"
    if verdict.verdict == "accept":
        return None
    # "rejected:" marks the model's own words, so a reason cannot pass itself off as an endpoint failure
    return "rejected: " + " ".join(verdict.reason.split())[:REASON_CHARS]


def llm_verifier(settings: Settings) -> Verify:
    """The scorer's `verify` for `settings.llm.verifier_model`. Without an endpoint (llm.base_url) a call
    with samples raises SettingsError, like every other LLM caller's."""
    prompt = load_prompt(PROMPT)  # here, not per call: a missing prompt file fails before any sample is scored
    model_name = settings.llm.verifier_model
    # The endpoint's structured-output capability is the same for every caller: the judge's setting.
    method = settings.judge.structured_output

    def verify(samples: Sequence[Generated]) -> list[str | None]:
        if not samples:
            return []

        async def run_all() -> list[ItemResult]:
            # A fresh async client per call: each verify() runs its own event loop (flywheel.llm).
            async with async_chat_model(settings, model_name) as llm:
                checker = llm.with_structured_output(SampleVerdict, method=method)

                async def ask(sample: Generated) -> tuple[SampleVerdict | None, str, int]:
                    messages = verifier_messages(prompt, settings, sample)
                    return await ask_until_valid(checker, messages, LLM_RETRIES, _verdict, unusable_reply, "verdict object")

                # Each sample may make several calls (the re-asks): the client's own timeout bounds each one.
                return await run_bounded(samples, ask, Limits.from_settings(settings, timeout_s=None))

        return [_problem(result) for result in run_sync(run_all)]

    return verify
