"""What drives the supervisor node: an LLM with the tools bound, or a heuristic that needs no LLM.

Both return the same thing, an AIMessage (text, tool calls, or both), so the graph around them is one
graph: the tool node runs whatever was asked for, the approval and promotion nodes do not care who
asked.

`HeuristicPolicy` decides from the state and the store's numbers (PipelineStatus): what ran this cycle,
how many failures wait for the judge or a correction, whether verified samples exist, the dataset, the
job's status, the gate result. It is the offline default and what scheduled runs fall back to when no
LLM endpoint is configured (`agent.policy = "auto"`). In a chat it answers a few kinds of question
(what failed most, where things stand, why a version passed or failed its gate) and runs a cycle when
asked to fix or improve something.

`LLMPolicy` is a langchain-openai chat model with the registry's tools bound and the system prompt
prompts/supervisor.md (the taxonomy, the read-only gate, the current PipelineStatus filled in).
Transient endpoint errors are retried (tenacity) with the shared backoff rules; an endpoint that stays
down raises InfrastructureError, which stops the run with a resumable checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from flywheel.errors import InfrastructureError
from flywheel.prompts import load_prompt
from flywheel.settings import Settings
from flywheel.tools.failures import PipelineStatus, pipeline_status
from flywheel.tools.labels import labelling_budget_left
from flywheel.tools.synthesis import shortfall

if TYPE_CHECKING:
    from flywheel.agent.state import AgentState
    from flywheel.tools.registry import ToolRegistry

HEURISTIC, LLM = "heuristic", "llm"
TRAINING_WAIT_S = 3600  # how long one training_status call waits for the job before the next step


class Policy(Protocol):
    name: str
    uses_llm: bool

    def decide(self, state: AgentState, tools: ToolRegistry) -> AIMessage:
        """The supervisor's next message: tool calls to run, or text that ends this request."""


def choose_policy(settings: Settings, name: str | None = None, model: Any = None) -> Policy:
    """`name` or settings.agent.policy; "auto" is the LLM when an endpoint is configured."""
    wanted = name or settings.agent.policy
    if wanted == "auto":
        wanted = LLM if settings.llm.enabled else HEURISTIC
    if wanted == LLM:
        return LLMPolicy(settings, model=model)
    if wanted == HEURISTIC:
        return HeuristicPolicy(settings)
    from flywheel.errors import UserInputError

    raise UserInputError(f"unknown policy {wanted!r}; expected auto, heuristic or llm")


def _call(name: str, step: int, **args: Any) -> dict[str, Any]:
    # Deterministic ids (`step` is the thread's message count): a supervisor step re-run after a crash
    # asks for the same calls, and no later step reuses an id.
    return {"name": name, "args": args, "id": f"call_h{step}_{name}", "type": "tool_call"}


def _since_request(messages: list[BaseMessage]) -> tuple[str, list[ToolMessage]]:
    """The newest human request and the tool results that came after it."""
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], HumanMessage):
            results = [m for m in messages[index + 1 :] if isinstance(m, ToolMessage)]
            return str(messages[index].content), results
    return "", []


# --- the heuristic ------------------------------------------------------------------------------------------

CHAT_INTENTS = (
    ("report", re.compile(r"\b(v\d+)\b.*\b(gate|fail\w*|pass\w*|report|why)\b|\bwhy\b.*\b(v\d+)\b", re.I)),
    ("cycle", re.compile(r"\b(fix|improve|train|retrain|cycle|run)\b", re.I)),
    ("counts", re.compile(r"\b(fail\w*|problems?|mistakes?|errors?)\b", re.I)),
    ("status", re.compile(r"\b(status|state|where|progress|jobs?|candidates?)\b", re.I)),
)
HELP = (
    'I run offline with the heuristic policy, so I can: run an improvement cycle ("fix it", "run a cycle"), '
    'count failures ("what failed most?"), say where things stand ("status"), and explain a version\'s gate '
    '("why did v3 fail its gate?"). Configure llm.base_url for free-form conversation.'
)


