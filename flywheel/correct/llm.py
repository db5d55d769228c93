"""The LLM corrector: langchain-openai through flywheel.llm, one call per failure plus the verifier's.

For each failure the corrector prompt (prompts/corrector.md) carries the conversation and the original
answer as untrusted blocks, the verdict, and context retrieved from the index before any call is made
(one embedding batch for all failures): knowledge-base sections (the approved response for the
failure's intent first, then the nearest `correct.context_docs`) and up to `correct.similar_failures`
failures already corrected and verified. The ids of what it saw go into `Correction.context_ids`.

Failures run through `run_bounded` (llm.max_in_flight at once; transient endpoint errors retried
there); an answer that does not parse or is empty is re-asked up to `correct.llm_retries` times
(flywheel.llm.ask_until_valid).
Each result is saved as soon as it arrives. Outcomes:
  - verified / corrected: an answer, verified (rules + LLM preference), stored with its reasons;
  - uncorrectable: no usable answer after the re-asks, or the endpoint refused the request (400/422);
  - error: the endpoint kept failing (429, 5xx, timeouts after the retries; 401/404: misconfigured);
    the failure stays `judged` for the next run.
If every failure ends in an error the endpoint is down: InfrastructureError. Anything else that goes
wrong in one item is a bug and is raised after the others are saved.

Logged text reaches the models only inside `untrusted_block` fences (flywheel.prompts.fence, with a fresh
nonce per request); the prompt files are split at its `<!-- user -->` marker into system and user message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel.context import Context
from flywheel.correct.cases import Attempt, Case, CorrectOutcome, CorrectSummary, index_corrections, label_attempt, save_attempt
from flywheel.correct.kb import nearest_by_intent
from flywheel.correct.verify import Preference, Verifier, reply_problem
from flywheel.errors import InfrastructureError
from flywheel.llm import BadReply, ItemResult, Limits, ask_until_valid, async_chat_model, run_bounded, run_sync
from flywheel.prompts import Prompt, fill, load_prompt
from flywheel.prompts.fence import USER_MARKER, new_nonce, render_messages, untrusted_block
from flywheel.records import Verification
from flywheel.settings import Settings
from flywheel.store.vectors import CORRECTIONS, KB

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from flywheel.store.vectors import Hit, VectorIndex


class CorrectorAnswer(BaseModel):
    """The corrector model's structured answer."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(description="the corrected answer text, exactly as the agent should send it")


class Retrieved(BaseModel):
    kb: list[Any] = []  # Hit
    similar: list[Any] = []  # Hit


# --- retrieval ---------------------------------------------------------------------------------------------


def retrieve(index: VectorIndex, settings: Settings, cases: Sequence[Case]) -> dict[str, Retrieved]:
    """Context for every case, embedded in one batch: the approved response for its intent, the nearest
    KB sections, and similar verified corrections of other failures."""
    out = {case.failure.id: Retrieved() for case in cases}
    if not cases:
        return out
    cfg = settings.correct
    vectors = index.embedder.embed([case.request or case.intent or "" for case in cases])
    with_intent = [row for row, case in enumerate(cases) if case.intent]
    if with_intent:
        approved = nearest_by_intent(index, [cases[row].intent or "" for row in with_intent], vectors[with_intent], "approved_response", 1)
        for row, hits in zip(with_intent, approved):
            out[cases[row].failure.id].kb.extend(hits)
    if cfg.context_docs:
        for case, hits in zip(cases, index.query_embeddings(KB, vectors, k=cfg.context_docs)):
            seen = {h.id for h in out[case.failure.id].kb}
            out[case.failure.id].kb.extend(h for h in hits if h.id not in seen)
    if cfg.similar_failures:
        # one extra: a retried failure finds its own earlier correction, which is not an example
        for case, hits in zip(cases, index.query_embeddings(CORRECTIONS, vectors, k=cfg.similar_failures + 1)):
            out[case.failure.id].similar = [h for h in hits if h.id != case.failure.id][: cfg.similar_failures]
    return out


def context_ids(found: Retrieved) -> list[str]:
    return [f"kb/{h.id}" for h in found.kb] + [f"corrections/{h.id}" for h in found.similar]


# --- prompts -----------------------------------------------------------------------------------------------


