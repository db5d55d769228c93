"""The supervisor graph: supervisor -> (plan) -> tools -> (approval -> promotion) ... as a LangGraph StateGraph.

    START -> supervisor --(tool calls)--> tools --(a candidate passed its gate)--> approval --> promotion -> END
                 ^    \\--(text, or a limit)--> END       |                           |  ^
                 |                                      v                           v  | (answer refused)
                 +------------------------------------ supervisor <----(nothing to decide)

    In a chat, a first costly call goes supervisor -> plan -> tools (yes) or plan -> END (anything else).

`build_graph(settings, policy, tools)` returns the graph uncompiled; the caller compiles it with a
checkpointer (flywheel.agent.runner.open_checkpointer: SQLite by default, PostgreSQL when the store is)
and runs it with `durability="sync"`, so every step is on disk before the next one starts.

- supervisor: the policy's next message (tool calls or text). Stops at the step limit and, for the LLM
  policy, at the LLM-call budget (settings.agent).
- plan: in a chat only, before the first costly call of a request (labels, a dataset, training), pauses
  with `interrupt(ProposedPlan)` until the person says yes; anything else ends the request with nothing
  started (flywheel.agent.plan). Runs started to run a cycle (run, schedule, demo, api) never pass here.
- tools: runs the requested calls through the registry. A call the model got wrong (unknown tool,
  unknown or invalid argument, an id that names nothing, a gate or policy refusal, a failed job) goes
  back to it as a ToolMessage. An InfrastructureError stops the run; the step is not saved, so resuming
  re-runs it. Calls that change things are recorded in table `effects` under their tool-call id, so a
  re-run returns the recorded result instead of acting twice. The training-run budget is enforced here.
- approval: when a tool result says a candidate passed its gate (and, with canary.before_approval, its
  canary was observed and not rolled back), re-reads the registry and, if the candidate still needs a
  decision, pauses with `interrupt(PendingApproval)` (flywheel.release.decisions).
- promotion: applies the decision (record, promote or reject) with every check in code.

Test hook (inert unless set): FLYWHEEL_TEST_PAUSE_AT names a point, "supervisor", "approval",
"promotion", "tools:<tool name>" or "tools:<tool name>:start"; when the run reaches it, the node writes
the point's name to FLYWHEEL_TEST_PAUSE_FILE (when set) and sleeps (FLYWHEEL_TEST_PAUSE_SECONDS, default
600), so a test can SIGKILL the process exactly there. The supervisor pauses after the policy decided,
a tool after it ran (or, with ":start", before), the approval node before it asks, the promotion node
after it acted: the points where a crash is hardest to recover from. Production never sets it; unset,
the hook is one environment lookup.
"""

from __future__ import annotations

import os
import time
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from pydantic import ValidationError

from flywheel.agent import plan as plan_rules
from flywheel.agent import runs
from flywheel.agent.policies import Policy
from flywheel.agent.state import AgentState
from flywheel.errors import InfrastructureError, JobFailed, PolicyViolation, ToolInputError, UserInputError
from flywheel.release import decisions, registry
from flywheel.release.records import Decision
from flywheel.settings import Settings
from flywheel.tools.registry import ToolRegistry, render_result

NODES = ("supervisor", "plan", "tools", "approval", "promotion")
PAUSE_ENV, PAUSE_FILE_ENV = "FLYWHEEL_TEST_PAUSE_AT", "FLYWHEEL_TEST_PAUSE_FILE"
# Mistakes of the caller: they go back to the model as observations (ARCHITECTURE principle 6).
MODEL_ERRORS = (ToolInputError, UserInputError, PolicyViolation, JobFailed, ValidationError)


def pause_point(name: str) -> None:
    """The crash-test hook (see the module docstring). Does nothing unless FLYWHEEL_TEST_PAUSE_AT is `name`."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        with open(marker, "w", encoding="utf-8") as handle:
            handle.write(f"{name} {os.getpid()}\n")
    time.sleep(float(os.environ.get("FLYWHEEL_TEST_PAUSE_SECONDS", "600")))


def _stream_writer() -> Any:
    from langgraph.config import get_stream_writer

    try:
        return get_stream_writer()
    except RuntimeError:  # outside a graph run (a node called directly)
        return lambda _chunk: None


def run_id_of(state: AgentState) -> str:
    """The run id: set by the runner's input; a graph started elsewhere (LangGraph Studio) uses its thread id."""
    if state.get("run_id"):
        return str(state["run_id"])
    from langgraph.config import get_config

    return str(get_config()["configurable"]["thread_id"])


def _last_ai(state: AgentState) -> AIMessage | None:
    for message in reversed(state.get("messages", [])):
        if isinstance(message, AIMessage):
            return message
    return None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        return f"invalid argument {where}: {err['msg']}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the graph ------------------------------------------------------------------------------------------------