class HeuristicPolicy:
    """One improvement cycle, step by step, decided from numbers; no LLM."""

    name = HEURISTIC
    uses_llm = False

    def __init__(self, settings: Settings):
        self.settings = settings

    def decide(self, state: AgentState, tools: ToolRegistry) -> AIMessage:
        step = len(state.get("messages", []))
        if state.get("trigger") == "chat":
            request, results = _since_request(list(state.get("messages", [])))
            intent = next((name for name, pattern in CHAT_INTENTS if pattern.search(request)), None)
            if intent is None:
                return AIMessage(content=HELP)
            if intent != "cycle":
                return self._answer(intent, request, results, step)
        return self._cycle_step(state, tools, step)

    # chat questions: one tool call, then a sentence from its result
    def _answer(self, intent: str, request: str, results: list[ToolMessage], step: int) -> AIMessage:
        if not results:
            if intent == "report":
                version = re.search(r"\bv\d+\b", request, re.I)
                return AIMessage(
                    content="", tool_calls=[_call("read_eval_report", step, version=version.group().lower() if version else "candidate")]
                )
            tool = {"counts": "failure_counts", "status": "pipeline_status"}[intent]
            return AIMessage(content="", tool_calls=[_call(tool, step)])
        last = results[-1]
        if last.status == "error":
            return AIMessage(content=f"I could not answer that: {last.content}")
        data = json.loads(str(last.content))
        if intent == "counts":
            rows = [r for r in data if r.get("problem_type")][:5] or data[:5]
            if not rows:
                return AIMessage(content="No failures are recorded yet. Ingest logs and run a cycle.")
            parts = [
                f"{r.get('problem_type') or 'not judged yet'} ({r.get('severity') or '-'}): {r['failures']} failures, seen {r.get('frequency') or r['failures']} times"
                for r in rows
            ]
            return AIMessage(content="Most frequent problems: " + "; ".join(parts) + ".")
        if intent == "report":
            verdict = "passed" if data["gate_passed"] else "failed"
            why = data["failed_checks"] or data["reasons"][:3]
            return AIMessage(
                content=f"{data['version']} {verdict} its gate against {data['champion']}: "
                + " ".join(why)
                + f" (report {data.get('report_html') or data['report_json']})"
            )
        return AIMessage(content=_status_sentence(PipelineStatus.model_validate(data)))

    # the cycle
    def _cycle_step(self, state: AgentState, tools: ToolRegistry, step: int) -> AIMessage:
        cycle = dict(state.get("cycle") or {})
        done, errors = set(cycle.get("done", [])), dict(cycle.get("errors", {}))
        if state.get("outcome"):
            return AIMessage(content=_finish(cycle, "The decision was applied"))
        if errors:
            name, message = next(iter(errors.items()))
            return AIMessage(content=_finish(cycle, f"Stopped: {name} failed: {message}"))
        status = pipeline_status(tools.ctx)
        if "triage_new_logs" not in done:
            return AIMessage(content="", tool_calls=[_call("triage_new_logs", step)])
        if status.waiting_for_judge and "request_labels" not in done and "request_labels" in tools and labelling_budget_left(tools.ctx) > 0:
            # labels first: a labelled failure is judged against the right intent, not only by the rules
            return AIMessage(content="", tool_calls=[_call("request_labels", step)])
        if status.waiting_for_judge and "judge_failures" not in done:
            return AIMessage(content="", tool_calls=[_call("judge_failures", step)])
        if status.waiting_for_correction and "generate_corrections" not in done:
            return AIMessage(content="", tool_calls=[_call("generate_corrections", step)])
        if (
            not cycle.get("dataset_id")
            and self.settings.synthesis.enabled
            and "synthesize_samples" not in done
            and "synthesize_samples" in tools
            and status.verified_problem_samples > 0
            and shortfall(tools.ctx)
        ):
            # verified samples are short for some intent or problem type: multiply them before building
            return AIMessage(content="", tool_calls=[_call("synthesize_samples", step)])
        if not cycle.get("dataset_id"):
            if status.awaiting_decision:
                # the same samples would train the same candidate again: a person decides first
                return AIMessage(
                    content=_finish(cycle, f"{', '.join(status.awaiting_decision)} waits for a person's decision; answer it first")
                )
            if status.verified_problem_samples == 0:
                return AIMessage(content=_finish(cycle, "Nothing to train on: no verified corrections in the problem tier"))
            return AIMessage(content="", tool_calls=[_call("build_dataset", step)])
        job_id, job_status = cycle.get("job_id"), cycle.get("job_status")
        if not job_id:
            if int(state.get("training_runs", 0)) >= self.settings.agent.max_training_runs:
                return AIMessage(
                    content=_finish(cycle, f"The training budget ({self.settings.agent.max_training_runs} per cycle) is spent")
                )
            return AIMessage(content="", tool_calls=[_call("launch_training", step, dataset_id=cycle["dataset_id"])])
        if job_status in ("queued", "running"):
            return AIMessage(content="", tool_calls=[_call("training_status", step, job_id=job_id, wait_seconds=TRAINING_WAIT_S)])
        if job_status in ("failed", "killed"):
            if "resume_training" in done:
                return AIMessage(content=_finish(cycle, f"Training job {job_id} {job_status} again after a resume"))
            return AIMessage(content="", tool_calls=[_call("resume_training", step, job_id=job_id)])
        if not cycle.get("candidate"):
            return AIMessage(content="", tool_calls=[_call("register_candidate", step, job_id=job_id)])
        if cycle.get("candidate_status") not in (None, "candidate", "canary"):
            return AIMessage(content=_finish(cycle, f"This data trained {cycle['candidate']} before, which is {cycle['candidate_status']}"))
        if cycle.get("gate_passed") is None:
            return AIMessage(content="", tool_calls=[_call("run_evaluation", step, version=cycle["candidate"])])
        if cycle.get("gate_passed") and self.settings.canary.before_approval:
            if cycle.get("canary_state") == "rolled_back":
                return AIMessage(
                    content=_finish(cycle, f"The canary of {cycle['candidate']} was rolled back: {cycle.get('canary_reason', '')}")
                )
            if cycle.get("canary") != cycle["candidate"]:
                return AIMessage(content="", tool_calls=[_call("start_canary", step, version=cycle["candidate"])])
            if not cycle.get("canary_state"):
                return AIMessage(content="", tool_calls=[_call("canary_status", step)])
        return AIMessage(content=_finish(cycle, ""))


