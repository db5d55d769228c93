"""Running the supervisor graph: start, resume, answer an approval, list what waits.

These are the functions every way in calls (the CLI, the chat, the daemon, Slack):

    start_run(ctx, trigger, policy=None, yes=False, ...) -> RunOutcome     one autonomous cycle
    resume_run(ctx, run_id, ...) -> RunOutcome                             continue a stopped/crashed run
    decide(ctx, run_id_or_version, decision, approver, reason, channel) -> RunOutcome
    pending_approvals(ctx) -> list[PendingApproval]
    run_in_progress(ctx) -> bool

A run is a LangGraph thread (thread id = run id) compiled with a checkpointer from `open_checkpointer`:
the langgraph SQLite checkpointer in the state folder, or the PostgreSQL one when the store is
PostgreSQL. It runs with durability "sync": each step is on disk before the next starts, so a killed
process loses at most the step it was in, and `resume_run` re-runs exactly that step.

When the graph stops at the approval node, the run is `waiting_approval` with the PendingApproval in
`runs.pending`. `ask` (the terminal's inline prompt, or `yes=True`) may answer at once; otherwise the
run stays pending and any way in answers it later with `decide`, which records the decision (refusing a
wrong approver or a changed report before anything resumes) and resumes the run to its promotion.
"""

from __future__ import annotations

import getpass
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.types import Command

from flywheel.agent import runs
from flywheel.agent.graph import build_graph
from flywheel.agent.plan import ProposedPlan, is_plan
from flywheel.agent.policies import Policy, choose_policy
from flywheel.agent.state import TRIGGERS, new_request
from flywheel.context import Context
from flywheel.errors import InfrastructureError, NotFoundError, PolicyViolation, UserInputError
from flywheel.records import Record
from flywheel.release import approvals, registry
from flywheel.release.decisions import PendingApproval
from flywheel.release.records import Channel, Decision, DecisionKind
from flywheel.settings import Settings
from flywheel.tools.registry import build_tools

CHECKPOINT_FILE = "checkpoints.sqlite"
MAX_ASKS = 3  # times one drive asks for a decision before leaving the approval pending
Ask = Callable[[PendingApproval], Decision | None]
Confirm = Callable[[ProposedPlan], str | None]  # the person's answer to a chat's plan; None: nobody to ask


@dataclass
class AgentEvent:
    """One thing worth showing while a run goes: the agent said something, called a tool, got a result,
    a long step made progress, an approval is needed, a decision was applied."""

    kind: str  # say | call | result | progress | plan | approval | outcome | stopped
    text: str
    data: dict[str, Any] = field(default_factory=dict)


OnEvent = Callable[[AgentEvent], None]


class RunOutcome(Record):
    run_id: str
    state: str  # done | waiting_approval | stopped | failed
    message: str = ""  # the last thing the agent said
    pending: PendingApproval | None = None
    outcome: dict[str, Any] | None = None  # what the promotion node did (flywheel.release.decisions.DecisionOutcome)
    stop_reason: str | None = None
    error: str | None = None
    cycle: dict[str, Any] = {}


# --- checkpointers -------------------------------------------------------------------------------------------


@contextmanager
def open_checkpointer(settings: Settings) -> Iterator[Any]:
    """The checkpointer for this project: PostgresSaver on the store's PostgreSQL database (tables set up
    on first use), else SqliteSaver on `<state>/checkpoints.sqlite` (WAL, so readers do not block it)."""
    if settings.is_postgres:
        from langgraph.checkpoint.postgres import PostgresSaver

        url = settings.store_url.replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            with PostgresSaver.from_conn_string(url) as saver:
                saver.setup()
                yield saver
        except Exception as exc:
            if _is_connection_error(exc):
                raise InfrastructureError(f"cannot open the PostgreSQL checkpointer: {str(exc).splitlines()[0]}") from exc
            raise
        return
    from langgraph.checkpoint.sqlite import SqliteSaver

    path = settings.state_path / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)  # the saver serialises with its own lock
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        yield SqliteSaver(conn)
    finally:
        conn.close()


def _is_connection_error(exc: BaseException) -> bool:
    import psycopg

    return isinstance(exc, psycopg.OperationalError)


