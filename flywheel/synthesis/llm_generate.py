"""The "llm" generator: new user turns with reference answers, written by an LLM for the intents that
want more samples.

Only with an endpoint (`inputs.chat_model`, set when llm.base_url is); offline it returns nothing and
reports nothing. For each intent in `inputs.wants` (or, with no wants, each intent of the verified
seeds) it asks for up to `synthesis.per_intent` samples, spread over several requests. Each request is
controlled by

  task        the intent, and the problem type its verified samples fix (the most common one);
  difficulty  easy, medium, hard, adversarial;
  style       formal, casual, terse, angry (of the customer's message only);

cycling through the sixteen difficulty and style combinations in a fixed order, from a start the run's
seed picks, so a small request still covers several of each. Each request is grounded in the KB
entries of its intent (and the intent-less policies) and two or three verified seeds of the intent
(their last user text and answer), rotated across requests.

Text from the project's records (intent names, KB entries, seed texts) reaches the model only inside
`untrusted_block` fences with a fresh nonce per request (flywheel.prompts.fence); the prompt
(prompts/synthesizer.md) is split at its user marker like the corrector's. The reply is schema-checked
(`SyntheticTurns`) and re-asked up to LLM_RETRIES times (flywheel.llm.ask_until_valid); a request that
still gives no valid reply, or whose endpoint keeps failing, is a GeneratorProblem with source
"llm:<intent>:<request index>", and the other requests' samples are kept. Requests run through
flywheel.llm.run_bounded (llm.max_in_flight at once, transient errors retried there).

Each sample records in `params` its difficulty, style, the model name, the prompt version and the
request index; source_id is "llm:<intent>".
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel.correct.llm import chat_messages
from flywheel.correct.verify import reply_problem
from flywheel.llm import BadReply, Limits, ask_until_valid, endpoint_failed, run_bounded_sync
from flywheel.prompts import Prompt, load_prompt
from flywheel.prompts.fence import clip, new_nonce, untrusted_block
from flywheel.records import Message, stable_hash
from flywheel.settings import Settings
from flywheel.synthesis.records import Generated, GeneratorOutput, GeneratorProblem, Seed, SynthesisInputs

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

GENERATOR = "llm"
PROMPT = "synthesizer"  # flywheel/prompts/synthesizer.md
DIFFICULTIES = ("easy", "medium", "hard", "adversarial")
STYLES = ("formal", "casual", "terse", "angry")
# Every (difficulty, style) pair once, ordered so that neighbours differ in both: the first four
# requests of an intent already cover every difficulty and every style.
COMBINATIONS = tuple((DIFFICULTIES[k % 4], STYLES[(k + k // 4) % 4]) for k in range(16))
EXAMPLES = 3  # verified seeds shown per request
KB_ENTRIES = 8  # KB entries shown per request
MAX_PER_CALL = 10  # samples asked for in one request: longer lists come back shorter and samier
LLM_RETRIES = 1  # re-asks after a reply out of schema (synthesis has no setting for it yet)
NO_PROBLEM = "none"  # the problem type of an intent without verified samples (as the trainer's replay rows)


class SyntheticTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="the customer's message")
    answer: str = Field(description="the reference answer the agent should send to it")


class SyntheticTurns(BaseModel):
    """The model's structured reply. The list sits in an object: structured output wants one at the root."""

    model_config = ConfigDict(extra="forbid")

    samples: list[SyntheticTurn] = Field(description="the new samples, each a customer message and its reference answer")


@dataclass(frozen=True)
class Request:
    """One call to the model: `count` samples of one intent at one difficulty and style."""

    intent: str
    index: int  # of this request among its intent's
    count: int
    problem_type: str
    difficulty: str
    style: str
    examples: tuple[Seed, ...]

    @property
    def source(self) -> str:
        return f"llm:{self.intent}:{self.index}"


# --- what to ask for -----------------------------------------------------------------------------------------


