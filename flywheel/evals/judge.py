"""The judge stage: a verdict (problem type, severity, acceptance) for every triaged failure.

The rule judge (flywheel.evals.rule_judge) always runs. When an LLM endpoint is configured
(settings.llm.base_url), the LLM judge reads the logged conversation and gives a structured verdict,
combined with the rule findings:

  - a high/critical rule finding wins outright (the LLM is not asked: it could not change the outcome);
  - a Reference that shows the answer was the right one settles it as not a failure (not asked either);
  - otherwise the LLM decides, except that it can neither clear a rule finding nor make it milder: rule
    findings are facts about the answer, and logged text might have talked the LLM out of them.

Logged text is untrusted (ARCHITECTURE principle 5). It reaches the LLM only inside fenced blocks whose
tag is a fresh random nonce per judgment (flywheel.prompts.fence.untrusted_block); fence-like runs in the text are altered so
that nothing inside can end a block. The system prompt says the blocks are data, never instructions.
The reply is parsed against a schema built from the taxonomy; an unparsable or out-of-taxonomy verdict
is re-asked (settings.judge.llm_retries) and then recorded as unjudged with the reason, never guessed.
Only the verdict of the failure being judged is written: the LLM's reply carries no ids and no actions.

Endpoint trouble (429, 5xx, timeouts, after flywheel.llm's retries) leaves the failure as it was for the
next run (`deferred` in the summary); if every LLM call failed that way the stage raises
InfrastructureError. An endpoint refusing one request (400/422, e.g. too long) makes that one unjudged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from flywheel.context import Context
from flywheel.errors import InfrastructureError, NotFoundError
from flywheel.evals.rule_judge import ACCEPTANCE_FOR_SEVERITY, SEVERITY_RANK, RuleJudge, summarize, verdict_from_findings, worst
from flywheel.executor import batches, executor_for
from flywheel.llm import BadReply, ItemResult, Limits, ask_until_valid, async_chat_model, run_bounded, run_sync
from flywheel.prompts import Prompt, load_prompt
from flywheel.prompts.fence import USER_MARKER, clip, new_nonce, render_messages, untrusted_block
from flywheel.records import Acceptance, FailureStatus, Finding, Interaction, Message, Record, Reference, Verdict, utcnow
from flywheel.settings import SEVERITIES, Settings

__all__ = [
    "ACCEPTANCE_FOR_SEVERITY",
    "SEVERITY_RANK",
    "InvalidVerdict",
    "JudgeCase",
    "JudgeSummary",
    "LLMJudge",
    "LLMOutcome",
    "RuleJudge",
    "combine",
    "judge_answer",
    "judge_failures",
    "summarize",
    "verdict_from_findings",
    "verdict_schema",
    "worst",
]

SAVE_BATCH = 50


# --- the LLM verdict schema --------------------------------------------------------------------------------


def verdict_schema(settings: Settings) -> type[BaseModel]:
    """The verdict object the LLM must return; problem_type is an enum of the configured taxonomy.

    Every field is required (nullable where it may be empty) so the schema is valid in OpenAI's strict
    structured-output mode. The rationale's length is enforced after parsing (strict mode has no
    maxLength): an over-long rationale is cut, not a reason to re-ask."""
    problem_type: Any = Literal[tuple(settings.taxonomy.problem_types)]  # a type built at run time: a value to mypy
    severity: Any = Literal[SEVERITIES]
    return create_model(
        "JudgeVerdict",
        __config__=ConfigDict(extra="forbid"),
        __doc__="The judge's verdict on one logged answer.",
        is_failure=(bool, Field(description="true when the final answer was a failure")),
        problem_type=(problem_type | None, Field(description="the one problem type that fits best; null when not a failure")),
        severity=(severity | None, Field(description="null when not a failure")),
        acceptance=(Acceptance, Field(description="whether the answer can be sent")),
        rationale=(str, Field(description=f"why, in at most {settings.judge.rationale_max_chars} characters")),
    )


class InvalidVerdict(BadReply):
    """The reply parsed but says something impossible (a failure without a type or severity)."""


# --- one judgment ------------------------------------------------------------------------------------------


@dataclass
class JudgeCase:
    """What the judge looks at for one failure."""

    failure_id: str
    interaction: Interaction
    findings: list[Finding]
    reference: Reference | None = None
    answer: Message | None = None  # default: the interaction's last assistant message

    def __post_init__(self) -> None:
        if self.answer is None:
            self.answer = self.interaction.last_assistant()


@dataclass
class LLMOutcome:
    verdict: dict[str, Any] | None  # the validated verdict fields, or None
    reason: str = ""  # why there is no verdict
    calls: int = 0


class LLMJudge:
    """Asks the LLM for a verdict on a JudgeCase. Build it inside a running event loop with a model
    from `flywheel.llm.async_chat_model`; `ajudge` is safe to run concurrently."""

    def __init__(self, settings: Settings, model: Any, model_name: str | None = None):
        self.settings = settings
        self.model_name = model_name or settings.llm.judge_model
        self.prompt: Prompt = load_prompt(settings.judge.prompt)
        self.schema = verdict_schema(settings)
        self.retries = settings.judge.llm_retries
        # Without include_raw: a reply that does not parse raises (caught in ajudge), and the raw-message
        # bookkeeping would cost about as much CPU as the HTTP call itself (see bench/judge.py).
        self._runnable = model.with_structured_output(self.schema, method=settings.judge.structured_output)

    @property
    def name(self) -> str:
        return f"llm:{self.model_name}"

    def build_messages(self, case: JudgeCase, nonce: str) -> list[Any]:
        from langchain_core.messages import HumanMessage, SystemMessage

        text = self.prompt.text
        system_part, _, user_part = text.partition(USER_MARKER) if USER_MARKER in text else (text, "", "{blocks}")
        taxonomy = "\n".join(f"- {name}: {meaning}" for name, meaning in self.settings.taxonomy.problem_types.items())
        system = Prompt(self.prompt.name, system_part).render(
            nonce=nonce, problem_types=taxonomy, rationale_max=str(self.settings.judge.rationale_max_chars)
        )
        # The blocks go in last, with one plain replace: text inside them is never rendered again.
        user = user_part.strip().replace("{blocks}", self._blocks(case, nonce), 1)
        return [SystemMessage(system.strip()), HumanMessage(user)]

    def _blocks(self, case: JudgeCase, nonce: str) -> str:
        limit = self.settings.policies.max_message_chars
        inter = case.interaction
        signals = inter.signals.model_dump(exclude_none=True, exclude_defaults=True)
        facts = [f"logged intent: {inter.intent}"] if inter.intent else []
        facts += [f"{key}: {value}" for key, value in signals.items()]
        blocks = [
            untrusted_block("conversation", render_messages(inter.prompt_messages(), limit), nonce),
            untrusted_block("final_answer", render_messages([case.answer] if case.answer else [], limit), nonce),
            untrusted_block("signals", "\n".join(facts) or "(none)", nonce),
            untrusted_block(
                "rule_findings",
                "\n".join(f"- {f.problem_type} ({f.severity}) {f.check}: {f.detail}" for f in case.findings) or "(none)",
                nonce,
            ),
        ]
        if case.reference is not None:
            ref = [f"right intent: {case.reference.intent}"] if case.reference.intent else []
            ref += [f"right answer: {clip(case.reference.answer, limit)}"] if case.reference.answer else []
            blocks.append(untrusted_block("reference", "\n".join(ref) or "(none)", nonce))
        return "\n\n".join(blocks)

    async def ajudge(self, case: JudgeCase) -> LLMOutcome:
        """The validated verdict, or the reason there is none after 1 + llm_retries asks. Endpoint
        errors (429, 5xx, timeouts) are raised for flywheel.llm.run_bounded to retry."""
        messages = self.build_messages(case, new_nonce())
        verdict, problem, calls = await ask_until_valid(self._runnable, messages, self.retries, self._validate, _problem, "verdict object")
        if verdict is None:
            return LLMOutcome(verdict=None, reason=f"no valid verdict after {calls} attempt(s): {problem}", calls=calls)
        return LLMOutcome(verdict=verdict, calls=calls)

    def _validate(self, parsed: Any) -> dict[str, Any]:
        if parsed is None:  # function calling: the model called no tool, or another one
            raise InvalidVerdict("the reply held no verdict object")
        data = self.schema.model_validate(parsed.model_dump() if isinstance(parsed, BaseModel) else parsed).model_dump()
        if data["is_failure"]:
            if not data["problem_type"] or not data["severity"]:
                raise InvalidVerdict("a failure needs a problem_type and a severity")
        else:
            data["problem_type"] = data["severity"] = None
        limit = self.settings.judge.rationale_max_chars
        data["rationale"] = data["rationale"].strip()[:limit]
        return data


def _content_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the reply was not a usable verdict" (re-ask), as opposed to endpoint errors."""
    import openai
    from langchain_openai.chat_models.base import OpenAIRefusalError

    return (ValidationError, ValueError, OpenAIRefusalError, openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError)