# --- driving the graph ---------------------------------------------------------------------------------------


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def _events(mode: str, chunk: Any) -> Iterator[AgentEvent]:
    if mode == "custom":
        if isinstance(chunk, dict):
            yield AgentEvent("progress", str(chunk.get("message", "")), chunk)
        return
    for node, update in (chunk or {}).items():
        if node == "__interrupt__":
            plans = [i.value for i in update if is_plan(getattr(i, "value", None))]
            if plans:
                yield AgentEvent("plan", str(plans[0]["text"]), plans[0])
                continue
            yield AgentEvent("approval", "waiting for a decision", {"interrupts": [getattr(i, "value", i) for i in update]})
            continue
        if not isinstance(update, dict):
            continue
        if update.get("stop_reason"):
            yield AgentEvent("stopped", update["stop_reason"])
        if node == "promotion" and update.get("outcome"):
            yield AgentEvent("outcome", update["messages"][0].content if update.get("messages") else "", update["outcome"])
            continue
        for message in update.get("messages") or []:
            if isinstance(message, AIMessage):
                if message.content and not update.get("stop_reason"):
                    yield AgentEvent("say", str(message.content))
                for call in message.tool_calls:
                    yield AgentEvent(
                        "call", f"{call['name']}({', '.join(f'{k}={v!r}' for k, v in (call.get('args') or {}).items())})", dict(call)
                    )
            elif isinstance(message, ToolMessage):
                yield AgentEvent(
                    "result", f"{message.name}: {str(message.content)[:300]}", {"tool": message.name, "error": message.status == "error"}
                )


def _last_said(values: dict[str, Any]) -> str:
    for message in reversed(values.get("messages", [])):
        if isinstance(message, AIMessage) and message.content:
            return str(message.content)
    return ""


