"""The supervisor graph: its shape, the tool node's error handling and limits, the approval interrupt and
the promotion node, with a scripted chat model (langchain's GenericFakeChatModel) and the heuristic
policy, on real checkpointers (SQLite and PostgreSQL), a real store, a real Chroma index and real
tiny models."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import fresh_adapter, seed_project
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.graph import StateGraph
from langgraph.types import Command
from pydantic import Field
from sqlalchemy import func, select

from flywheel.agent import runs
from flywheel.agent.graph import NODES, build_graph
from flywheel.agent.policies import HeuristicPolicy, LLMPolicy
from flywheel.agent.runner import decide, open_checkpointer, pending_approvals, resume_run, run_in_progress, start_run
from flywheel.agent.state import new_request
from flywheel.cli import main
from flywheel.context import Context
from flywheel.correct.stage import correct_failures
from flywheel.data.triage import triage
from flywheel.errors import NotFoundError, PolicyViolation, UserInputError
from flywheel.evals.judge import judge_failures
from flywheel.release import registry
from flywheel.release.decisions import PendingApproval
from flywheel.release.records import Decision
from flywheel.settings import load_settings
from flywheel.store.schema import alias_events, approvals, effects, jobs
from flywheel.tools.registry import build_tools


class ScriptedChatModel(GenericFakeChatModel):
    """GenericFakeChatModel that accepts bind_tools and keeps what it was sent."""

    bound: list[str] = Field(default_factory=list)
    seen: list[list[Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        self.bound = [t.name for t in tools]
        return self

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def calls(*items: tuple[str, dict[str, Any]], text: str = "") -> AIMessage:
    return AIMessage(
        content=text, tool_calls=[{"name": n, "args": a, "id": f"c{i}-{n}", "type": "tool_call"} for i, (n, a) in enumerate(items)]
    )


def scripted(*replies: AIMessage | str) -> ScriptedChatModel:
    return ScriptedChatModel(messages=iter(replies))


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # built once per session (tests/conftest.py)


def _context(project: Path, store_url: str | None = None, **overrides: Any) -> Context:
    if store_url:
        overrides["store"] = {"url": store_url}
    return Context(settings=load_settings(project, **overrides))


@pytest.fixture
def ctx(project: Path, base: Path) -> Iterator[Context]:
    seed_project(project, base)
    context = _context(project)
    yield context
    context.close()


def _evaluated_setup(ctx: Context, base: Path, tmp: Path) -> str:
    """Judged, verified failures (a real problem set) and a registered candidate v2 (a fresh adapter)."""
    triage(ctx)
    judge_failures(ctx)
    assert correct_failures(ctx).verified == 3
    version = registry.register_version(ctx.store, base_model=str(base), adapter_path=fresh_adapter(base, tmp / "adapter"))
    return version.id


def _count(ctx: Context, table: Any, *where: Any) -> int:
    with ctx.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _champion(ctx: Context) -> str:
    return registry.current_routing(ctx.store).champion


# --- the graph's shape ---------------------------------------------------------------------------------------


def test_build_graph_is_uncompiled_with_four_nodes_and_no_promote_tool(ctx: Context) -> None:
    tools = build_tools(ctx)
    graph = build_graph(ctx.settings, HeuristicPolicy(ctx.settings), tools)
    assert isinstance(graph, StateGraph)
    assert set(graph.nodes) == set(NODES)
    assert not any("promot" in name or "approv" in name or "setting" in name for name in tools.names)
    # the Context is injected, never a parameter the model sees
    for tool in tools.langchain_tools():
        assert "ctx" not in tool.tool_call_schema.model_json_schema().get("properties", {})
    with open_checkpointer(ctx.settings) as saver:
        compiled = graph.compile(checkpointer=saver)
        assert set(compiled.get_graph().nodes) >= set(NODES)


# --- the tool node -------------------------------------------------------------------------------------------


def test_model_mistakes_go_back_as_tool_messages(ctx: Context) -> None:
    model = scripted(
        calls(
            ("show_failure", {"failure_id": "no-such-failure"}),  # NotFoundError
            ("list_failures", {"limit": 999}),  # pydantic validation
            ("failure_counts", {"by": ["bogus"]}),  # not one of the fields
            ("list_failures", {"limit": 5, "gate": {"max_regression": 1}}),  # an argument it does not have
            ("promote_model", {"version": "v1"}),  # not a tool
            ("pipeline_status", {}),  # fine
        ),
        AIMessage(
            content="",
            invalid_tool_calls=[
                {"name": "list_failures", "args": "{not json", "id": "bad-1", "error": "bad json", "type": "invalid_tool_call"}
            ],
        ),
        "done looking",
    )
    outcome = start_run(ctx, "chat", LLMPolicy(ctx.settings, model=model), message="look around")
    assert outcome.state == "done" and outcome.message == "done looking"
    assert model.bound and "promote_model" not in model.bound

    second_request = model.seen[1]
    replies = {m.tool_call_id: m for m in second_request if isinstance(m, ToolMessage)}
    assert replies["c0-show_failure"].status == "error" and "no failure with id 'no-such-failure'" in replies["c0-show_failure"].content
    assert replies["c1-list_failures"].status == "error" and "invalid argument limit" in replies["c1-list_failures"].content
    assert replies["c2-failure_counts"].status == "error" and "by.0" in replies["c2-failure_counts"].content
    assert "has no argument 'gate'" in replies["c3-list_failures"].content
    assert "no tool named 'promote_model'" in replies["c4-promote_model"].content
    assert replies["c5-pipeline_status"].status == "success"
    assert json.loads(replies["c5-pipeline_status"].content)["interactions"] == 6
    third = [m for m in model.seen[2] if isinstance(m, ToolMessage)]
    assert third[-1].tool_call_id == "bad-1" and "not valid JSON" in third[-1].content
    assert outcome.cycle["refused"] == ["promote_model"]
    # read-only tools leave no effect records; the refused call touched nothing
    assert _count(ctx, effects) == 0 and _champion(ctx) == "v1"


def test_infrastructure_error_stops_the_run_and_resume_continues(project: Path, base: Path) -> None:
    seed_project(project, base)
    broken = _context(project, chroma={"host": "127.0.0.1", "port": 9})  # nothing listens on the discard port
    model = scripted(calls(("retrieve_context", {"query": "refund"})), "found the refund policy")
    try:
        outcome = start_run(broken, "chat", LLMPolicy(broken.settings, model=model), message="what is our refund policy?")
        assert outcome.state == "failed"
        assert "cannot open the vector index at 127.0.0.1:9" in (outcome.error or "") and "flywheel resume" in (outcome.error or "")
        row = runs.get_run(broken.store, outcome.run_id)
        assert row.state == "failed"
        with open_checkpointer(broken.settings) as saver:  # the failed step is not saved: it runs again
            graph = build_graph(broken.settings, HeuristicPolicy(broken.settings), build_tools(broken)).compile(checkpointer=saver)
            assert graph.get_state({"configurable": {"thread_id": outcome.run_id}}).next == ("tools",)
    finally:
        broken.close()
    fixed = _context(project)
    try:
        again = resume_run(fixed, outcome.run_id, policy=LLMPolicy(fixed.settings, model=model))
        assert again.state == "done" and again.message == "found the refund policy"
        results = [m for m in model.seen[-1] if isinstance(m, ToolMessage)]
        assert results[-1].status == "success" and "kb-refund_status" in results[-1].content
        assert len(model.seen) == 2  # the supervisor step was not repeated: only the tool step ran again
    finally:
        fixed.close()


def test_step_limit_stops_and_resume_gets_fresh_limits(project: Path, base: Path) -> None:
    seed_project(project, base)
    ctx = _context(project, agent={"max_steps": 2})
    model = scripted(calls(("pipeline_status", {})), calls(("pipeline_status", {})), "all quiet")
    try:
        outcome = start_run(ctx, "chat", LLMPolicy(ctx.settings, model=model), message="keep checking")
        assert outcome.state == "stopped" and "step limit (2 steps" in (outcome.stop_reason or "")
        assert runs.get_run(ctx.store, outcome.run_id).state == "stopped"
        again = resume_run(ctx, outcome.run_id, policy=LLMPolicy(ctx.settings, model=model))
        assert again.state == "done" and again.message == "all quiet"
    finally:
        ctx.close()


def test_training_budget_refuses_a_launch(project: Path, base: Path, tmp_path: Path) -> None:
    seed_project(project, base)
    ctx = _context(project, agent={"max_training_runs": 0})
    try:
        _evaluated_setup(ctx, base, tmp_path)
        model = scripted(calls(("build_dataset", {})), calls(("launch_training", {"dataset_id": "whatever"})), "no budget")
        # a chat asks before building the dataset (tests/test_agent_chat.py); the person agrees
        outcome = start_run(ctx, "chat", LLMPolicy(ctx.settings, model=model), message="train", confirm=lambda _plan: "yes")
        refusal = [m for m in model.seen[-1] if isinstance(m, ToolMessage)][-1]
        assert refusal.status == "error" and "training budget of this cycle is spent (0 run(s)" in refusal.content
        assert outcome.state == "done" and _count(ctx, jobs) == 0
        assert outcome.cycle["dataset_id"].startswith("ds-sft-")
        # build_dataset changed the store: its result is recorded under the tool call id
        assert _count(ctx, effects, effects.c.key.like(f"tool:{outcome.run_id}:%:c0-build_dataset")) == 1
    finally:
        ctx.close()


# --- approval and promotion -----------------------------------------------------------------------------------


def _approval_ctx(project: Path, base: Path, tmp: Path, store_url: str | None = None) -> tuple[Context, str]:
    # These tests script the model straight to the evaluation; the canary step is covered by the heuristic cycle.
    seed_project(project, base, store_url=store_url, approvals={"approvers": ["alice"]}, canary={"before_approval": False})
    ctx = _context(project, store_url)
    return ctx, _evaluated_setup(ctx, base, tmp)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    from conftest import _truncate_all

    url = request.getfixturevalue("pg_url")
    _truncate_all(url)
    return url


def test_gate_pass_interrupts_and_an_allowed_approval_promotes_once(
    project: Path, base: Path, tmp_path: Path, store_url: str | None
) -> None:
    ctx, version = _approval_ctx(project, base, tmp_path, store_url)
    try:
        model = scripted(calls(("run_evaluation", {"version": version})), "should not be asked")
        outcome = start_run(ctx, "run", LLMPolicy(ctx.settings, model=model))
        assert outcome.state == "waiting_approval" and len(model.seen) == 1
        pending = outcome.pending
        assert isinstance(pending, PendingApproval) and pending.version == version and pending.gate_passed
        stored = registry.resolve(ctx.store, version)
        assert pending.report_hash == stored.eval_report_hash and Path(pending.report_json).is_file()
        assert pending.primary_set == "test" and pending.targeted == ["over_promise"]  # the fixed test set leads
        assert pending.problem_rates_after.get("over_promise", 0.0) == 0.0
        assert any("targeted over_promise" in r for r in pending.gate_reasons)
        assert [p.version for p in pending_approvals(ctx)] == [version]
        assert runs.get_run(ctx.store, outcome.run_id).pending["report_hash"] == stored.eval_report_hash
        assert not run_in_progress(ctx)

        with pytest.raises(PolicyViolation, match="'mallory' is not in approvals.approvers"):
            decide(ctx, version, "approved", "mallory", channel="terminal")
        assert _champion(ctx) == "v1" and _count(ctx, approvals) == 0

        done = decide(ctx, version, "approved", "alice", "fixes the refund promises")
        assert done.state == "done" and done.outcome["promoted"] and done.outcome["previous"] == "v1"
        assert _champion(ctx) == version
        assert _count(ctx, alias_events, alias_events.c.alias == "champion", alias_events.c.to_version == version) == 1
        with ctx.store.engine.connect() as conn:
            row = conn.execute(select(approvals)).one()
        assert (row.version, row.report_hash, row.approver, row.run_id) == (version, stored.eval_report_hash, "alice", outcome.run_id)
        assert pending_approvals(ctx) == []
        with pytest.raises(NotFoundError, match="no run waits"):
            decide(ctx, version, "approved", "alice")
    finally:
        ctx.close()


def test_resume_with_a_decision_object_refuses_a_wrong_approver_then_promotes(project: Path, base: Path, tmp_path: Path) -> None:
    ctx, version = _approval_ctx(project, base, tmp_path)
    policy = LLMPolicy(ctx.settings, model=scripted(calls(("run_evaluation", {"version": version}))))
    try:
        with open_checkpointer(ctx.settings) as saver:
            graph = build_graph(ctx.settings, policy, build_tools(ctx)).compile(checkpointer=saver)
            config = {"configurable": {"thread_id": "raw-1"}}
            runs.create_run(ctx.store, "raw-1", "api", "llm")
            graph.invoke(new_request("raw-1", "api"), config, durability="sync")
            first = graph.get_state(config).interrupts[0].value
            assert first["version"] == version and first["refused"] is None

            graph.invoke(Command(resume=Decision("approved", "mallory", "trust me")), config, durability="sync")
            again = graph.get_state(config)
            assert again.next == ("approval",) and "'mallory' is not in approvals.approvers" in again.interrupts[0].value["refused"]
            assert _champion(ctx) == "v1"

            stale = Decision("approved", "alice", "", "terminal", report_hash="0" * 64)
            graph.invoke(Command(resume=stale), config, durability="sync")
            assert "decide again on the new report" in graph.get_state(config).interrupts[0].value["refused"]

            graph.invoke(Command(resume=Decision("approved", "alice", "ok")), config, durability="sync")
            final = graph.get_state(config)
            assert final.next == () and final.values["outcome"]["promoted"] is True
            assert _champion(ctx) == version
    finally:
        ctx.close()


def test_rejection_through_the_cli_resumes_the_run_and_records_the_reason(
    project: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx, version = _approval_ctx(project, base, tmp_path)
    try:
        outcome = start_run(ctx, "run", LLMPolicy(ctx.settings, model=scripted(calls(("run_evaluation", {"version": version})))))
        assert outcome.state == "waiting_approval"
        assert main(["-C", str(project), "reject", outcome.run_id, "--by", "alice"]) == 2  # a rejection needs a reason
        assert main(["-C", str(project), "reject", outcome.run_id, "--reason", "the tone got worse", "--by", "bob"]) == 5
        assert f"run {outcome.run_id} waits on {version}" in capsys.readouterr().out
        assert runs.get_run(ctx.store, outcome.run_id).state == "waiting_approval"  # bob is not an approver
        assert main(["-C", str(project), "reject", outcome.run_id, "--reason", "the tone got worse", "--by", "alice"]) == 0
        assert f"{version} rejected by alice" in capsys.readouterr().out
        done = runs.get_run(ctx.store, outcome.run_id)
        assert done.state == "done" and done.summary["outcome"]["decision"] == "rejected" and not done.summary["outcome"]["promoted"]
        assert registry.resolve(ctx.store, version).status == "rejected" and _champion(ctx) == "v1"
        with ctx.store.engine.connect() as conn:
            row = conn.execute(select(approvals)).one()
        assert (row.decision, row.reason) == ("rejected", "the tone got worse")
    finally:
        ctx.close()


def test_resume_with_yes_approves_as_the_local_user_only_if_allowed(
    project: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import getpass

    ctx, version = _approval_ctx(project, base, tmp_path)  # approvers: alice only
    try:
        waiting = start_run(ctx, "run", LLMPolicy(ctx.settings, model=scripted(calls(("run_evaluation", {"version": version})))))
        capsys.readouterr()
        assert main(["-C", str(project), "resume", waiting.run_id, "--yes"]) == 0
        out = capsys.readouterr().out
        assert f"{getpass.getuser()!r} is not in approvals.approvers" in out and f"flywheel approve {version}" in out
        assert runs.get_run(ctx.store, waiting.run_id).state == "waiting_approval" and _champion(ctx) == "v1"

        (project / "flywheel.toml").write_text((project / "flywheel.toml").read_text().replace('approvers = ["alice"]', "approvers = []"))
        assert main(["-C", str(project), "resume", waiting.run_id, "--yes"]) == 0
        assert f"{version} promoted to champion, approved by {getpass.getuser()} (terminal)" in capsys.readouterr().out
        assert _champion(ctx) == version and runs.get_run(ctx.store, waiting.run_id).state == "done"
    finally:
        ctx.close()


# --- the heuristic policy, a whole cycle, through the CLI --------------------------------------------------------


@pytest.mark.slow
def test_flywheel_run_without_a_terminal_waits_then_approve_promotes(
    project: Path, base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_project(project, base)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["-C", str(project), "run"]) == 0  # pytest's stdin is not a terminal
    out = capsys.readouterr().out
    assert "triage_new_logs" in out and "launch_training" in out and "run_evaluation" in out
    assert "v2 waits for a decision" in out and "flywheel approve v2" in out

    assert main(["-C", str(project), "approvals", "--json"]) == 0
    pending = json.loads(capsys.readouterr().out)
    assert [p["version"] for p in pending] == ["v2"] and pending[0]["gate_passed"] is True
    run_id = pending[0]["run_id"]
    assert main(["-C", str(project), "runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["id"] == run_id and listed[0]["state"] == "waiting_approval" and listed[0]["policy"] == "heuristic"

    # a second cycle while v2 waits does the data work but does not train v2 again
    assert main(["-C", str(project), "run"]) == 0
    assert "v2 waits for a person's decision; answer it first" in capsys.readouterr().out
    assert main(["-C", str(project), "runs"]) == 0
    table = capsys.readouterr().out
    assert run_id in table and "waiting_approval" in table and "flywheel approve v2" in table

    assert main(["-C", str(project), "approve", "v2", "--by", "carol"]) == 0
    out = capsys.readouterr().out
    assert f"run {run_id} waits on v2" in out and "v2 promoted to champion, approved by carol" in out
    assert main(["-C", str(project), "runs", "--json"]) == 0
    assert {r["id"]: r["state"] for r in json.loads(capsys.readouterr().out)}[run_id] == "done"
    assert main(["-C", str(project), "approvals"]) == 0 and "no approvals pending" in capsys.readouterr().out

    ctx = _context(project)
    try:
        assert _champion(ctx) == "v2" and _count(ctx, jobs) == 1
        # a second cycle finds nothing new to train on and says so
        again = start_run(ctx, "run", "heuristic")
        assert again.state == "done" and _count(ctx, jobs) == 1
        # its samples graduated with v2's promotion: the problem tier is empty
        assert again.message.endswith("Nothing to train on: no verified corrections in the problem tier.")

        assert not run_in_progress(ctx)
    finally:
        ctx.close()

    # `flywheel chat` with the heuristic answers simple questions (its input here is not a terminal)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("what failed most this week?\nwhy did v2 pass its gate?\nstatus\n"))
    assert main(["-C", str(project), "chat", "--policy", "heuristic"]) == 0
    said = capsys.readouterr().out
    assert "over_promise (high): 3 failures, seen 6 times" in said
    assert "v2 passed its gate against v1: targeted over_promise" in said
    assert "6 interactions logged" in said and "Champion: v2" in said
    assert "chat saved as run run-" in said
    assert main(["-C", str(project), "resume", "no-such-run"]) == 3


def test_one_autonomous_run_at_a_time_and_dead_runs_read_as_interrupted(ctx: Context) -> None:
    import os

    runs.create_run(ctx.store, "run-alive", "schedule", "heuristic")  # this process: alive
    assert run_in_progress(ctx)
    with pytest.raises(UserInputError, match="run run-alive is in progress"):
        start_run(ctx, "schedule", "heuristic")
    dead = subprocess.Popen(["true"])
    dead.wait()
    runs.update_run(ctx.store, "run-alive", pid=dead.pid)
    assert not run_in_progress(ctx)
    row = runs.get_run(ctx.store, "run-alive")
    assert row.state == "interrupted" and f"pid {dead.pid}" in (row.error or "")
    assert os.getpid() != dead.pid


def test_langgraph_json_registers_a_factory_for_the_dev_server(ctx: Context, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import HumanMessage

    from flywheel.agent import graph as graph_module

    config = json.loads((Path(__file__).parents[1] / "langgraph.json").read_text())
    path, name = config["graphs"]["flywheel"].split(":")
    assert path == "./flywheel/agent/graph.py" and callable(getattr(graph_module, name))
    monkeypatch.setenv("FLYWHEEL_PROJECT_DIR", str(project))
    compiled = getattr(graph_module, name)()
    assert set(NODES) <= set(compiled.get_graph().nodes)
    # as the dev server would run it: its own thread id, no run id in the input
    result = compiled.invoke({"messages": [HumanMessage(content="status")], "trigger": "chat"}, {"configurable": {"thread_id": "studio-1"}})
    assert "6 interactions logged" in result["messages"][-1].content