def build_graph(settings: Settings, policy: Policy, tools: ToolRegistry) -> StateGraph:
    """The supervisor graph, uncompiled. `tools` is bound to the run's Context, whose store the approval
    and promotion nodes also use."""
    ctx = tools.ctx
    limits = settings.agent

    def supervisor(state: AgentState) -> dict[str, Any]:
        steps, llm_calls = int(state.get("steps", 0)), int(state.get("llm_calls", 0))
        if steps >= limits.max_steps:
            return _stop(f"the step limit ({limits.max_steps} steps per request) is reached")
        if policy.uses_llm and llm_calls >= limits.max_llm_calls:
            return _stop(f"the LLM budget ({limits.max_llm_calls} calls per request) is spent")
        message = policy.decide(state, tools)
        pause_point("supervisor")
        update: dict[str, Any] = {"messages": [message], "steps": steps + 1}
        if policy.uses_llm:
            update["llm_calls"] = llm_calls + 1
        return update

    def after_supervisor(state: AgentState) -> str:
        last = _last_ai(state)
        if state.get("stop_reason") or last is None:
            return END
        if not (last.tool_calls or last.invalid_tool_calls):
            return END
        return "plan" if plan_rules.needs_plan(state) else "tools"

    def plan(state: AgentState) -> dict[str, Any]:
        proposal = plan_rules.propose(ctx, run_id_of(state), state)
        answer = interrupt(proposal.model_dump(mode="json"))
        if plan_rules.accepted(answer):
            return {"cycle": {"plan_accepted": True}}
        return plan_rules.declined(state, answer)

    def after_plan(state: AgentState) -> str:
        return "tools" if (state.get("cycle") or {}).get("plan_accepted") else END

    def tool_node(state: AgentState) -> dict[str, Any]:
        return run_tool_calls(state, tools, settings)

    def after_tools(state: AgentState) -> str:
        cycle = state.get("cycle") or {}
        if settings.canary.before_approval and cycle.get("canary_state") not in ("healthy", "collecting"):
            return "supervisor"  # a gate-passed candidate is watched on a canary slice before anyone is asked
        if cycle.get("gate_passed") is True and cycle.get("candidate"):
            if [cycle["candidate"], cycle.get("report_hash")] != cycle.get("approval_checked"):
                return "approval"
        return "supervisor"

    def approval(state: AgentState) -> dict[str, Any]:
        cycle = state.get("cycle") or {}
        checked = {"approval_checked": [cycle.get("candidate"), cycle.get("report_hash")]}
        target = registry.resolve(ctx.store, cycle["candidate"])
        champion = registry.alias_target(ctx.store, registry.CHAMPION)
        decision, decided_in = decisions.stored_decision(ctx, target)
        # A decision recorded for this run (by `decide`, or before a crash) is applied whatever the
        # version's status became since: a rejection has already closed it.
        if decided_in != run_id_of(state):
            skip = decisions.skip_reason(target, champion)
            if skip:
                return {"cycle": checked, "decision": None, "approval_error": None}
        if decision is None:
            pending = decisions.build_pending(ctx, run_id_of(state), target, champion, refused=state.get("approval_error"))
            runs.update_run(ctx.store, run_id_of(state), pending=pending.model_dump(mode="json"))
            pause_point("approval")
            answer = interrupt(pending.model_dump(mode="json"))
            try:
                decision = Decision.parse(answer)
            except UserInputError as exc:
                return {"approval_error": str(exc), "decision": None}
            problem = decisions.refusal(ctx, target, decision)
            if problem:
                return {"approval_error": problem, "decision": None}
        return {"decision": decision.as_dict(), "approval_error": None, "cycle": checked}

    def after_approval(state: AgentState) -> str:
        if state.get("decision"):
            return "promotion"
        return "approval" if state.get("approval_error") else "supervisor"

    def promotion(state: AgentState) -> dict[str, Any]:
        decision = Decision.parse(state["decision"])
        version = (state.get("cycle") or {})["candidate"]
        outcome = decisions.apply_decision(ctx, run_id_of(state), version, decision)
        pause_point("promotion")
        return {"outcome": outcome.model_dump(mode="json"), "decision": None, "messages": [AIMessage(content=outcome.sentence())]}

    graph = StateGraph(AgentState)
    graph.add_node("supervisor", supervisor)
    graph.add_node("plan", plan)
    graph.add_node("tools", tool_node)
    graph.add_node("approval", approval)
    graph.add_node("promotion", promotion)
    graph.add_edge(START, "supervisor")
    graph.add_conditional_edges("supervisor", after_supervisor, ["plan", "tools", END])
    graph.add_conditional_edges("plan", after_plan, ["tools", END])
    graph.add_conditional_edges("tools", after_tools, ["approval", "supervisor"])
    graph.add_conditional_edges("approval", after_approval, ["promotion", "approval", "supervisor"])
    graph.add_edge("promotion", END)
    return graph