def plan(inputs: SynthesisInputs) -> list[Request]:
    """The requests for every intent that wants samples, in a fixed order."""
    per_intent = inputs.settings.synthesis.per_intent
    seeds: dict[str, list[Seed]] = defaultdict(list)
    for seed in sorted(inputs.seeds, key=lambda s: s.id):
        seeds[seed.intent].append(seed)
    if inputs.wants:
        wanted = {intent: min(n, per_intent) for intent, n in inputs.wants.items() if n > 0}
    else:
        wanted = dict.fromkeys(seeds, per_intent)
    requests = []
    for intent in sorted(wanted):
        count, own = wanted[intent], seeds.get(intent, [])
        calls = max(min(count, len(COMBINATIONS)), ceil(count / MAX_PER_CALL))
        start = int(stable_hash([inputs.seed, GENERATOR, intent], 8), 16) % len(COMBINATIONS)
        for index in range(calls):
            difficulty, style = COMBINATIONS[(start + index) % len(COMBINATIONS)]
            # each request shows other seeds, so the model sees more of the intent than three examples
            shown = tuple(own[(index * EXAMPLES + k) % len(own)] for k in range(min(EXAMPLES, len(own))))
            requests.append(
                Request(
                    intent=intent,
                    index=index,
                    count=count // calls + (index < count % calls),
                    problem_type=_problem_type(own),
                    difficulty=difficulty,
                    style=style,
                    examples=shown,
                )
            )
    return requests


def _problem_type(seeds: Sequence[Seed]) -> str:
    """The problem type most of the intent's verified samples fix (ties: the first by name)."""
    counts = Counter(s.problem_type for s in seeds)
    return min(counts, key=lambda p: (-counts[p], p)) if counts else NO_PROBLEM


def _kb_for(kb: Sequence[dict[str, Any]], intent: str) -> list[dict[str, Any]]:
    """The intent's KB entries, approved responses first; then the policies that name no intent, since
    they bind every answer (and adversarial requests test exactly them)."""
    own = sorted((e for e in kb if e.get("intent") == intent), key=lambda e: (e.get("kind") != "approved_response", str(e.get("id"))))
    general = sorted((e for e in kb if not e.get("intent") and e.get("kind") == "policy"), key=lambda e: str(e.get("id")))
    return (own + general)[:KB_ENTRIES]


# --- the prompt ----------------------------------------------------------------------------------------------


def request_messages(prompt: Prompt, settings: Settings, request: Request, kb: Sequence[dict[str, Any]]) -> list[BaseMessage]:
    nonce = new_nonce()
    limit = settings.policies.max_message_chars
    return chat_messages(
        prompt,
        nonce,
        {"output_format": _output_format(settings)},
        {
            "count": str(request.count),
            "intent": untrusted_block("intent", request.intent, nonce),
            "problem_type": _problem_line(settings, request.problem_type),
            "difficulty": request.difficulty,
            "style": request.style,
            "knowledge": "\n\n".join(untrusted_block("kb", _kb_text(e, limit), nonce) for e in kb) or "(nothing for this intent)",
            "examples": "\n\n".join(untrusted_block("example", _example_text(s, limit), nonce) for s in request.examples) or "(none yet)",
        },
    )


def _problem_line(settings: Settings, problem_type: str) -> str:
    # From the taxonomy (settings), not from a record: trusted, so it stands outside the fences. A name
    # the taxonomy does not know is left out rather than passed on unfenced.
    meaning = settings.taxonomy.problem_types.get(problem_type)
    if meaning is None:
        return "Problem type: none in particular; ordinary requests of the intent."
    return f"Problem type the samples teach the agent to avoid: {problem_type} ({meaning})."


def _kb_text(entry: dict[str, Any], limit: int) -> str:
    head = f"[kb/{entry.get('id')}] {entry.get('title') or '(untitled)'} (kind {entry.get('kind') or 'doc'})"
    return f"{head}\n{clip(str(entry.get('text') or ''), limit)}"


def _example_text(seed: Seed, limit: int) -> str:
    return f"customer: {clip(seed.last_user(), limit)}\nverified answer: {clip(seed.answer, limit)}"


def _output_format(settings: Settings) -> str:
    schema = settings.policies.output_schema
    if not schema:
        return "Plain text, as the agent would send it to the customer."
    return "Each answer must be a JSON document that validates against this JSON schema:\n" + json.dumps(schema, indent=2)


# --- asking --------------------------------------------------------------------------------------------------


class _InThread:
    """`ask_until_valid` awaits `ainvoke`; this runs the runnable's blocking `invoke` in a worker thread
    instead. The stage hands over a plain ChatOpenAI, whose async client langchain-openai caches for the
    whole process and binds to the first event loop (see flywheel.llm); its sync client has no loop."""

    def __init__(self, runnable: Any):
        self._runnable = runnable

    async def ainvoke(self, messages: list[Any]) -> Any:
        return await asyncio.to_thread(self._runnable.invoke, messages)


