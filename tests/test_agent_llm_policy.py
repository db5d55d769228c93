"""The LLM policy through the real langchain-openai client against the scripted local OpenAI-compatible
server (tests/openai_server.py): the system prompt and tool schemas it sends, tool errors going back to
the model, the LLM-call budget, an endpoint that is down, and the policy choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import seed_project
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401 - fixture

from flywheel.agent import runs
from flywheel.agent.policies import HeuristicPolicy, LLMPolicy, choose_policy
from flywheel.agent.runner import resume_run, start_run
from flywheel.context import Context
from flywheel.settings import load_settings
from flywheel.tools.registry import build_tools

SUPERVISOR = "supervisor-model"


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # built once per session (tests/conftest.py)


def llm_context(project: Path, server: OpenAIServer, **overrides: Any) -> Context:
    llm = {
        "base_url": server.base_url,
        "supervisor_model": SUPERVISOR,
        "max_retries": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
        **overrides.pop("llm", {}),
    }
    return Context(settings=load_settings(project, llm=llm, **overrides))


@pytest.fixture
def seeded(project: Path, base: Path) -> Path:
    seed_project(project, base)
    return project


def tool_messages(request: Any) -> list[dict[str, Any]]:
    return [m for m in request.messages if m.get("role") == "tool"]


def test_prompt_tools_and_errors_reach_the_model(seeded: Path, openai_server: OpenAIServer) -> None:
    ctx = llm_context(seeded, openai_server)
    openai_server.push(
        Reply.tool("list_failures", {"limit": 500}, call_id="call_big"),
        Reply.tools({"name": "list_failures", "arguments": '{"limit": 5', "id": "call_broken"}),  # truncated JSON
        Reply.tools(
            {"name": "triage_new_logs", "arguments": {}, "id": "call_triage"},
            {"name": "failure_counts", "arguments": {"by": ["problem_type", "status"]}, "id": "call_counts"},
        ),
        Reply.text("Three clusters were captured and wait for the judge."),
    )
    try:
        outcome = start_run(ctx, "chat", "llm", message="What failed this week?")
        assert outcome.state == "done" and outcome.message == "Three clusters were captured and wait for the judge."
        first, second, third, fourth = openai_server.chat_requests
        assert first.model == SUPERVISOR
        # the system prompt: prompts/supervisor.md with the taxonomy, the read-only gate and the current numbers
        assert "You cannot promote, approve, reject or roll back a model" in first.system_text
        assert "- over_promise:" in first.system_text and "targeted_min_relative_drop: 0.3" in first.system_text
        assert "6 interactions logged" in first.system_text
        assert first.last_user_text == "What failed this week?"
        # the tools are the registry's, their schemas without the injected Context
        assert first.tool_names == build_tools(ctx).names
        for tool in first.tools:
            assert "ctx" not in tool["function"]["parameters"].get("properties", {})
        # a bad argument comes back as a tool message, and the model sees it on its next call
        [big] = tool_messages(second)
        assert big["tool_call_id"] == "call_big" and big["content"].startswith("error: invalid argument limit")
        broken = tool_messages(third)[-1]
        assert broken["tool_call_id"] == "call_broken" and "not valid JSON" in broken["content"]
        triaged, counted = tool_messages(fourth)[-2:]
        assert json.loads(triaged["content"])["captured"] == 6
        assert json.loads(counted["content"]) == [{"problem_type": None, "status": "triaged", "failures": 3, "frequency": 6}]
        assert runs.get_run(ctx.store, outcome.run_id).summary["llm_calls"] == 4
    finally:
        ctx.close()


def test_llm_budget_stops_the_run(seeded: Path, openai_server: OpenAIServer) -> None:
    ctx = llm_context(seeded, openai_server, agent={"max_llm_calls": 2})
    openai_server.default = Reply.tool("pipeline_status")  # a model that never stops checking
    try:
        outcome = start_run(ctx, "run", "llm")
        assert outcome.state == "stopped" and "LLM budget (2 calls per request)" in (outcome.stop_reason or "")
        assert len(openai_server.chat_requests) == 2
    finally:
        ctx.close()


def test_endpoint_down_fails_resumably_and_resume_finishes(seeded: Path, openai_server: OpenAIServer) -> None:
    ctx = llm_context(seeded, openai_server)
    openai_server.push(Reply.tool("pipeline_status", call_id="call_status"))
    openai_server.default = Reply.server_error(503, "overloaded")
    try:
        outcome = start_run(ctx, "run", "llm")
        assert outcome.state == "failed"
        assert f"the supervisor's LLM at {openai_server.base_url} failed" in (outcome.error or "") and "503" in (outcome.error or "")
        assert f"flywheel resume {outcome.run_id}" in (outcome.error or "")
        assert len(openai_server.chat_requests) == 3  # the first call, then the failing one and its retry
        assert runs.get_run(ctx.store, outcome.run_id).state == "failed"

        openai_server.default = Reply.text("Nothing needs doing.")
        again = resume_run(ctx, outcome.run_id)
        assert again.state == "done" and again.message == "Nothing needs doing."
        # the resumed call carries the conversation so far, the pipeline_status result included
        [status] = tool_messages(openai_server.chat_requests[-1])
        assert status["tool_call_id"] == "call_status" and json.loads(status["content"])["interactions"] == 6
    finally:
        ctx.close()


def test_auto_policy_is_the_heuristic_without_an_endpoint(project: Path, openai_server: OpenAIServer) -> None:
    offline = load_settings(project)
    assert isinstance(choose_policy(offline), HeuristicPolicy)
    online = load_settings(project, llm={"base_url": openai_server.base_url})
    assert isinstance(choose_policy(online), LLMPolicy)
    assert isinstance(choose_policy(online, "heuristic"), HeuristicPolicy)
    forced = load_settings(project, agent={"policy": "heuristic"}, llm={"base_url": openai_server.base_url})
    assert isinstance(choose_policy(forced), HeuristicPolicy)
