"""`flywheel chat` asks before it spends: before the first costly step of a request (labels, a dataset,
training) the manager says its plan (problem type, labelling budget, method and base model, training
budget) and starts only after a yes; anything else starts nothing and says so. `flywheel run` is not
asked. Driven through what `flywheel chat` runs (ChatSession.loop with a TerminalView, and the CLI
itself) with scripted input, with the heuristic policy and with the LLM policy against the scripted
local OpenAI-compatible server, on a real store and real tiny models."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import seed_project
from openai_server import ChatRequest, OpenAIServer, Reply, openai_server  # noqa: F401 - fixture
from rich.console import Console
from sqlalchemy import func, select

from flywheel.agent.chat import ChatSession, TerminalView
from flywheel.cli import main
from flywheel.context import Context
from flywheel.correct.stage import correct_failures
from flywheel.data.triage import triage
from flywheel.evals.judge import judge_failures
from flywheel.settings import load_settings
from flywheel.store.schema import datasets, jobs

FIX = "the bot over-promises refunds, fix it"
PLAN_PROMPT = "yes/no> "
NOTHING = "I have not started anything: no labels were requested, no dataset was built and no training was launched"


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # built once per session (tests/conftest.py)


def _count(ctx: Context, table: Any) -> int:
    with ctx.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


class Person:
    """Scripted terminal input: answers prompts in order, and notes what the store held whenever it
    was asked about a plan (the moment before anything costly may start)."""

    def __init__(self, ctx: Context, lines: list[str]):
        self.ctx, self.lines, self.prompts = ctx, list(lines), []
        self.at_plan: list[dict[str, Any]] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if prompt == PLAN_PROMPT:
            queue = self.ctx.settings.state_path / "label_requests.jsonl"
            self.at_plan.append({"datasets": _count(self.ctx, datasets), "jobs": _count(self.ctx, jobs), "label_requests": queue.exists()})
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def _session(ctx: Context, person: Person, policy: str) -> tuple[ChatSession, io.StringIO]:
    screen = io.StringIO()
    view = TerminalView(Console(file=screen, soft_wrap=True, highlight=False), ctx.settings, read=person)
    return ChatSession(ctx, view, policy), screen


@pytest.mark.slow
def test_heuristic_chat_shows_the_plan_and_runs_the_cycle_only_after_yes(project: Path, base: Path) -> None:
    seed_project(project, base)
    ctx = Context(settings=load_settings(project))
    try:
        person = Person(ctx, [FIX, "yes", "later"])
        session, screen = _session(ctx, person, "heuristic")
        assert session.loop(person) == 0
        said = screen.getvalue()
        # the plan, in sentences: the problem type asked about, the labelling budget, method, base model, training budget
        assert (
            "Here is my plan. I will capture the over_promise failures, where the answer promises something policy does not allow" in said
        )
        assert "I will ask people to label up to 500 of them, the labelling budget." in said
        assert f"train a LoRA adapter with supervised fine-tuning (SFT) on top of {base}, using at most 2 training runs." in said
        assert "Shall I start? Answer yes to go ahead" in said
        # asked once, before anything costly: nothing labelled, built or launched yet
        assert person.prompts.count(PLAN_PROMPT) == 1
        assert person.at_plan == [{"datasets": 0, "jobs": 0, "label_requests": False}]
        # after yes, the cycle runs as `flywheel run` does, up to the approval (left for later)
        assert _count(ctx, datasets) == 1 and _count(ctx, jobs) == 1
        assert (ctx.settings.state_path / "label_requests.jsonl").exists()
        assert session.last is not None and session.last.state == "waiting_approval" and session.last.pending.version == "v2"
        assert person.prompts[-1].startswith("Approve v2?")
    finally:
        ctx.close()


def test_chat_through_the_cli_starts_nothing_without_a_yes(
    project: Path, base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_project(project, base)
    # "no", then anything that is not yes, then an empty line: each ends the request with nothing started
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{FIX}\nno\nrun a cycle please\nmaybe later\nimprove it\n\n"))
    assert main(["-C", str(project), "chat", "--policy", "heuristic"]) == 0
    said = capsys.readouterr().out
    assert said.count("Here is my plan.") == 3
    assert "I will capture the over_promise failures" in said  # named in the first request
    assert "I will capture the new failures in the logs, whatever problem type the judge finds." in said  # not named after
    assert said.count(f"All right, {NOTHING}. Ask me again when you want me to go ahead.") == 3
    assert "flywheel approve" not in said and "chat saved as run run-" in said
    ctx = Context(settings=load_settings(project))
    try:
        assert _count(ctx, datasets) == 0 and _count(ctx, jobs) == 0
        assert not (ctx.settings.state_path / "label_requests.jsonl").exists()
    finally:
        ctx.close()


def _llm_model(request: ChatRequest) -> Reply:
    """A model that looks at new logs and builds a dataset when asked to fix something, builds it
    straight away when told to, and otherwise answers in a sentence."""
    last = request.messages[-1]
    if last.get("role") == "user":
        text = last["content"].lower()
        if "fix" in text:
            return Reply.tool("triage_new_logs", call_id="call_triage")
        if "dataset" in text:
            return Reply.tool("build_dataset", call_id="call_build")
        return Reply.text("I stopped before building the dataset, because you said no.")
    if last.get("tool_call_id") == "call_triage":
        return Reply.tool("build_dataset", call_id="call_build")
    return Reply.text("The dataset is built; say when to train.")


def test_llm_chat_asks_before_the_dataset_and_builds_it_only_after_yes(project: Path, base: Path, openai_server: OpenAIServer) -> None:
    seed_project(project, base)
    offline = Context(settings=load_settings(project))
    try:  # verified corrections to build from, made offline (the rule judge and the knowledge-base corrector)
        triage(offline)
        judge_failures(offline)
        assert correct_failures(offline).verified == 3
    finally:
        offline.close()
    openai_server.handler = _llm_model
    ctx = Context(
        settings=load_settings(project, llm={"base_url": openai_server.base_url, "supervisor_model": "supervisor-model", "max_retries": 0})
    )
    try:
        person = Person(
            ctx, ["The bot over-promises refunds. Fix it.", "no", "What did you do?", "Build the dataset now, please.", "yes", "exit"]
        )
        session, screen = _session(ctx, person, "llm")
        assert session.loop(person) == 0
        said = screen.getvalue()
        # the problem type comes from the request, then from the judged failures
        assert said.count("Here is my plan. I will capture the over_promise failures") == 2
        assert person.at_plan == [{"datasets": 0, "jobs": 0, "label_requests": False}] * 2
        assert f"All right, {NOTHING}." in said
        # the model is not asked again after the no; the next turn shows it that its call did not run
        requests = openai_server.chat_requests
        assert len(requests) == 5 and requests[2].last_user_text == "What did you do?"
        [declined] = [m for m in requests[2].messages if m.get("role") == "tool"][-1:]
        assert (declined["tool_call_id"], declined["content"]) == ("call_build", "error: not run: the person did not agree to the plan")
        assert "I stopped before building the dataset" in said
        # after yes: the dataset is built, nothing is trained
        assert _count(ctx, datasets) == 1 and _count(ctx, jobs) == 0
        assert session.last is not None and session.last.state == "done" and session.last.cycle["dataset_id"].startswith("ds-sft-")
        assert "The dataset is built; say when to train." in said
    finally:
        ctx.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_flywheel_run_is_not_asked_about_a_plan(
    project: Path, base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_project(project, base)
    # a terminal whose only line answers the approval: had the run asked about a plan, it would have said no
    monkeypatch.setattr("sys.stdin", _Terminal("later\n"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["-C", str(project), "run"]) == 0
    out = capsys.readouterr().out
    assert "Here is my plan." not in out and "launch_training" in out
    assert "v2 waits for a decision" in out
    ctx = Context(settings=load_settings(project))
    try:
        assert _count(ctx, datasets) == 1 and _count(ctx, jobs) == 1
    finally:
        ctx.close()
