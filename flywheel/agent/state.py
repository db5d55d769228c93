"""The supervisor graph's state: the conversation, the counters its limits read, and the cycle's facts.

Everything here is plain data (langchain messages, str, int, dict), because it is checkpointed after
every step and read back by another process after a crash.

`cycle` holds the facts the graph routes on, written only by the tool node from tool *results*
(never from what a model says): the dataset snapshot, the training job and its status, the candidate
version, its report hash and whether it passed its gate, which tools ran and which failed. The approval
node re-reads the registry before it asks anyone: the facts say where to look, the store says what is
true.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph.message import add_messages

TRIGGERS = ("chat", "run", "schedule", "round", "demo", "api")

# What an autonomous cycle is asked to do (the LLM policy reads it; the heuristic acts the same way).
CYCLE_REQUEST = (
    "Run one improvement cycle: triage new logs, judge and correct the failures, build a dataset from the "
    "verified corrections, train a candidate, evaluate it against the champion, and report what happened."
)

DROP = "_drop"  # in a cycle update: "*" empties the facts before the rest is merged (a new request)


def merge_cycle(old: dict[str, Any] | None, update: dict[str, Any] | None) -> dict[str, Any]:
    """The `cycle` reducer: updates merge key by key, so the tool node writes only what changed."""
    update = dict(update or {})
    merged = {} if update.pop(DROP, None) == "*" else dict(old or {})
    merged.update(update)
    return merged


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    run_id: str
    trigger: str  # chat | run | schedule | round | demo | api
    steps: int  # supervisor turns since the last request (the step limit)
    llm_calls: int  # LLM calls since the last request (the LLM budget)
    training_runs: int  # training jobs launched in this cycle (the training budget)
    cycle: Annotated[dict[str, Any], merge_cycle]
    decision: dict[str, Any] | None  # the human decision the approval node received
    approval_error: str | None  # why the last decision was refused (shown with the next request)
    outcome: dict[str, Any] | None  # what the promotion node did
    stop_reason: str | None  # the step limit or a budget stopped the run


def new_request(run_id: str, trigger: str, text: str | None = None) -> dict[str, Any]:
    """The input for a new run or a new chat turn: the request, fresh counters and no facts yet (each
    request's facts come from its own tool results; the conversation carries the rest)."""
    values: dict[str, Any] = {
        "run_id": run_id,
        "trigger": trigger,
        "steps": 0,
        "llm_calls": 0,
        "training_runs": 0,
        "stop_reason": None,
        "outcome": None,
        "messages": [HumanMessage(content=text or CYCLE_REQUEST)],
        "cycle": {DROP: "*"},
    }
    return values
