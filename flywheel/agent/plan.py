"""In a chat, the person agrees to the plan before the first costly step.

A chat is a conversation: "the bot over-promises refunds, fix it" must not buy labels, build a dataset
or start a training run before the person has heard what that means and said yes. Runs started to run a
cycle (`flywheel run`, the daemon's schedules, the demo, the API) are never asked: whoever started them
already asked for the cycle.

The graph's `plan` node sits between the supervisor and the tools. When a chat request's next step
calls a costly tool (COSTLY) and the person has not agreed to this request's plan yet, it pauses with
`interrupt(ProposedPlan)`, the same LangGraph mechanism the approval uses, so both policies get it and a
crash while waiting asks again on resume. The runner asks (`confirm`) and resumes with
`{"answer": text}`. Only yes continues; anything else, or nobody there to answer, ends the request with
the requested calls answered "not run": nothing was bought, built or launched. The agreement holds for
the rest of the request (one cycle); the next request asks again.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from flywheel.errors import NotFoundError
from flywheel.records import Record
from flywheel.release import registry
from flywheel.store import failures as failure_repo
from flywheel.tools.labels import labelling_budget_left

if TYPE_CHECKING:
    from flywheel.agent.state import AgentState
    from flywheel.context import Context

# What costs labelling time or compute: the plan is asked for before the first of these in a chat.
COSTLY = frozenset({"request_labels", "synthesize_samples", "build_dataset", "launch_training", "resume_training"})
YES = frozenset({"y", "yes"})
QUESTION = "Shall I start? Answer yes to go ahead; anything else leaves everything as it is."
NOTHING_STARTED = "no labels were requested, no dataset was built and no training was launched"


class ProposedPlan(Record):
    """The plan interrupt's payload: what the cycle will do, and the words a person reads."""

    kind: Literal["plan"] = "plan"  # tells it apart from a PendingApproval
    run_id: str
    problem_type: str | None  # None: every problem type the judge finds
    labels: int  # at most this many labels (what is left of selection.labelling_budget)
    method: str
    base_model: str | None
    max_training_runs: int
    text: str


def is_plan(value: Any) -> bool:
    return isinstance(value, dict) and value.get("kind") == "plan"


def needs_plan(state: AgentState) -> bool:
    """A chat request whose next calls include a costly one, with no yes for this request yet."""
    if state.get("trigger") != "chat" or (state.get("cycle") or {}).get("plan_accepted"):
        return False
    last = next((m for m in reversed(state.get("messages", [])) if isinstance(m, AIMessage)), None)
    return last is not None and any(call["name"] in COSTLY for call in last.tool_calls)


def accepted(resume: Any) -> bool:
    answer = resume.get("answer") if isinstance(resume, dict) else resume
    return str(answer or "").strip().lower().rstrip(".! ") in YES


def propose(ctx: Context, run_id: str, state: AgentState) -> ProposedPlan:
    """The plan for this request, from the request's words, the store and the settings."""
    s = ctx.settings
    problem = asked_problem_type(_request(state), s.taxonomy.problem_types) or _most_frequent_problem(ctx)
    labels = labelling_budget_left(ctx)
    base = s.train.base_model or _champion_base(ctx)
    plan = ProposedPlan(
        run_id=run_id,
        problem_type=problem,
        labels=labels,
        method=s.train.method,
        base_model=base,
        max_training_runs=s.agent.max_training_runs,
        text="",
    )
    plan.text = describe(plan, s.taxonomy.problem_types.get(problem or ""), s.selection.labelling_budget)
    return plan


def describe(plan: ProposedPlan, meaning: str | None, budget: int) -> str:
    if plan.problem_type:
        capture = f"I will capture the {plan.problem_type} failures" + (f", where {meaning}" if meaning else "") + "."
    else:
        capture = "I will capture the new failures in the logs, whatever problem type the judge finds."
    if plan.labels == 0:
        label = "The labelling budget is spent, so I will not ask anyone for labels."
    elif plan.labels < budget:
        label = f"I will ask people to label up to {plan.labels} of them, what is left of the labelling budget of {budget}."
    else:
        label = f"I will ask people to label up to {plan.labels} of them, the labelling budget."
    method = {"sft": "supervised fine-tuning (SFT)", "dpo": "preference tuning (DPO)"}.get(plan.method, plan.method)
    on = f"on top of {plan.base_model}" if plan.base_model else "on the base model (none is set yet, so training would stop and say so)"
    if plan.max_training_runs == 0:
        train = "The training budget allows no training run in this cycle, so I will stop after building the dataset."
    else:
        runs = "one training run" if plan.max_training_runs == 1 else f"{plan.max_training_runs} training runs"
        train = (
            f"Then I will build a dataset from the verified corrections and train a LoRA adapter with {method} {on}, using at most {runs}."
        )
    return f"Here is my plan. {capture} {label} {train} {QUESTION}"


def declined(state: AgentState, resume: Any) -> dict[str, Any]:
    """The request ends: every requested call is answered "not run" (so the conversation stays one the
    LLM accepts on the next turn), and the person is told that nothing started."""
    last = next(m for m in reversed(state.get("messages", [])) if isinstance(m, AIMessage))
    answer = resume.get("answer") if isinstance(resume, dict) else resume
    why = "the person did not agree to the plan" if answer is not None else "nobody was there to agree to the plan"
    replies: list[Any] = [
        ToolMessage(content=f"error: not run: {why}", tool_call_id=call.get("id") or "", name=call["name"], status="error")
        for call in last.tool_calls
    ]
    if answer is None:
        text = f"I need your yes before I spend labels or training time, and nobody could answer here, so I have not started anything: {NOTHING_STARTED}."
    else:
        text = f"All right, I have not started anything: {NOTHING_STARTED}. Ask me again when you want me to go ahead."
    return {"messages": [*replies, AIMessage(content=text)], "cycle": {"plan_accepted": False}}


def asked_problem_type(request: str, problem_types: dict[str, str]) -> str | None:
    """The problem type the person named: every word of its name starts a word of the request
    ("over-promises" names over_promise, "wrong tool call" names wrong_tool_call)."""
    words = re.findall(r"[a-z]+", request.lower())
    for name in problem_types:
        if all(any(w.startswith(part) for w in words) for part in name.split("_")):
            return name
    return None


def _most_frequent_problem(ctx: Context) -> str | None:
    rows = [r for r in failure_repo.counts(ctx.store, by=("problem_type",)) if r.get("problem_type")]
    return max(rows, key=lambda r: int(r["frequency"] or 0))["problem_type"] if rows else None


def _champion_base(ctx: Context) -> str | None:
    try:
        return registry.resolve(ctx.store, registry.CHAMPION).base_model
    except NotFoundError:
        return None


def _request(state: AgentState) -> str:
    last = next((m for m in reversed(state.get("messages", [])) if isinstance(m, HumanMessage)), None)
    return str(last.content) if last is not None else ""