def _turns(reply: Any, limit: int) -> list[SyntheticTurn]:
    if reply is None:  # function calling: the model called no tool
        raise BadReply("the reply held no samples object")
    parsed = SyntheticTurns.model_validate(reply.model_dump() if isinstance(reply, BaseModel) else reply)
    turns = [SyntheticTurn(user=t.user.strip(), answer=t.answer.strip()) for t in parsed.samples]
    if not turns:
        raise BadReply("the samples list is empty")
    if any(not t.user or not t.answer for t in turns):
        raise BadReply("a sample has a blank user message or answer")
    return turns[:limit]  # more than asked for: the rest is not what the plan wanted


def unusable_reply(exc: BaseException) -> tuple[str, str]:
    """(detail, kind) of a reply that cannot be used, for ask_until_valid: the corrector's reading of
    replies, and a refusal too. Endpoint errors and bugs are re-raised."""
    from langchain_core.exceptions import ModelRefusalError

    if isinstance(exc, ModelRefusalError):
        return f"the model refused: {str(exc)[:200]}", "a refusal"
    return reply_problem(exc)


def _model_name(model: Any) -> str:
    return str(getattr(model, "model_name", None) or getattr(model, "model", None) or "unknown")


# --- the generator -------------------------------------------------------------------------------------------


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    out = GeneratorOutput()
    if inputs.chat_model is None:
        return out  # offline: nothing to ask
    requests = plan(inputs)
    if not requests:
        return out
    settings = inputs.settings
    prompt = load_prompt(PROMPT)
    model_name = _model_name(inputs.chat_model)
    # The endpoint's structured-output capability is the same for every caller: the judge's setting.
    runnable = _InThread(inputs.chat_model.with_structured_output(SyntheticTurns, method=settings.judge.structured_output))

    async def ask(request: Request) -> tuple[list[SyntheticTurn] | None, str, int]:
        messages = request_messages(prompt, settings, request, _kb_for(inputs.kb, request.intent))
        return await ask_until_valid(
            runnable, messages, LLM_RETRIES, lambda reply: _turns(reply, request.count), unusable_reply, "samples object"
        )

    # Each request may make several calls (the re-asks): the client's own timeout bounds each one.
    results = run_bounded_sync(requests, ask, Limits.from_settings(settings, timeout_s=None))
    system = _system_prefix(inputs.seeds)
    for result in results:
        request: Request = result.item
        if not result.ok:
            if not endpoint_failed(result):
                raise result.exception or RuntimeError(result.error)  # a bug, not the endpoint: keep its traceback
            problem = f"the LLM endpoint failed: {result.error} (after {result.attempts} attempt(s))"
            out.problems.append(GeneratorProblem(generator=GENERATOR, source=request.source, problem=problem))
            continue
        assert result.value is not None  # ask() returns a tuple
        turns, why, calls = result.value
        if turns is None:
            problem = f"no valid samples in {calls} attempt(s): {why}"
            out.problems.append(GeneratorProblem(generator=GENERATOR, source=request.source, problem=problem))
            continue
        params = {
            "difficulty": request.difficulty,
            "style": request.style,
            "model": model_name,
            "prompt_version": prompt.version,
            "request": request.index,
        }
        out.samples.extend(
            Generated(
                generator=GENERATOR,
                params=params,
                source_id=f"llm:{request.intent}",
                intent=request.intent,
                problem_type=request.problem_type,
                messages=[*system.get(request.intent, []), Message(role="user", content=turn.user)],
                answer=turn.answer,
            )
            for turn in turns
        )
    return out


def _system_prefix(seeds: Sequence[Seed]) -> dict[str, list[Message]]:
    """Per intent, the system messages that open its first verified seed (by id): the agent's own
    instructions in production. A sample without them would train the agent on prompts it never sees."""
    out: dict[str, list[Message]] = {}
    for seed in sorted(seeds, key=lambda s: s.id):
        if seed.intent not in out:
            lead = []
            for message in seed.messages:
                if message.role != "system":
                    break
                lead.append(message)
            out[seed.intent] = lead
    return out