def _problem(exc: BaseException) -> tuple[str, str]:
    """(detail, kind) of an unusable reply for `ask_until_valid`; anything else is re-raised."""
    if not isinstance(exc, _content_errors()):
        raise exc
    return _describe(exc, detail=True), _describe(exc, detail=False)


def _describe(exc: BaseException, detail: bool) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            parts.append(f"{where}: {err['type']}" + (f" (got {str(err.get('input'))[:80]!r})" if detail else ""))
        return "out of schema: " + "; ".join(parts)
    if isinstance(exc, InvalidVerdict):
        return str(exc)
    if detail:
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"unparsable reply: {type(exc).__name__}: {first[:200]}"
    return f"unparsable reply ({type(exc).__name__})"


def combine(case: JudgeCase, outcome: LLMOutcome, settings: Settings, judge: str) -> Verdict:
    """One verdict from the rule findings and the LLM's outcome (see the module doc for the order)."""
    top = worst(case.findings)
    llm = outcome.verdict
    if llm is None:
        if top is not None:  # the rules still prove a failure
            verdict = verdict_from_findings(case.failure_id, case.findings, settings, judge="rule")
            verdict.rationale = _join(verdict.rationale, f"llm judge: {outcome.reason}")
            return verdict
        return Verdict(failure_id=case.failure_id, is_failure=False, judge=judge, status="unjudged", reason=outcome.reason)
    if top is not None and (not llm["is_failure"] or SEVERITY_RANK[llm["severity"]] < SEVERITY_RANK[top.severity]):
        verdict = verdict_from_findings(case.failure_id, case.findings, settings, judge=judge)
        verdict.rationale = _join(verdict.rationale, f"llm: {llm['rationale']}")
        return verdict
    return Verdict(
        failure_id=case.failure_id,
        is_failure=llm["is_failure"],
        problem_type=llm["problem_type"],
        severity=llm["severity"],
        acceptance=llm["acceptance"],
        rationale=llm["rationale"],
        judge=judge,
    )