def _status_sentence(s: PipelineStatus) -> str:
    waiting = ", ".join(f"{count} {name}" for name, count in sorted(s.failures_by_status.items())) or "no failures"
    cands = (
        ", ".join(
            f"{c.version} ({c.status}, gate {'passed' if c.gate_passed else 'not passed' if c.gate_passed is False else 'not run'})"
            for c in s.candidates
        )
        or "none"
    )
    jobs = ", ".join(s.active_jobs) or "none"
    asks = f" Waiting for a person's decision: {', '.join(s.awaiting_decision)}." if s.awaiting_decision else ""
    return (
        f"{s.interactions} interactions logged; failures: {waiting}; {s.verified_problem_samples} verified samples "
        f"ready to train on. Champion: {s.champion or 'none'}. Undecided candidates: {cands}. Running jobs: {jobs}.{asks}"
    )


def _finish(cycle: dict[str, Any], why: str) -> str:
    """The cycle's closing report, from its facts."""
    parts = []
    if cycle.get("dataset_id"):
        parts.append(f"dataset {cycle['dataset_id']}")
    if cycle.get("job_id"):
        parts.append(f"training job {cycle['job_id']} {cycle.get('job_status', '')}".strip())
    if cycle.get("candidate"):
        gate = cycle.get("gate_passed")
        verdict = "passed its gate" if gate else "failed its gate" if gate is False else "not evaluated"
        parts.append(f"candidate {cycle['candidate']} {verdict}")
    done = ", ".join(cycle.get("done", [])) or "nothing"
    text = f"Cycle finished ({'; '.join(parts) or 'no candidate'}). Steps run: {done}."
    return text + (f" {why}." if why else "")