def _stop(reason: str) -> dict[str, Any]:
    return {"stop_reason": reason, "messages": [AIMessage(content=f"Stopped: {reason}. `flywheel resume` continues with fresh limits.")]}


def run_tool_calls(state: AgentState, tools: ToolRegistry, settings: Settings) -> dict[str, Any]:
    """The tool node: every call of the last AIMessage, in order, each answered by one ToolMessage."""
    ai = _last_ai(state)
    if ai is None:
        return {}
    ctx, run_id = tools.ctx, run_id_of(state)
    position = len(state.get("messages", [])) - 1  # where this AIMessage sits in the thread: stable on a re-run
    cycle = state.get("cycle") or {}
    done, errors = list(cycle.get("done", [])), dict(cycle.get("errors", {}))
    refused, jobs = list(cycle.get("refused", [])), list(cycle.get("jobs", []))
    facts: dict[str, Any] = {}
    replies: list[ToolMessage] = []
    writer = _stream_writer()

    for call in ai.tool_calls:
        name, call_id = call["name"], call.get("id") or ""
        if name not in tools:
            refused.append(name)
            replies.append(
                ToolMessage(
                    content=f"error: there is no tool named {name!r}; use only these: {', '.join(tools.names)}",
                    tool_call_id=call_id,
                    name=name,
                    status="error",
                )
            )
            continue
        spec = tools.spec(name)
        if name == "launch_training" and len(jobs) >= settings.agent.max_training_runs:
            replies.append(
                ToolMessage(
                    content=f"error: the training budget of this cycle is spent ({settings.agent.max_training_runs} run(s): {', '.join(jobs) or 'none'})",
                    tool_call_id=call_id,
                    name=name,
                    status="error",
                )
            )
            continue
        key = tool_effect_key(run_id, position, call_id)
        pause_point(f"tools:{name}:start")
        recorded = runs.effect_result(ctx.store, key) if spec.mutates else None
        if recorded is None:
            recorded = _execute(tools, name, call.get("args") or {}, writer)
            if spec.mutates:
                runs.record_effect(ctx.store, key, "tool_call", recorded)
        pause_point(f"tools:{name}")
        if recorded["ok"]:
            done.append(name)
            facts.update(recorded["facts"])
            if name == "launch_training" and recorded["facts"].get("job_id") not in jobs:
                jobs.append(recorded["facts"]["job_id"])
        else:
            errors[name] = recorded["content"]
        replies.append(
            ToolMessage(content=recorded["content"], tool_call_id=call_id, name=name, status="success" if recorded["ok"] else "error")
        )

    for bad in ai.invalid_tool_calls:
        replies.append(
            ToolMessage(
                content=f"error: the arguments of {bad.get('name')!r} are not valid JSON ({bad.get('error') or 'unparsable'}); send a JSON object",
                tool_call_id=bad.get("id") or "",
                name=bad.get("name") or "invalid",
                status="error",
            )
        )

    update_cycle = {"done": done, "errors": errors, "refused": refused, "jobs": jobs, **facts}
    if "candidate" in facts and "gate_passed" not in facts:
        update_cycle.update(gate_passed=None, report_hash=None)  # a new candidate has no gate result yet
    return {"messages": replies, "cycle": update_cycle, "training_runs": len(jobs)}


def tool_effect_key(run_id: str, position: int, call_id: str) -> str:
    """The effects key of one tool call: the run, the message that asked for it, the call's id. The
    same step re-run after a crash has the same key; a later step never does (ids may repeat)."""
    return f"tool:{run_id}:{position}:{call_id}"[:200]


def _execute(tools: ToolRegistry, name: str, args: dict[str, Any], writer: Any) -> dict[str, Any]:
    """Call one tool. Returns what the model reads and the facts the graph routes on; raises only
    InfrastructureError (and bugs)."""
    ctx = tools.ctx
    writer({"tool": name, "message": f"running {name}"})
    ctx.progress = lambda data: writer({"tool": name, **data})
    try:
        result = tools.call(name, args)
    except InfrastructureError:
        raise
    except MODEL_ERRORS as exc:
        return {"ok": False, "content": f"error: {_one_line(exc)}", "facts": {}}
    finally:
        ctx.progress = None
    spec = tools.spec(name)
    facts = spec.facts(result) if spec.facts else {}
    return {"ok": True, "content": render_result(result), "facts": facts}


def studio_graph(config: Any = None) -> Any:
    """For `langgraph dev` and LangGraph Studio (langgraph.json): the graph for the project in
    FLYWHEEL_PROJECT_DIR (or the current folder), with the policy its settings choose. Compiled without
    a checkpointer: the LangGraph server brings its own. Nothing connects until a node runs."""
    from flywheel.agent.policies import choose_policy
    from flywheel.context import Context
    from flywheel.settings import load_settings
    from flywheel.tools.registry import build_tools

    settings = load_settings()
    ctx = Context(settings=settings)
    return build_graph(settings, choose_policy(settings), build_tools(ctx)).compile()