def _join(first: str, second: str, limit: int = 2000) -> str:
    return (f"{first} | {second}" if first else second)[:limit]


# --- the stage ---------------------------------------------------------------------------------------------


class JudgeSummary(Record):
    total: int = 0
    failures: int = 0  # judged to be failures
    not_failure: int = 0
    unjudged: int = 0
    deferred: int = 0  # the endpoint failed: left as they were, for the next run
    by_problem_type: dict[str, int] = {}
    by_severity: dict[str, int] = {}
    unjudged_reasons: dict[str, int] = {}
    judge: str = "rule"
    prompt_version: str = ""
    llm_calls: int = 0
    errors: list[str] = []  # the first few endpoint errors
    seconds: float = 0.0


def judge_failures(
    ctx: Context, failure_ids: list[str] | None = None, reference_for: Callable[[str], Reference | None] | None = None
) -> JudgeSummary:
    """Judge every TRIAGED failure (or exactly `failure_ids`, whatever their status) and store one
    verdict each. With an LLM endpoint configured, failures the rule judge alone left unjudged are
    taken again too. A failure's Reference is `reference_for(id)` when that gives one, else its newest
    human label. Returns counts; raises InfrastructureError if the LLM endpoint failed every call."""
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo

    started = time.monotonic()
    settings, store = ctx.settings, ctx.store
    rules = RuleJudge(settings)
    with store.engine.connect() as conn:
        if failure_ids is None:
            items = failure_repo.get_failures(conn, status=FailureStatus.TRIAGED)
            unjudged = failure_repo.get_failures(conn, status=FailureStatus.UNJUDGED)
            # A label given after the failure was left unjudged settles it now (people answer the label
            # queue after the cycle that asked); with an LLM, what the rules alone left open goes to it.
            relabelled = set(latest_labels(conn, [f.id for f in unjudged]))
            items += [
                f
                for f in unjudged
                if f.id in relabelled
                or (settings.llm.enabled and (v := failure_repo.latest_verdict(conn, f.id)) is not None and v.judge == "rule")
            ]
        else:
            items = failure_repo.get_failures(conn, ids=list(dict.fromkeys(failure_ids)))
            missing = sorted(set(failure_ids) - {f.id for f in items})
            if missing:
                raise NotFoundError(f"no failure with id {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        interactions = interaction_repo.get_many(conn, [f.interaction_id for f in items])
        labels = latest_labels(conn, [f.id for f in items])
    references = [(reference_for(f.id) if reference_for is not None else None) or labels.get(f.id) for f in items]
    pairs = [(interactions[f.interaction_id], reference) for f, reference in zip(items, references)]
    executor = executor_for(settings)  # with train.launcher "ray", the rule checks run as Ray tasks over batches
    if executor.distributed:
        found = [row for part in executor.map(partial(rule_findings, settings), batches(pairs, settings.ray.batch_rows)) for row in part]
    else:
        found = rule_findings(settings, pairs, rules)
    cases = [JudgeCase(failure_id=f.id, interaction=i, findings=fs, reference=r) for f, (i, r), fs in zip(items, pairs, found)]

    summary = JudgeSummary(total=len(cases))
    writer = _VerdictWriter(store, failure_repo.save_verdict)

    def keep(verdict: Verdict) -> None:
        _count(summary, verdict)
        writer.add(verdict)

    ask: list[JudgeCase] = []
    for case in cases:
        top = worst(case.findings)
        settled = (top is not None and SEVERITY_RANK[top.severity] >= SEVERITY_RANK["high"]) or (
            top is None and rules.confirms(case.answer, case.reference)
        )
        if settings.llm.enabled and not settled:
            ask.append(case)
        else:
            confirmed = (
                case.reference if rules.confirms(case.answer, case.reference) or rules.intent_agrees(case.answer, case.reference) else None
            )
            keep(verdict_from_findings(case.failure_id, case.findings, settings, confirmed_by=confirmed))
    try:
        if ask:
            summary.judge = f"rule+llm:{settings.llm.judge_model}"
            summary.prompt_version = load_prompt(settings.judge.prompt).version
            run_sync(lambda: _ask_llm(settings, ask, summary, keep))
    finally:
        writer.close()  # what was decided is kept even when the run stops on an error
        summary.seconds = round(time.monotonic() - started, 3)
    if ask and summary.deferred == len(ask):
        raise InfrastructureError(
            f"the LLM judge at {settings.llm.base_url} failed for all {len(ask)} failure(s) ({summary.errors[0]}); they keep their status for the next run"
        )
    return summary


class _VerdictWriter:
    """Saves verdicts in batches on one background thread, so that a commit never stalls the event
    loop that keeps the LLM calls in flight. Batches are written in order; `close` waits for all of
    them and raises the first write error."""

    def __init__(self, store: Any, save: Callable[[Any, Verdict], None]):
        self._store, self._save = store, save
        self._batch: list[Verdict] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-writer")
        self._futures: list[Future[None]] = []

    def add(self, verdict: Verdict) -> None:
        self._batch.append(verdict)
        if len(self._batch) >= SAVE_BATCH:
            self._submit()

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._futures.append(self._pool.submit(self._write, batch))

    def _write(self, batch: list[Verdict]) -> None:
        with self._store.begin() as conn:
            for verdict in batch:
                self._save(conn, verdict)

    def close(self) -> None:
        self._submit()
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


def rule_findings(
    settings: Settings, pairs: Sequence[tuple[Interaction, Reference | None]], rules: RuleJudge | None = None
) -> list[list[Finding]]:
    """The rule judge's findings on each captured interaction, given its reference: pure, so a batch of it
    runs the same in this process or as a Ray task (flywheel.executor)."""
    rules = rules or RuleJudge(settings)
    return [rules.label_findings(i.last_assistant(), reference, rules.check(i, reference=reference)) for i, reference in pairs]


async def _ask_llm(settings: Settings, cases: list[JudgeCase], summary: JudgeSummary, keep: Callable[[Verdict], None]) -> None:
    import openai

    judge_name = f"rule+llm:{settings.llm.judge_model}"
    async with async_chat_model(settings, settings.llm.judge_model) as model:
        llm = LLMJudge(settings, model)
        prompt_version = llm.prompt.version

        bugs: list[BaseException] = []

        def done(result: ItemResult) -> None:
            case: JudgeCase = result.item
            if result.ok:
                assert result.value is not None  # llm.ajudge returns an LLMOutcome
                outcome: LLMOutcome = result.value
            elif isinstance(result.exception, (openai.BadRequestError, openai.UnprocessableEntityError)):
                outcome = LLMOutcome(verdict=None, reason=f"the endpoint refused the request: {result.error}")
            elif result.transient or isinstance(result.exception, openai.APIError):
                summary.deferred += 1  # the endpoint is down or misconfigured (401, 404): try again later
                if len(summary.errors) < 5:
                    summary.errors.append(f"{case.failure_id}: {result.error} (after {result.attempts} attempt(s))")
                return
            else:
                bugs.append(result.exception or RuntimeError(result.error))
                return
            summary.llm_calls += outcome.calls
            verdict = combine(case, outcome, settings, judge_name)
            verdict.prompt_version = prompt_version
            keep(verdict)

        # One judgment is up to 1 + llm_retries calls, each bounded by the client's timeout; the runner's
        # cap covers them all, so a server that trickles bytes cannot hold a slot for ever.
        limits = Limits.from_settings(settings, timeout_s=settings.llm.timeout_s * (settings.judge.llm_retries + 1) + 5.0)
        await run_bounded(cases, llm.ajudge, limits, on_result=done)
    if bugs:
        raise bugs[0]  # not the endpoint's fault: keep the traceback (the CLI shows it as a bug)


def _count(summary: JudgeSummary, verdict: Verdict) -> None:
    if verdict.status == "unjudged":
        summary.unjudged += 1
        reason = verdict.reason.split(":")[0][:120]
        summary.unjudged_reasons = {**summary.unjudged_reasons, reason: summary.unjudged_reasons.get(reason, 0) + 1}
    elif verdict.is_failure:
        summary.failures += 1
        summary.by_problem_type = dict(Counter(summary.by_problem_type) + Counter({verdict.problem_type or "?": 1}))
        summary.by_severity = dict(Counter(summary.by_severity) + Counter({verdict.severity or "?": 1}))
    else:
        summary.not_failure += 1


# --- judging one answer (evaluation) ---------------------------------------------------------------------------


def judge_answer(
    settings: Settings,
    messages: Sequence[Message],
    answer: Message | str | None,
    reference: Reference | None = None,
    rule_judge: RuleJudge | None = None,
) -> tuple[bool, list[Finding]]:
    """(is_failure, findings) for one model answer to `messages`, by the rule judge: a failure when any
    check finds something. Pass a built `rule_judge` when judging many answers (it compiles once)."""
    judge = rule_judge or RuleJudge(settings)
    message = Message(role="assistant", content=answer) if isinstance(answer, str) else answer
    interaction = Interaction(id="answer", timestamp=utcnow(), messages=[*messages, *([message] if message else [])])
    findings = judge.check(interaction, answer=message, reference=reference) if message else judge.check_answer(None, reference)
    return bool(findings), findings