# --- the LLM ------------------------------------------------------------------------------------------------


class LLMPolicy:
    """A chat model with the tools bound. `model` may be any langchain chat model (tests pass scripted
    ones); by default `flywheel.llm.chat_model(settings, llm.supervisor_model)`, built on first use so a
    run that only resumes to its promotion needs no endpoint."""

    name = LLM
    uses_llm = True

    def __init__(self, settings: Settings, model: Any = None):
        self.settings = settings
        self._model = model
        self.prompt = load_prompt(settings.agent.prompt)

    def model(self) -> Any:
        if self._model is None:
            from flywheel.llm import chat_model

            self._model = chat_model(self.settings, self.settings.llm.supervisor_model)
        return self._model

    def system_prompt(self, tools: ToolRegistry) -> str:
        s = self.settings
        taxonomy = "\n".join(f"- {name}: {text}" for name, text in s.taxonomy.problem_types.items())
        gate = "\n".join(f"- {key}: {value}" for key, value in s.gate.model_dump().items())
        return self.prompt.render(
            taxonomy=taxonomy,
            gate=gate,
            status=_status_sentence(pipeline_status(tools.ctx)),
            max_training_runs=str(s.agent.max_training_runs),
        )

    def decide(self, state: AgentState, tools: ToolRegistry) -> AIMessage:
        bound = self.model().bind_tools(tools.langchain_tools())
        messages: list[BaseMessage] = [SystemMessage(content=self.system_prompt(tools)), *state.get("messages", [])]
        return self._invoke(bound, messages)

    def _invoke(self, bound: Any, messages: list[BaseMessage]) -> AIMessage:
        from flywheel.llm import Limits, classify, one_line

        limits = Limits.from_settings(self.settings)

        def wait(state: RetryCallState) -> float:
            if state.attempt_number > limits.retries:  # the last attempt: no wait follows it
                return 0.0
            exc = state.outcome.exception() if state.outcome is not None else None
            return limits.backoff(state.attempt_number, classify(exc)[1] if exc is not None else None)

        # the shared rules (flywheel.llm's runner): transient endpoint errors only, with its backoff
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: _endpoint_error(exc) and classify(exc)[0]),
            stop=stop_after_attempt(limits.retries + 1),
            wait=wait,
            sleep=lambda seconds: time.sleep(seconds),
            reraise=True,  # the last error itself, not tenacity's RetryError
        )
        try:
            reply = retrying(bound.invoke, messages)
        except Exception as exc:
            if not _endpoint_error(exc):
                raise  # a bug, not the endpoint: keep its traceback
            where = self.settings.llm.base_url or "the configured model"
            raise InfrastructureError(f"the supervisor's LLM at {where} failed: {one_line(exc)}") from exc
        if not isinstance(reply, AIMessage):
            raise InfrastructureError(f"the supervisor's LLM returned {type(reply).__name__}, not a message")
        return AIMessage(
            content=reply.content,
            tool_calls=reply.tool_calls,
            invalid_tool_calls=reply.invalid_tool_calls,
            id=reply.id,
            response_metadata=reply.response_metadata,
            usage_metadata=reply.usage_metadata,
        )


def _endpoint_error(exc: BaseException) -> bool:
    """Errors that come from talking to the endpoint (as opposed to bugs in our code)."""
    import openai

    from flywheel.llm import TransientError, _httpx_modules

    if isinstance(exc, (openai.APIError, TransientError, TimeoutError, ConnectionError)):
        return True
    return any(isinstance(exc, lib.HTTPError) for lib in _httpx_modules())