def chat_messages(prompt: Prompt, nonce: str, system_values: dict[str, str], user_values: dict[str, str]) -> list[BaseMessage]:
    """The prompt file split at the user marker (flywheel.prompts.fence.USER_MARKER): instructions as
    the system message, the (fenced) material as the user message."""
    from langchain_core.messages import HumanMessage, SystemMessage

    system_part, _, user_part = prompt.text.partition(USER_MARKER)
    system = fill(system_part, {"nonce": nonce, **system_values})
    return [SystemMessage(system.strip()), HumanMessage(fill(user_part, user_values).strip())]


def _facts_block(case: Case, nonce: str) -> str:
    """What is known about the case that came from the log or a person: fenced, it is not ours."""
    facts = []
    if case.intent:
        source = case.reference.source if case.reference and case.reference.intent else "the production log"
        facts.append(f"the user's intent: {case.intent} (from {source})")
    if case.verdict.rationale:
        facts.append(f"the judge's rationale: {case.verdict.rationale}")
    return untrusted_block("facts", "\n".join(facts) or "(none)", nonce)


def _verdict_text(case: Case, settings: Settings, nonce: str) -> str:
    v = case.verdict
    meaning = settings.taxonomy.problem_types.get(v.problem_type or "", "")
    return f"problem type: {v.problem_type} ({meaning})\nseverity: {v.severity}\n{_facts_block(case, nonce)}"


def _kb_text(hits: Sequence[Hit]) -> str:
    if not hits:
        return "(nothing relevant in the knowledge base)"
    parts = []
    for h in hits:
        meta = h.metadata
        head = f"[kb/{h.id}] {meta.get('title') or '(untitled)'} (kind {meta.get('kind', 'doc')}, intent {meta.get('intent', 'any')})"
        parts.append(f"{head}\n{h.text}")
    return "\n\n".join(parts)


def _examples_text(hits: Sequence[Hit], nonce: str) -> str:
    if not hits:
        return "(none yet)"
    parts = []
    for h in hits:
        meta = h.metadata
        parts.append(
            f"[corrections/{h.id}] {meta.get('problem_type', '?')}, intent {meta.get('intent', '?')}\n"
            + untrusted_block("example", h.text, nonce)
        )
    return "\n\n".join(parts)


def output_format(settings: Settings) -> str:
    schema = settings.policies.output_schema
    if not schema:
        return "Plain text, as the agent would send it to the customer."
    return "The answer text must be a JSON document that validates against this JSON schema:\n" + json.dumps(schema, indent=2)


def _conversation_blocks(case: Case, settings: Settings, nonce: str) -> dict[str, str]:
    limit = settings.policies.max_message_chars
    original = case.original
    return {
        "conversation": untrusted_block("conversation", render_messages(case.interaction.prompt_messages(), limit), nonce),
        "original": untrusted_block("original_answer", render_messages([original] if original else [], limit), nonce),
    }


def corrector_messages(prompt: Prompt, settings: Settings, case: Case, found: Retrieved) -> list[BaseMessage]:
    nonce = new_nonce()
    return chat_messages(
        prompt,
        nonce,
        {"output_format": output_format(settings)},
        {
            "verdict": _verdict_text(case, settings, nonce),
            **_conversation_blocks(case, settings, nonce),
            "knowledge": _kb_text(found.kb),
            "examples": _examples_text(found.similar, nonce),
        },
    )


def verifier_messages(prompt: Prompt, settings: Settings, case: Case, answer: str) -> list[BaseMessage]:
    nonce = new_nonce()
    reference = "(none)"
    if case.reference is not None and (case.reference.intent or case.reference.answer):
        lines = [f"right intent: {case.reference.intent}"] if case.reference.intent else []
        lines += [f"right answer: {case.reference.answer}"] if case.reference.answer else []
        reference = untrusted_block("reference", "\n".join(lines), nonce)
    return chat_messages(
        prompt,
        nonce,
        {"output_format": output_format(settings)},
        {
            "verdict": _verdict_text(case, settings, nonce),
            **_conversation_blocks(case, settings, nonce),
            "correction": untrusted_block("correction", answer, nonce),
            "reference": reference,
        },
    )


# --- running -----------------------------------------------------------------------------------------------


