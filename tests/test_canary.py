"""Canary start/stop and the automatic rollback, over real traffic rows (interactions, failures,
verdicts) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from release_helpers import add_traffic, candidate

from flywheel.cli import main
from flywheel.errors import PolicyViolation, UserInputError
from flywheel.records import utcnow
from flywheel.release import approvals, canary, registry
from flywheel.settings import Settings, load_settings
from flywheel.store.db import Store, open_store
from flywheel.store.failures import set_cluster


@pytest.fixture
def watched(any_store: Store, tmp_path: Path) -> Store:
    """v1 champion (base), v2 a gate-passed candidate, v3 a gate-failed one."""
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    candidate(any_store, tmp_path, 2, gate=False)
    return any_store


def _settings(store: Store, min_requests: int = 50, harm_margin: float = 0.05) -> Settings:
    return store.settings.model_copy(
        update={"canary": store.settings.canary.model_copy(update={"min_requests": min_requests, "harm_margin": harm_margin})}
    )


def _kinds(store: Store, version: str) -> list[str]:
    return [e["kind"] for e in canary.canary_history(store, version)]


def test_starting_a_canary_checks_the_candidate(watched: Store) -> None:
    with pytest.raises(PolicyViolation, match="v3 has not passed its promotion gate"):
        canary.start_canary(watched, "v3", 0.1)
    with pytest.raises(UserInputError, match="v1 is the champion"):
        canary.start_canary(watched, "v1", 0.1)
    with pytest.raises(UserInputError, match="between 0 and 1"):
        canary.start_canary(watched, "v2", 1.0)
    started = canary.start_canary(watched, "v2", 0.2, actor="ops")
    assert not started.replayed
    assert registry.current_routing(watched).model_dump() == {"champion": "v1", "canary": "v2", "share": 0.2}
    assert canary.start_canary(watched, "v2", 0.2).replayed  # the same canary again: nothing changes
    canary.start_canary(watched, "v2", 0.3)  # a new share keeps the observation window
    assert registry.current_routing(watched).share == 0.3 and _kinds(watched, "v2") == ["started", "share"]
    assert registry.resolve(watched, "v2").status == "canary"
    stopped = canary.stop_canary(watched, actor="ops", reason="done looking")
    assert stopped.from_version == "v2" and registry.current_routing(watched).canary is None
    assert registry.resolve(watched, "v2").status == "candidate"
    with pytest.raises(UserInputError, match="no canary is running"):
        canary.stop_canary(watched, actor="ops")
    assert canary.observe_canary(watched, watched.settings).state == "none"


def test_a_harmful_canary_rolls_back_automatically(watched: Store) -> None:
    settings = _settings(watched, min_requests=40, harm_margin=0.05)
    # champion traffic from before the canary started does not count, however bad it was
    add_traffic(watched, "v1", 30, ["over_promise"] * 30, prefix="old-", when=utcnow() - timedelta(hours=1))
    canary.start_canary(watched, "v2", 0.5)
    add_traffic(watched, "v1", 60, ["over_promise"] * 3)  # 5%
    add_traffic(watched, "v2", 20, ["over_promise"] * 2, prefix="v2a-")
    first = canary.observe_canary(watched, settings)
    assert first.state == "collecting" and first.canary_stats.requests == 20 and first.champion_stats.requests == 60
    assert first.champion_stats.problem_rates["over_promise"].count == 3
    add_traffic(watched, "v2", 30, ["over_promise"] * 4, prefix="v2b-")  # 6 of 50: 12%
    status = canary.observe_canary(watched, settings)
    assert status.state == "rolled_back"
    assert {h.problem_type for h in status.harms} == {"over_promise", "overall"}
    assert status.canary_stats.problem_rates["over_promise"].rate == pytest.approx(0.12)
    assert "over_promise: canary 0.120 vs champion 0.050" in status.reason
    assert registry.current_routing(watched).canary is None
    assert registry.resolve(watched, "v2").status == "rolled_back"
    assert _kinds(watched, "v2") == ["started", "observation", "observation", "rolled_back"]
    assert canary.canary_history(watched, "v2")[-1]["detail"]["harms"][0]["problem_type"] == "overall"
    # a rolled-back version can neither canary again nor be promoted
    with pytest.raises(PolicyViolation, match="v2 is rolled_back"):
        canary.start_canary(watched, "v2", 0.1)
    with pytest.raises(PolicyViolation):
        approvals.promote(watched, watched.settings, "v2", actor="alice")


def test_a_canary_within_the_margin_stays_and_cleared_failures_do_not_count(watched: Store) -> None:
    settings = _settings(watched, min_requests=50, harm_margin=0.05)
    canary.start_canary(watched, "v2", 0.5)
    add_traffic(watched, "v1", 100, ["wrong_intent"] * 5)
    # 9% wrong_intent (4 points above: within the margin) and 10 captures the judge cleared
    add_traffic(watched, "v2", 100, ["wrong_intent"] * 9 + ["cleared"] * 10)
    status = canary.observe_canary(watched, settings)
    assert status.state == "healthy" and status.harms == []
    assert status.canary_stats.failure_rate.count == 9
    assert registry.current_routing(watched).canary == "v2"
    # captures not yet judged count as failures ("unjudged"); a near-duplicate takes its cluster's verdict
    ids = add_traffic(watched, "v2", 4, [None] * 4, prefix="late-")
    with watched.begin() as conn:
        set_cluster(conn, ids[0], "f-v2-0", 2)  # f-v2-0 was judged wrong_intent
    status = canary.observe_canary(watched, settings)
    assert status.canary_stats.problem_rates["unjudged"].count == 3
    assert status.canary_stats.problem_rates["wrong_intent"].count == 10
    assert status.state == "rolled_back"  # overall 13/104 vs 5/100
    assert [h.problem_type for h in status.harms] == ["overall"]


def test_cli_canary_commands(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "flywheel.toml").write_text("[canary]\nmin_requests = 5\n")
    store = open_store(load_settings(project))
    try:
        registry.register_base(store, "tiny-base")
        candidate(store, tmp_path, 1)
        candidate(store, tmp_path, 2, gate=False)
    finally:
        store.dispose()
    cli = ["-C", str(project)]
    assert main([*cli, "canary", "status"]) == 0
    assert "no canary is running" in capsys.readouterr().out
    assert main([*cli, "canary", "start", "v3"]) == 5
    assert main([*cli, "canary", "start", "v2", "--share", "1.5"]) == 2
    assert main([*cli, "canary", "start", "v2", "--share", "0.25"]) == 0
    assert "canary v2 started at 25% of users" in capsys.readouterr().out
    store = open_store(load_settings(project))
    try:
        add_traffic(store, "v1", 5)
        add_traffic(store, "v2", 5, ["format_error"])
    finally:
        store.dispose()
    assert main([*cli, "canary", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "rolled_back" and status["canary_stats"]["problem_rates"]["format_error"]["count"] == 1
    assert main([*cli, "canary", "stop"]) == 2  # the monitor already took it back
    assert main([*cli, "canary", "start", "v9"]) == 3
