"""Crash and resume: a real `flywheel` child process is SIGKILLed while the graph is in each kind of node
(supervisor; tools, right after a training job was launched and while it trains; approval; promotion),
and `flywheel resume` / `flywheel approve` finish the run with no duplicate training job, no second
alias switch and one approval.

The kill points come from the documented test hook in flywheel.agent.graph: FLYWHEEL_TEST_PAUSE_AT
makes the process touch FLYWHEEL_TEST_PAUSE_FILE and sleep at that point, and the test kills it there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import seed_project
from sqlalchemy import func, select

from flywheel.agent import runs
from flywheel.context import Context
from flywheel.release import registry
from flywheel.settings import load_settings
from flywheel.store.schema import alias_events, approvals, effects, jobs, model_versions

PAUSE_TIMEOUT_S = 300


def _env(pause_at: str | None, marker: Path, store_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if store_url:
        env["FLYWHEEL_STORE__URL"] = store_url
    if pause_at:
        env.update(FLYWHEEL_TEST_PAUSE_AT=pause_at, FLYWHEEL_TEST_PAUSE_FILE=str(marker), FLYWHEEL_TEST_PAUSE_SECONDS="600")
    return env


class Child:
    """`python -m flywheel.cli -C PROJECT ...` with no terminal attached, its output in a file."""

    def __init__(self, project: Path, args: list[str], pause_at: str | None = None, store_url: str | None = None):
        self.marker = project / f"paused-{time.monotonic_ns()}"
        self.log = project / f"child-{len(list(project.glob('child-*.log')))}.log"
        self.args = args
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.cli", "-C", str(project), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(pause_at, self.marker, store_url),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_when_paused(self, where: str) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.args} exited with {self.proc.returncode} before pausing at {where}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{self.args} did not reach {where} in {PAUSE_TIMEOUT_S}s:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        assert self.marker.read_text().split()[0] == where
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float = 600) -> str:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.args} did not finish:\n{self.output()[-4000:]}")
        assert code == 0, f"{self.args} exited with {code}:\n{self.output()[-4000:]}"
        return self.output()


def _count(ctx: Context, table: Any, *where: Any) -> int:
    with ctx.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _the_run(ctx: Context) -> runs.RunRow:
    [run] = runs.list_runs(ctx.store)
    return run


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # built once per session (tests/conftest.py)


@pytest.mark.slow
def test_kill_in_every_kind_of_node_then_resume_finishes_once(project: Path, base: Path) -> None:
    seed_project(project, base)
    ctx = Context(settings=load_settings(project))
    try:
        # 1. killed in the supervisor, right after it decided its first step
        Child(project, ["run"], pause_at="supervisor").kill_when_paused("supervisor")
        run = _the_run(ctx)
        assert run.state == "interrupted" and "flywheel resume" in (run.error or "")

        # 2. killed in the tool node right after launching the training job (the job keeps training)
        Child(project, ["resume", run.id], pause_at="tools:launch_training").kill_when_paused("tools:launch_training")
        with ctx.store.engine.connect() as conn:
            [job_id] = conn.execute(select(jobs.c.id)).scalars().all()

        # 3. killed in the tool node again, as it starts waiting on the job
        Child(project, ["resume", run.id], pause_at="tools:training_status:start").kill_when_paused("tools:training_status:start")

        # 4. killed in the approval node, before it asks
        Child(project, ["resume", run.id], pause_at="approval").kill_when_paused("approval")
        assert _the_run(ctx).state == "interrupted"

        # 5. resumed with no terminal: it stops at the approval, pending, and exits 0
        out = Child(project, ["resume", run.id]).finish()
        assert "v2 waits for a decision" in out and "flywheel approve v2" in out
        waiting = _the_run(ctx)
        assert waiting.state == "waiting_approval" and waiting.pending["version"] == "v2"

        # 6. `flywheel approve` resumes the run; killed in the promotion node after the switch
        Child(project, ["approve", "v2", "--by", "dana"], pause_at="promotion").kill_when_paused("promotion")
        assert registry.current_routing(ctx.store).champion == "v2"
        assert _the_run(ctx).state == "interrupted"

        # 7. resumed: the promotion node runs again and changes nothing
        out = Child(project, ["resume", run.id]).finish()
        assert "v2 promoted to champion, approved by dana" in out and "It already was: nothing changed." in out
    finally:
        ctx.close()

    ctx = Context(settings=load_settings(project))
    try:
        final = _the_run(ctx)
        assert final.state == "done" and final.summary["outcome"]["promoted"] is True
        with ctx.store.engine.connect() as conn:
            job = conn.execute(select(jobs)).one()
            versions = [r.id for r in conn.execute(select(model_versions.c.id))]
            switches = conn.execute(select(alias_events.c.alias, alias_events.c.to_version).order_by(alias_events.c.id)).all()
            launches = conn.execute(select(effects.c.key).where(effects.c.key.like(f"tool:{final.id}:%launch_training"))).all()
        assert job.id == job_id and job.status == "succeeded" and job.attempts == 1  # one job, never relaunched
        assert sorted(versions) == ["v1", "v2"]  # registered once
        # one canary start, one promotion (which ends the canary), nothing twice
        assert [tuple(s) for s in switches] == [
            ("champion", "v1"),
            ("canary", "v2"),
            ("champion", "v2"),
            ("previous", "v1"),
            ("canary", None),
        ]
        assert _count(ctx, approvals) == 1 and len(launches) == 1
        assert registry.resolve(ctx.store, "v2").status == "champion"
    finally:
        ctx.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_on_postgresql_a_kill_after_launch_and_after_the_switch_changes_nothing_twice(project: Path, base: Path, pg_url: str) -> None:
    """The same guarantees with the store and the LangGraph checkpointer on PostgreSQL."""
    from conftest import _truncate_all

    _truncate_all(pg_url)
    seed_project(project, base, store_url=pg_url)
    ctx = Context(settings=load_settings(project, store={"url": pg_url}))
    try:
        Child(project, ["run"], pause_at="tools:launch_training", store_url=pg_url).kill_when_paused("tools:launch_training")
        run = _the_run(ctx)
        assert run.state == "interrupted"
        out = Child(project, ["resume", run.id], store_url=pg_url).finish()
        assert "v2 waits for a decision" in out
        Child(project, ["approve", run.id, "--by", "erin"], pause_at="promotion", store_url=pg_url).kill_when_paused("promotion")
        out = Child(project, ["resume", run.id], store_url=pg_url).finish()
        assert "It already was: nothing changed." in out
        with ctx.store.engine.connect() as conn:
            job = conn.execute(select(jobs)).one()
            switches = conn.execute(select(alias_events.c.alias, alias_events.c.to_version).order_by(alias_events.c.id)).all()
        assert job.attempts == 1 and job.status == "succeeded"
        assert [tuple(s) for s in switches] == [
            ("champion", "v1"),
            ("canary", "v2"),
            ("champion", "v2"),
            ("previous", "v1"),
            ("canary", None),
        ]
        assert _the_run(ctx).state == "done" and _count(ctx, approvals) == 1
    finally:
        ctx.close()


def test_pause_hook_is_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flywheel.agent import graph

    def no_sleep(_seconds: float) -> None:
        raise AssertionError("the hook slept")

    monkeypatch.setattr(graph.time, "sleep", no_sleep)
    monkeypatch.delenv("FLYWHEEL_TEST_PAUSE_AT", raising=False)
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_FILE", str(tmp_path / "marker"))
    for name in ("supervisor", "approval", "promotion", "tools:launch_training", "tools:launch_training:start"):
        graph.pause_point(name)
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_AT", "promotion")
    graph.pause_point("supervisor")  # another point: still nothing
    assert not (tmp_path / "marker").exists()
    with pytest.raises(AssertionError, match="the hook slept"):
        graph.pause_point("promotion")
    assert (tmp_path / "marker").read_text().split()[0] == "promotion"