def _answer(reply: Any) -> str:
    parsed = reply if isinstance(reply, CorrectorAnswer) else CorrectorAnswer.model_validate(reply)
    if not parsed.answer.strip():
        raise BadReply("the answer is blank")
    return parsed.answer.strip()


async def ask_answer(model: Any, messages: list[BaseMessage], retries: int) -> tuple[str | None, str]:
    """The corrector's answer, re-asked when the reply does not parse or is blank. Endpoint errors
    propagate for the bounded runner to retry."""
    answer, problem, calls = await ask_until_valid(model, messages, retries, _answer, reply_problem, "answer object")
    if answer is None:
        return None, f"the LLM corrector gave no usable answer in {calls} attempt(s): {problem}"
    return answer, ""


def correct_with_llm(ctx: Context, cases: list[Case]) -> CorrectSummary:
    settings = ctx.settings
    prompt = load_prompt(settings.correct.prompt)
    check_prompt = load_prompt(settings.correct.verifier_prompt)
    generator = f"llm:{settings.llm.corrector_model}"
    summary = CorrectSummary(corrector=generator, prompt_version=prompt.version)
    if not cases:
        return summary
    verifier = Verifier(settings)
    found = retrieve(ctx.index, settings, cases)
    retries = settings.correct.llm_retries
    # The endpoint's structured-output capability is the same for every caller: the judge's setting.
    method = settings.judge.structured_output
    verified: list[tuple[Case, str]] = []
    bugs: list[BaseException] = []

    async def run_all() -> list[ItemResult]:
        import openai

        async with (
            async_chat_model(settings, settings.llm.corrector_model) as writer_llm,
            async_chat_model(settings, settings.llm.verifier_model) as checker_llm,
        ):
            writer = writer_llm.with_structured_output(CorrectorAnswer, method=method)
            checker = checker_llm.with_structured_output(Preference, method=method)

            async def one(case: Case) -> tuple[Attempt, Verification | None]:
                attempt = label_attempt(case)
                if attempt is None:
                    answer, problem = await ask_answer(writer, corrector_messages(prompt, settings, case, found[case.failure.id]), retries)
                    attempt = Attempt(
                        answer=answer,
                        reason=problem,
                        generator=generator,
                        prompt_version=prompt.version,
                        context_ids=context_ids(found[case.failure.id]),
                    )
                if attempt.answer is None:
                    return attempt, None
                messages = verifier_messages(check_prompt, settings, case, attempt.answer)
                return attempt, await verifier.verify(case, attempt.answer, checker, messages)

            def saved(result: ItemResult) -> None:
                case: Case = result.item
                if result.ok:
                    assert result.value is not None  # one() returns (attempt, verification)
                    attempt, verification = result.value
                    outcome = save_attempt(ctx.store, case, attempt, verification)
                    if outcome.status == "verified":
                        verified.append((case, attempt.answer or ""))
                elif isinstance(result.exception, (openai.BadRequestError, openai.UnprocessableEntityError)):
                    # the endpoint refused this request (e.g. too long): asking again gives the same answer
                    refused = Attempt(
                        reason=f"the LLM endpoint refused the request: {result.error}", generator=generator, prompt_version=prompt.version
                    )
                    outcome = save_attempt(ctx.store, case, refused, None)
                elif result.transient or isinstance(result.exception, openai.APIError):
                    # down, or misconfigured (401, 404): the failure stays judged for the next run
                    outcome = CorrectOutcome(
                        failure_id=case.failure.id,
                        status="error",
                        generator=generator,
                        reasons=[f"{result.error} (after {result.attempts} attempt(s))"],
                    )
                else:
                    bugs.append(result.exception or RuntimeError(result.error))
                    return
                summary.outcomes.append(outcome)

            # The client's own timeout bounds each call; one item makes several calls, so no item-wide limit.
            return await run_bounded(cases, one, Limits.from_settings(settings, timeout_s=None), on_result=saved)

    run_sync(run_all)
    summary.indexed = index_corrections(ctx.index, verified) if verified else 0
    if bugs:
        raise bugs[0]  # not the endpoint's fault: keep the traceback
    errors = [o for o in summary.outcomes if o.status == "error"]
    if errors and len(errors) == len(cases):
        raise InfrastructureError(
            f"the LLM corrector at {settings.llm.base_url} failed for all {len(cases)} failure(s) ({errors[0].reasons[0]}); they stay judged"
        )
    return summary
