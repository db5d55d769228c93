"""The daemon: APScheduler 3 jobs in the flywheel store (real SQLite and real PostgreSQL), a real firing
that starts a heuristic cycle, one cycle at a time, and a real `flywheel daemon` child process stopped
with SIGTERM while a cycle is held in the supervisor node (the graph's test pause hook). Online rounds:
the daemon's real poll over a seeded project (real triage, rule judge and KB corrector), a round that
trains, evaluates and waits for approval, a due round waiting for a held cycle, and a restart."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import seed_project
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from sqlalchemy import create_engine, select, text

from flywheel.agent import rounds, runs, schedule
from flywheel.agent.runner import decide
from flywheel.agent.schedule import (
    JOB_PREFIX,
    JOB_TABLE,
    Daemon,
    build_scheduler,
    check_schedules,
    cron_trigger,
    run_scheduled,
    stop_scheduler,
    sync_jobs,
)
from flywheel.cli import main
from flywheel.context import Context
from flywheel.correct.stage import correct_failures
from flywheel.data.triage import triage
from flywheel.errors import SettingsError
from flywheel.evals.judge import judge_failures
from flywheel.settings import load_settings
from flywheel.store import failures as failure_repo
from flywheel.store.schema import jobs
from flywheel.tools.failures import pipeline_status

EVERY_SECOND = "* * * * * *"


def _schedules(*items: tuple[str, str]) -> dict[str, Any]:
    return {"schedules": [{"id": i, "cron": c} for i, c in items]}


def _wait(predicate: Any, timeout: float = 60.0, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _schedule_runs(ctx: Context) -> list[runs.RunRow]:
    return [r for r in runs.list_runs(ctx.store, limit=100) if r.trigger == "schedule"]


# --- schedules and the job store --------------------------------------------------------------------------------


def test_cron_fields_follow_crontab_and_wrong_entries_are_named(project: Path) -> None:
    sunday = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    monday = cron_trigger("0 3 * * 1", "UTC").get_next_fire_time(None, sunday)
    assert (monday.strftime("%A"), monday.hour) == ("Monday", 3)  # crontab 1 is Monday (APScheduler 3 alone says Tuesday)
    weekend = cron_trigger("30 9 * * 0,6", "UTC").get_next_fire_time(None, sunday)
    assert weekend.strftime("%A %H:%M") == "Saturday 09:30"
    assert cron_trigger("*/10 * * * * *", "UTC").get_next_fire_time(None, sunday).second == 0

    bad = load_settings(project, daemon=_schedules(("ok", "0 3 * * *"), ("broken", "61 * * * *")))
    with pytest.raises(SettingsError, match=r"daemon.schedules\[1\].cron"):
        check_schedules(bad)
    with pytest.raises(SettingsError, match="used twice"):
        check_schedules(load_settings(project, daemon=_schedules(("a", "0 3 * * *"), ("a", "0 4 * * *"))))
    with pytest.raises(SettingsError, match="expected 5 fields"):
        check_schedules(load_settings(project, daemon=_schedules(("a", "0 3 * *"))))
    with pytest.raises(SettingsError, match="daemon.schedules"):
        check_schedules(load_settings(project, daemon={**_schedules(("a", "0 3 * * *")), "timezone": "Mars/Olympus"}))

    (project / "flywheel.toml").write_text('[[daemon.schedules]]\nid = "nightly"\ncron = "0 3 * * 1-5"\n', encoding="utf-8")
    assert main(["-C", str(project), "schedules", "--json"]) == 0
    (project / "flywheel.toml").write_text('[[daemon.schedules]]\nid = "nightly"\ncron = "0 3 * * mon-fry"\n', encoding="utf-8")
    assert main(["-C", str(project), "daemon", "--slack", "off"]) == 2  # refused before anything starts


def test_the_daemon_refuses_to_start_slack_without_its_tokens_or_channel(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["-C", str(project), "daemon", "--slack", "socket"]) == 2
    assert "SLACK_BOT_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    assert main(["-C", str(project), "daemon", "--slack", "http", "--port", "0"]) == 2
    assert "SLACK_SIGNING_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "s")
    assert main(["-C", str(project), "daemon", "--slack", "http", "--port", "0"]) == 2
    assert "slack.channel" in capsys.readouterr().err
    assert main(["-C", str(project), "daemon", "--slack", "carrier-pigeon"]) == 2


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    url = request.getfixturevalue("pg_url")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # the session database is shared: start without earlier jobs
        conn.execute(text(f"DROP TABLE IF EXISTS {JOB_TABLE}"))
    engine.dispose()
    return url


def _stored_jobs(ctx: Context) -> dict[str, Any]:
    with ctx.store.engine.connect() as conn:
        return {row.id: row.next_run_time for row in conn.execute(text(f"SELECT id, next_run_time FROM {JOB_TABLE}"))}


def _restart(project: Path, store_url: str | None, daemon: dict[str, Any]) -> tuple[list[str], dict[str, Any], str]:
    """One daemon start and stop: build the scheduler on the store, sync the jobs, shut it down."""
    overrides: dict[str, Any] = {"daemon": daemon}
    if store_url:
        overrides["store"] = {"url": store_url}
    ctx = Context(settings=load_settings(project, **overrides))
    try:
        scheduler = build_scheduler(ctx)
        scheduler.start(paused=True)
        ids = sync_jobs(scheduler, ctx.settings)
        hourly = scheduler.get_job(JOB_PREFIX + "hourly")
        trigger = repr(hourly.trigger) if hourly else ""
        stop_scheduler(scheduler)
        return ids, _stored_jobs(ctx), trigger
    finally:
        ctx.close()


def test_jobs_are_created_once_across_restarts(project: Path, store_url: str | None) -> None:
    two = _schedules(("hourly", "0 * * * *"), ("nightly", "0 3 * * *"))
    ids, first, _ = _restart(project, store_url, two)
    assert ids == ["schedule:hourly", "schedule:nightly"] and sorted(first) == ids
    for _ in range(2):  # restarts: the same two jobs, not four or six
        ids, again, _ = _restart(project, store_url, two)
        assert again == first
    # a changed schedule replaces its job under the same id; a removed one is removed
    ids, changed, trigger = _restart(project, store_url, _schedules(("hourly", "15 * * * *")))
    assert ids == ["schedule:hourly"] and list(changed) == ["schedule:hourly"] and "minute='15'" in trigger


def test_a_firing_missed_while_the_daemon_was_down_runs_once_at_restart(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(project, daemon=_schedules(("nightly", "0 3 * * *")))
    ctx = Context(settings=settings)
    try:
        # The daemon stopped at 02:50 and 03:00 passed while it was down: its stored job is still due at
        # 03:00, now ten minutes ago (set through APScheduler, which keeps the row and the job state in step).
        scheduler = build_scheduler(ctx)
        scheduler.start(paused=True)
        sync_jobs(scheduler, settings)
        scheduler.modify_job("schedule:nightly", next_run_time=datetime.now(UTC) - timedelta(minutes=10))
        stop_scheduler(scheduler)
        # APScheduler reports a job executed once its executor has run every firing it was handed for it (one
        # per missed day, were coalescing off); the job's next run time was stored when it was handed over.
        finished = threading.Event()

        def listening(*args: Any, **kwargs: Any) -> Any:
            built = build_scheduler(*args, **kwargs)
            built.add_listener(
                lambda event: finished.set() if event.job_id == "schedule:nightly" else None, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
            )
            return built

        monkeypatch.setattr(schedule, "build_scheduler", listening)
        daemon = Daemon(ctx, slack_mode="off").start()
        try:
            [fired] = _wait(lambda: [r for r in _schedule_runs(ctx) if r.state == "done"], what="the missed firing")
            assert finished.wait(60), "the scheduler never reported the missed firing's job as executed"
            assert _stored_jobs(ctx)["schedule:nightly"] > time.time()  # no other firing is due: none can start
        finally:
            daemon.stop(grace_s=30)
        assert len(_schedule_runs(ctx)) == 1  # once, not once per missed day or per restart
        assert _stored_jobs(ctx)["schedule:nightly"] > time.time()  # and the next one is the next 03:00
    finally:
        ctx.close()


# --- firing ----------------------------------------------------------------------------------------------------------


def test_a_schedule_fires_and_starts_a_heuristic_cycle(project: Path) -> None:
    # the policy setting asks for the LLM, but no endpoint is configured: scheduled runs use the heuristic
    ctx = Context(settings=load_settings(project, daemon=_schedules(("fast", EVERY_SECOND)), agent={"policy": "llm"}))
    daemon = Daemon(ctx, slack_mode="off").start()
    try:
        fired = _wait(lambda: [r for r in _schedule_runs(ctx) if r.state == "done"], what="a scheduled run")
    finally:
        assert daemon.stop(grace_s=30) == []
    assert fired[0].policy == "heuristic" and "Cycle finished" in fired[0].summary["last_message"]
    assert sorted(_stored_jobs(ctx)) == ["schedule:fast"]
    ctx.close()


def test_a_cycle_in_progress_is_not_started_twice(project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "paused"
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_AT", "supervisor")
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_FILE", str(marker))
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_SECONDS", "1.5")
    ctx = Context(settings=load_settings(project))
    other = Context(settings=load_settings(project))  # another process's view: its own handles and lock
    try:
        busy = threading.Lock()
        results: dict[str, Any] = {}
        first = threading.Thread(target=lambda: results.update(first=run_scheduled(ctx, "nightly", busy)))
        first.start()
        _wait(marker.exists, what="the first cycle to be in the supervisor")
        assert run_scheduled(ctx, "hourly", busy) is None  # the same daemon: its lock is held
        assert run_scheduled(other, "nightly", threading.Lock()) is None  # another process: run_in_progress
        [running] = _schedule_runs(ctx)
        assert running.state == "running"
        first.join(timeout=120)
        assert results["first"].state == "done" and results["first"].run_id == running.id
        monkeypatch.delenv("FLYWHEEL_TEST_PAUSE_AT")
        assert run_scheduled(other, "nightly", threading.Lock()).state == "done"  # free again
        assert len(_schedule_runs(ctx)) == 2
    finally:
        other.close()
        ctx.close()


# --- the process -----------------------------------------------------------------------------------------------------


def _child_env(pause: bool, marker: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "SLACK_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if pause:
        env.update(FLYWHEEL_TEST_PAUSE_AT="supervisor", FLYWHEEL_TEST_PAUSE_FILE=str(marker), FLYWHEEL_TEST_PAUSE_SECONDS="600")
    return env


def _daemon_process(project: Path, log: Path, pause: bool, marker: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "-C", str(project), "daemon", "--slack", "off"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(pause, marker),
        )


def test_the_daemon_process_stops_on_sigterm_and_leaves_a_held_cycle_resumable(project: Path, tmp_path: Path) -> None:
    (project / "flywheel.toml").write_text(
        f'[daemon]\nshutdown_grace_s = 1\n\n[[daemon.schedules]]\nid = "fast"\ncron = "{EVERY_SECOND}"\n', encoding="utf-8"
    )
    marker, log = tmp_path / "paused", tmp_path / "daemon.log"
    child = _daemon_process(project, log, True, marker)
    try:
        _wait(lambda: marker.exists() or child.poll() is not None, what="the first cycle")
        assert child.poll() is None, log.read_text()
        # more firings come while the cycle is held: two are turned away (logged "skipped"); none may start another
        _wait(lambda: log.read_text().count("skipped") >= 2 or child.poll() is not None, what="two firings skipped")
        assert child.poll() is None, log.read_text()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
    said = log.read_text()
    assert "daemon started: 1 schedule(s) schedule:fast" in said and "received SIGTERM" in said
    assert "skipped" in said and "daemon stopped" in said
    ctx = Context(settings=load_settings(project))
    try:
        [held] = _schedule_runs(ctx)
        assert held.state == "interrupted" and f"flywheel resume {held.id}" in said
    finally:
        ctx.close()
    assert main(["-C", str(project), "resume", held.id]) == 0
    ctx = Context(settings=load_settings(project))
    try:
        assert [r.state for r in _schedule_runs(ctx)] == ["done"]
    finally:
        ctx.close()

    # a restart on the same store: the same single job, and SIGINT stops it just as cleanly
    restarted = _daemon_process(project, tmp_path / "again.log", False, marker)
    try:
        _wait(lambda: "daemon started" in (tmp_path / "again.log").read_text() or restarted.poll() is not None, what="the restart")
        restarted.send_signal(signal.SIGINT)
        assert restarted.wait(timeout=60) == 0, (tmp_path / "again.log").read_text()
    finally:
        if restarted.poll() is None:
            restarted.kill()
    ctx = Context(settings=load_settings(project))
    try:
        assert sorted(_stored_jobs(ctx)) == ["schedule:fast"]
    finally:
        ctx.close()


# --- online rounds -----------------------------------------------------------------------------------------------

ROUNDS = {"round_min_verified": 3, "round_poll_s": 0.2}


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # built once per session (tests/conftest.py)


def _round_runs(ctx: Context) -> list[runs.RunRow]:
    return [r for r in runs.list_runs(ctx.store, limit=100) if r.trigger == "round"]


def _polls_after(daemon: Daemon, more: int) -> None:
    """Wait until the daemon has checked the store `more` more times (each check reads it afresh)."""
    target = daemon.round_polls + more
    _wait(lambda: daemon.round_polls >= target, what=f"{more} round checks")


def _judged(ctx: Context) -> list[str]:
    """Triage and judge the seeded logs: the failures wait for a correction (none is verified yet)."""
    triage(ctx)
    judge_failures(ctx)
    rows = failure_repo.list_failures(ctx.store, failure_repo.FailureFilter(limit=100))
    waiting = [row.id for row in rows if row.status == "judged"]
    assert waiting and pipeline_status(ctx).verified_problem_samples == 0
    return waiting


def test_round_settings_refuse_negative_and_absurd_values(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in (("round_min_verified", -1), ("round_min_verified", 10**9), ("round_poll_s", 0), ("round_poll_s", 86400)):
        with pytest.raises(SettingsError, match=f"daemon.{name}"):
            load_settings(project, daemon={name: value})
    (project / "flywheel.toml").write_text("[daemon]\nround_min_verified = -5\n", encoding="utf-8")
    assert main(["-C", str(project), "daemon", "--slack", "off"]) == 2  # refused before anything starts
    assert "daemon.round_min_verified" in capsys.readouterr().err
    assert main(["-C", str(project), "schedules"]) == 2


def test_a_round_starts_once_enough_verified_samples_arrived_trains_and_a_restart_does_not_repeat_it(
    project: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_project(project, base, daemon=ROUNDS)
    ctx = Context(settings=load_settings(project))
    try:
        waiting = _judged(ctx)
        assert len(waiting) == 3  # six logs, three clusters: three samples to verify
        daemon = Daemon(ctx, slack_mode="off").start()
        try:
            _polls_after(daemon, 3)
            assert correct_failures(ctx, waiting[:2]).verified == 2  # two arrive: one short of the trigger
            _polls_after(daemon, 3)
            assert _round_runs(ctx) == [] and rounds.round_status(ctx).new == 2
            assert main(["-C", str(project), "schedules", "--json"]) == 0
            [row] = json.loads(capsys.readouterr().out)
            assert (row["kind"], row["new_verified"], row["min_verified"], row["due"], row["last_round"]) == ("round", 2, 3, False, None)

            assert correct_failures(ctx, waiting[2:]).verified == 1  # the third: a round starts
            _wait(lambda: _round_runs(ctx), what="the round to start")
            _wait(lambda: daemon.round_thread is not None and not daemon.round_thread.is_alive(), timeout=600, what="the round to end")
            [round_run] = _round_runs(ctx)
            # the same supervisor cycle a cron firing runs: a snapshot, a training job, the evaluation, the approval
            assert round_run.policy == "heuristic" and round_run.state == "waiting_approval", round_run
            cycle = round_run.summary["cycle"]
            assert cycle["dataset_id"] and cycle["job_id"] and cycle["candidate"] == "v2" and cycle["gate_passed"] is True
            assert round_run.pending and round_run.pending["version"] == "v2"
            with ctx.store.engine.connect() as conn:
                assert conn.execute(select(jobs.c.status).where(jobs.c.id == cycle["job_id"])).scalar_one() == "succeeded"
            marker = rounds.last_round(ctx)
            assert marker is not None and marker.run_id == round_run.id and marker.samples == 3
            assert marker.since > marker.started_at  # the watermark moved to the round's snapshot

            _polls_after(daemon, 5)
            assert len(_round_runs(ctx)) == 1  # the same samples start no second round
        finally:
            assert daemon.stop(grace_s=30) == []
        assert main(["-C", str(project), "schedules"]) == 0
        said = capsys.readouterr().out
        assert f"0 new since the last round (last round {round_run.id}" in said and "3 verified in the problem tier" in said
        # rejected: the three samples stay verified in the problem tier, as many as the trigger needs
        decide(ctx, "v2", "rejected", getpass.getuser(), "not now")
        assert pipeline_status(ctx).verified_problem_samples == 3 and pipeline_status(ctx).awaiting_decision == []
    finally:
        ctx.close()

    # a restart on the same store: without the marker the three samples would be due again; with it, nothing starts
    again = Context(settings=load_settings(project))
    try:
        assert rounds.new_verified_samples(again, None) == 3
        status = rounds.round_status(again)
        assert status.new == 0 and status.last_round is not None and status.last_round.run_id == round_run.id
        daemon = Daemon(again, slack_mode="off").start()
        try:
            _polls_after(daemon, 5)
            assert [r.id for r in _round_runs(again)] == [round_run.id]
            assert daemon.round_thread is None
        finally:
            assert daemon.stop(grace_s=30) == []
    finally:
        again.close()


def test_a_due_round_waits_for_a_running_cycle_then_starts_after_it(
    project: Path, base: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No training here (the budget is 0): both cycles stop before launching a job; the round's start is what counts.
    seed_project(project, base, daemon=ROUNDS, agent={"max_training_runs": 0})
    marker = tmp_path / "paused"
    ctx = Context(settings=load_settings(project))
    try:
        assert correct_failures(ctx, _judged(ctx)).verified == 3  # due from the first check on
        daemon = Daemon(ctx, slack_mode="off")
        # a cron firing of this daemon, held in the supervisor node
        monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_AT", "supervisor")
        monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_FILE", str(marker))
        monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_SECONDS", "1.5")
        results: dict[str, Any] = {}
        cron = threading.Thread(target=lambda: results.update(cron=run_scheduled(ctx, "nightly", daemon._busy)))
        cron.start()
        _wait(marker.exists, what="the cron cycle to be in the supervisor")
        caplog.set_level("INFO", logger="flywheel.daemon")
        daemon.start()
        try:
            _polls_after(daemon, 4)
            [held] = _schedule_runs(ctx)
            assert held.state == "running" and _round_runs(ctx) == []  # due, but a cycle runs: the round waits
            waits = [r.getMessage() for r in caplog.records if "online round due" in r.getMessage()]
            assert waits == [f"online round due (3 new verified samples); waiting: run {held.id} is in progress"]  # said once
            monkeypatch.delenv("FLYWHEEL_TEST_PAUSE_AT")  # the held cycle goes on (after the pause it is in)
            cron.join(timeout=300)
            assert results["cron"].state == "done"
            _wait(lambda: daemon.round_thread is not None and not daemon.round_thread.is_alive(), timeout=300, what="the round")
        finally:
            assert daemon.stop(grace_s=30) == []
        [cron_run] = _schedule_runs(ctx)
        [round_run] = _round_runs(ctx)
        assert round_run.created_at >= cron_run.updated_at  # it started after the cron cycle ended: never two at once
        assert round_run.state == "done" and round_run.policy == "heuristic"
        assert round_run.summary["cycle"]["dataset_id"]  # it reached its snapshot; the budget of 0 stopped the training
        assert "training budget (0 per cycle) is spent" in round_run.summary["last_message"]
        assert rounds.last_round(ctx).run_id == round_run.id  # type: ignore[union-attr]
    finally:
        ctx.close()