def _drive(
    ctx: Context, run_id: str, graph_input: Any, policy: Policy, ask: Ask | None, on_event: OnEvent | None, confirm: Confirm | None = None
) -> RunOutcome:
    """Stream the graph until it ends or waits for a decision nobody here gives; keep `runs` in step."""
    settings, store = ctx.settings, ctx.store
    emit = on_event or (lambda _event: None)
    tools = build_tools(ctx)
    with open_checkpointer(settings) as saver:
        graph = build_graph(settings, policy, tools).compile(checkpointer=saver)
        config: RunnableConfig = {"configurable": {"thread_id": run_id}, "recursion_limit": 6 * settings.agent.max_steps + 50}
        asked = 0
        while True:
            try:
                for mode, chunk in graph.stream(graph_input, config, stream_mode=["updates", "custom"], durability="sync"):
                    for event in _events(mode, chunk):
                        emit(event)
            except InfrastructureError as exc:
                note = f"{exc} (resume with `flywheel resume {run_id}`)"
                runs.update_run(store, run_id, state=runs.FAILED, error=note)
                return RunOutcome(run_id=run_id, state=runs.FAILED, error=note)
            except KeyboardInterrupt:
                runs.update_run(store, run_id, state=runs.INTERRUPTED, error=f"interrupted; continue with `flywheel resume {run_id}`")
                raise
            except BaseException as exc:
                runs.update_run(store, run_id, state=runs.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
                raise
            snapshot = graph.get_state(config)
            values = snapshot.values or {}
            if snapshot.interrupts and is_plan(snapshot.interrupts[0].value):
                # A chat's plan is answered here and now: without anyone to ask, the answer is no.
                plan = ProposedPlan.model_validate(snapshot.interrupts[0].value)
                graph_input = Command(resume={"answer": confirm(plan) if confirm is not None else None})
                continue
            if snapshot.interrupts:
                pending = PendingApproval.model_validate(snapshot.interrupts[0].value)
                runs.update_run(store, run_id, state=runs.WAITING, pending=pending.model_dump(mode="json"), summary=_summary(values))
                # An answer the graph refused comes back as a new request with `refused` set; asking the
                # same way forever (say --yes by someone not on the approver list) would never end.
                asked += 1
                decision = ask(pending) if ask is not None and asked <= MAX_ASKS else None
                if decision is None:
                    return RunOutcome(
                        run_id=run_id, state=runs.WAITING, message=_last_said(values), pending=pending, cycle=values.get("cycle") or {}
                    )
                if not runs.claim_run(store, run_id, [runs.WAITING]):
                    raise UserInputError(f"run {run_id} was answered elsewhere meanwhile (see `flywheel runs`)")
                graph_input = Command(resume=_bound(decision, pending).as_dict())
                continue
            state = runs.STOPPED if values.get("stop_reason") else runs.DONE
            runs.update_run(store, run_id, state=state, pending=None, summary=_summary(values))
            return RunOutcome(
                run_id=run_id,
                state=state,
                message=_last_said(values),
                outcome=values.get("outcome"),
                stop_reason=values.get("stop_reason"),
                cycle=values.get("cycle") or {},
            )


def _bound(decision: Decision, pending: PendingApproval) -> Decision:
    """The decision, bound to the report the person was shown."""
    if decision.report_hash:
        return decision
    return Decision(
        decision.decision, decision.approver, decision.reason, decision.channel, pending.report_hash, decision.confirm_baselines
    )


def _summary(values: dict[str, Any]) -> dict[str, Any]:
    cycle = values.get("cycle") or {}
    keep = ("dataset_id", "job_id", "job_status", "candidate", "gate_passed", "report_hash", "done", "errors", "refused")
    return {
        "steps": values.get("steps", 0),
        "llm_calls": values.get("llm_calls", 0),
        "cycle": {k: cycle[k] for k in keep if k in cycle},
        "last_message": _last_said(values)[:500],
        "outcome": values.get("outcome"),
        "stop_reason": values.get("stop_reason"),
    }


def auto_approve(pending: PendingApproval) -> Decision:
    """`--yes`: the person running the command approves, on the terminal channel (the approver list
    still applies)."""
    return Decision("approved", getpass.getuser(), "approved with --yes", "terminal", pending.report_hash)


# --- the public entry points ------------------------------------------------------------------------------------


def start_run(
    ctx: Context,
    trigger: str = "run",
    policy: str | Policy | None = None,
    yes: bool = False,
    *,
    message: str | None = None,
    ask: Ask | None = None,
    on_event: OnEvent | None = None,
    run_id: str | None = None,
    confirm: Confirm | None = None,
) -> RunOutcome:
    """Start one run: an autonomous improvement cycle (trigger run, schedule, demo) or a first request.

    `policy`: a name (auto, heuristic, llm) or a Policy; default settings.agent.policy. `yes` approves
    at the approval as the local user; otherwise `ask` may answer, and without either the run stops
    there, pending. `confirm` answers a chat's plan before its first costly step (no answer: nothing
    starts); other triggers are never asked. Refuses to start a second autonomous run while one is running."""
    if trigger not in TRIGGERS:
        raise UserInputError(f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}")
    if trigger != "chat" and run_in_progress(ctx):
        busy = next(r.id for r in runs.list_runs(ctx.store, states=[runs.RUNNING]) if r.trigger != "chat" and r.state == runs.RUNNING)
        raise UserInputError(f"run {busy} is in progress; one autonomous run at a time (see `flywheel runs`)")
    chosen = policy if policy is not None and not isinstance(policy, str) else choose_policy(ctx.settings, policy)
    run_id = run_id or new_run_id()
    runs.create_run(ctx.store, run_id, trigger, chosen.name)
    return _drive(ctx, run_id, new_request(run_id, trigger, message), chosen, auto_approve if yes else ask, on_event, confirm)


def send_message(
    ctx: Context,
    run_id: str,
    text: str,
    policy: Policy,
    *,
    ask: Ask | None = None,
    on_event: OnEvent | None = None,
    confirm: Confirm | None = None,
) -> RunOutcome:
    """A new request in an existing run (the next turn of a chat)."""
    run = runs.get_run(ctx.store, run_id)
    # A failed or interrupted step must finish first (resume_run): a new request would leave it behind.
    if not runs.claim_run(ctx.store, run_id, [runs.DONE, runs.STOPPED]):
        hint = "answer its approval first" if run.state == runs.WAITING else f"resume it first (flywheel resume {run_id})"
        raise UserInputError(f"run {run_id} is {run.state}; {hint}")
    return _drive(ctx, run_id, new_request(run_id, run.trigger, text), policy, ask, on_event, confirm)


def resume_run(
    ctx: Context,
    run_id: str,
    *,
    yes: bool = False,
    ask: Ask | None = None,
    on_event: OnEvent | None = None,
    policy: str | Policy | None = None,
    confirm: Confirm | None = None,
) -> RunOutcome:
    """Continue a run that was stopped, failed or interrupted (re-running the step it was in), or show
    a pending approval again (`yes`/`ask` may answer it). A run stopped by a limit continues with fresh
    counters. A done run is left alone."""
    run = runs.get_run(ctx.store, run_id)
    if run.state == runs.DONE:
        return RunOutcome(
            run_id=run_id, state=runs.DONE, message=str(run.summary.get("last_message", "")), outcome=run.summary.get("outcome")
        )
    if run.state == runs.RUNNING:
        raise UserInputError(f"run {run_id} is running in process {run.pid}; it cannot be resumed twice")
    if not runs.claim_run(ctx.store, run_id, [run.state]):
        raise UserInputError(f"run {run_id} changed state meanwhile (see `flywheel runs`)")
    chosen = policy if policy is not None and not isinstance(policy, str) else choose_policy(ctx.settings, policy or run.policy)
    graph_input: Any = None
    if run.state == runs.STOPPED:
        graph_input = {"steps": 0, "llm_calls": 0, "stop_reason": None}
    return _drive(ctx, run_id, graph_input, chosen, auto_approve if yes else ask, on_event, confirm)


def waiting_run(ctx: Context, run_id_or_version: str) -> runs.RunRow | None:
    """The run that waits for a decision: by run id, or the oldest waiting on a version (id or alias).
    None when nothing waits on that version; NotFoundError when it names neither a run nor a version."""
    found = runs.find_run(ctx.store, run_id_or_version)
    if found is not None:
        if not found.pending or found.state not in (runs.WAITING, runs.INTERRUPTED, runs.FAILED):
            raise UserInputError(f"run {found.id} is {found.state}, not waiting for a decision")
        return found
    version = registry.resolve(ctx.store, run_id_or_version).id
    waiting = runs.waiting_on(ctx.store, version)
    return waiting[0] if waiting else None


def decide(
    ctx: Context,
    run_id_or_version: str,
    decision: DecisionKind,
    approver: str,
    reason: str = "",
    channel: Channel = "terminal",
    *,
    on_event: OnEvent | None = None,
    confirm_baselines: bool = True,
) -> RunOutcome:
    """Answer a pending approval and resume the run to its promotion (or rejection).

    The decision is recorded first, through flywheel.release.approvals: a wrong approver, a version someone
    already decided differently, or a report that changed since the request is refused here
    (PolicyViolation) and nothing resumes. Raises NotFoundError when nothing waits on that id."""
    run = waiting_run(ctx, run_id_or_version)
    if run is None:
        raise NotFoundError(f"no run waits for a decision on {run_id_or_version!r} (see `flywheel approvals`)")
    pending = PendingApproval.model_validate(run.pending)
    answer = Decision(decision, approver, reason, channel, pending.report_hash, confirm_baselines)
    current = registry.resolve(ctx.store, pending.version)
    if current.eval_report_hash != pending.report_hash:
        raise PolicyViolation(
            f"{pending.version}'s report changed since the request ({pending.report_hash[:12]} -> "
            f"{(current.eval_report_hash or '')[:12]}); nothing was decided"
        )
    if answer.decision == "approved":
        approvals.record_approval(ctx.store, pending.version, "approved", approver, channel, reason, run_id=run.id)
    else:
        approvals.reject(ctx.store, pending.version, approver, reason, channel, run_id=run.id)
    if not runs.claim_run(ctx.store, run.id, [runs.WAITING, runs.INTERRUPTED, runs.FAILED]):
        raise UserInputError(f"run {run.id} is being resumed by another process; the decision is recorded")
    return _drive(ctx, run.id, Command(resume=answer.as_dict()), choose_policy(ctx.settings, run.policy), None, on_event)


def pending_approvals(ctx: Context) -> list[PendingApproval]:
    """Every approval some run waits for, oldest first."""
    waiting = runs.list_runs(ctx.store, limit=500, states=[runs.WAITING])
    return [PendingApproval.model_validate(r.pending) for r in sorted(waiting, key=lambda r: r.created_at) if r.pending]


def run_in_progress(ctx: Context) -> bool:
    """Is an autonomous run (not a chat) being driven by a live process now?"""
    return any(r.trigger != "chat" and r.state == runs.RUNNING for r in runs.list_runs(ctx.store, limit=100, states=[runs.RUNNING]))


def list_runs(ctx: Context, limit: int = 50) -> list[runs.RunRow]:
    return runs.list_runs(ctx.store, limit=limit)


def get_run(ctx: Context, run_id: str) -> runs.RunRow:
    return runs.get_run(ctx.store, run_id)
