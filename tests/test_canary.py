"""Canary start/stop and the automatic rollback, over real traffic rows (interactions, failures,
verdicts) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from release_helpers import add_traffic, candidate
from rich.console import Console

from flywheel.agent.chat import TerminalView
from flywheel.agent.slack_blocks import approval_blocks
from flywheel.cli import main
from flywheel.context import Context
from flywheel.errors import PolicyViolation, UserInputError
from flywheel.evals.report import report_hash_of
from flywheel.records import utcnow
from flywheel.release import approvals, canary, decisions, registry
from flywheel.settings import Settings, load_settings
from flywheel.settings_sections import CanarySettings
from flywheel.store.db import Store, open_store
from flywheel.store.failures import set_cluster
from flywheel.tools import canary as canary_tools


@pytest.fixture
def watched(any_store: Store, tmp_path: Path) -> Store:
    """v1 champion (base), v2 a gate-passed candidate, v3 a gate-failed one."""
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    candidate(any_store, tmp_path, 2, gate=False)
    return any_store


def _settings(store: Store, min_requests: int = 50, harm_margin: float = 0.05, rule: str = "sequential", **extra: Any) -> Settings:
    canary_settings = CanarySettings.model_validate(
        {**store.settings.canary.model_dump(), "min_requests": min_requests, "harm_margin": harm_margin, "rule": rule, **extra}
    )
    return store.settings.model_copy(update={"canary": canary_settings})


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


def test_the_fixed_rule_rolls_a_harmful_canary_back_automatically(watched: Store) -> None:
    settings = _settings(watched, min_requests=40, harm_margin=0.05, rule="fixed")
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


def test_the_fixed_rule_keeps_a_canary_within_the_margin_and_cleared_failures_do_not_count(watched: Store) -> None:
    settings = _settings(watched, min_requests=50, harm_margin=0.05, rule="fixed")
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
    (project / "flywheel.toml").write_text('[canary]\nmin_requests = 5\nrule = "fixed"\n')
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


# --- the sequential test -------------------------------------------------------------------------------------

TAXONOMY = sorted([*Settings().taxonomy.problem_types, "unjudged", "unspecified"])


def _counts(overall: tuple[int, int], **types: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(champion, canary) failures of every rate the observer tests: overall and each problem type."""
    return {"overall": overall, **{name: types.get(name, (0, 0)) for name in TAXONOMY}}


def test_the_sequential_test_stops_early_when_harm_or_no_harm_is_clear_and_continues_otherwise() -> None:
    cfg = CanarySettings(min_requests=30, max_requests=2000)
    # 40% over_promise on the canary against 5% on the champion: harm after 40 canary requests
    harmful = canary.sequential_test(_counts((10, 16), over_promise=(10, 16)), 200, 40, cfg)
    assert harmful.decision == "harm" and harmful.deciding is not None
    assert harmful.deciding.log_lr_harm >= harmful.harm_threshold == pytest.approx(math.log(9 / 0.05))
    assert harmful.rates_tested == 9 and harmful.canary_requests == 40 < cfg.max_requests
    # a canary that fixes most failures: no harm once every rate rules out a 5-point rise, long before max_requests
    fine = canary.sequential_test(_counts((60, 5), wrong_intent=(60, 5)), 600, 200, cfg)
    assert fine.decision == "no_harm"
    assert all(t.log_lr_no_harm >= fine.no_harm_threshold for t in fine.tests)
    # ... but not before the rarest rates could show such a rise at all
    assert canary.sequential_test(_counts((60, 3), wrong_intent=(60, 3)), 600, 100, cfg).decision == "continue"
    # 3 points above the champion after 50 requests: neither is clear, the canary goes on
    ambiguous = canary.sequential_test(_counts((10, 4), over_promise=(10, 4)), 200, 50, cfg)
    assert ambiguous.decision == "continue"
    assert ambiguous.deciding is not None and ambiguous.deciding.name in ("overall", "over_promise")
    assert "log LR harm" in ambiguous.sentence() and "at most 2000 requests each" in ambiguous.sentence()
    # the same counts at max_requests: inconclusive, kept for a person
    capped = canary.sequential_test(_counts((10, 4), over_promise=(10, 4)), 200, 50, cfg.model_copy(update={"max_requests": 50}))
    assert capped.decision == "inconclusive" and "inconclusive at max_requests 50" in capped.sentence()
    # below the floor nothing is decided, however clear it looks
    early = canary.sequential_test(_counts((10, 16), over_promise=(10, 16)), 200, 20, cfg)
    assert early.decision == "continue" and early.tests == []


def test_the_statistics_respect_their_nulls() -> None:
    # a canary no worse than the champion gives no harm evidence; one far above gives no no-harm evidence
    assert canary.log_lr_harm(20, 200, 10, 100) <= 0
    assert canary.log_lr_harm(20, 200, 5, 100) <= 0
    assert canary.log_lr_no_harm(20, 200, 20, 100, 0.05) <= 0  # 20% vs 10%: the rise is above the margin
    # evidence grows with the data at the same rates
    assert canary.log_lr_harm(20, 200, 60, 200) > canary.log_lr_harm(10, 100, 30, 100) > 0
    assert canary.log_lr_no_harm(40, 400, 40, 400, 0.05) > canary.log_lr_no_harm(10, 100, 10, 100, 0.05)
    # a rate nobody failed: at p0 = 0, p1 = margin the likelihood is (1 - m)^n1, the mixture beats it in time
    assert canary.log_lr_no_harm(0, 1000, 0, 400, 0.05) > math.log(10)


def _stream(p0: float, p1: float, seed: int, cfg: CanarySettings) -> str:
    """One simulated canary: requests go to the canary with probability 0.25, each fails with its
    version's rate, and the canary is observed every 50 requests until `cfg.rule` decides."""
    rng = random.Random(seed)
    n0 = n1 = x0 = x1 = 0
    while True:
        for _ in range(50):
            if rng.random() < 0.25:
                n1, x1 = n1 + 1, x1 + (rng.random() < p1)
            else:
                n0, x0 = n0 + 1, x0 + (rng.random() < p0)
        if cfg.rule == "sequential":
            decision = canary.sequential_test({"overall": (x0, x1)}, n0, n1, cfg).decision
        elif min(n0, n1) < cfg.min_requests:
            decision = "continue"
        else:  # the fixed rule, at every observation as the monitor applies it, until max_requests
            decision = "harm" if x1 / n1 - x0 / n0 > cfg.harm_margin else "no_harm" if min(n0, n1) >= cfg.max_requests else "continue"
        if decision != "continue":
            return decision


def test_simulated_canaries_keep_the_error_rates() -> None:
    """Seeded Bernoulli streams: false rollbacks at most alpha with no harm, false "no harm" at most beta
    at a harm of exactly the margin, and high power at twice the margin."""
    cfg = CanarySettings(min_requests=20, max_requests=600, alpha=0.1, beta=0.1, harm_margin=0.1)
    runs = 150
    no_harm = Counter(_stream(0.2, 0.2, seed, cfg) for seed in range(runs))
    assert no_harm["harm"] / runs <= cfg.alpha + 0.03
    assert no_harm["no_harm"] / runs >= 0.7  # and mostly says so before max_requests (78% measured)
    at_margin = Counter(_stream(0.2, 0.3, 1000 + seed, cfg) for seed in range(runs))
    assert at_margin["no_harm"] / runs <= cfg.beta + 0.03
    harmful = Counter(_stream(0.2, 0.4, 2000 + seed, cfg) for seed in range(runs))
    assert harmful["harm"] / runs >= 0.95
    # the fixed rule at its defaults, watched as often, rolls back a harmless canary far more often
    fixed = CanarySettings(rule="fixed", min_requests=50, max_requests=600, harm_margin=0.05)
    assert Counter(_stream(0.2, 0.2, seed, fixed) for seed in range(runs))["harm"] / runs > 2 * cfg.alpha


def test_the_observer_rolls_back_a_clearly_harmful_canary_before_the_fixed_floor(watched: Store) -> None:
    settings = _settings(watched, min_requests=30)
    assert settings.canary.rule == "sequential"  # the default
    canary.start_canary(watched, "v2", 0.2)
    add_traffic(watched, "v1", 200, ["over_promise"] * 10)
    add_traffic(watched, "v2", 20, ["over_promise"] * 8, prefix="v2a-")
    first = canary.observe_canary(watched, settings)
    assert first.state == "collecting" and first.decision == "continue" and "collecting until 30 requests each" in first.reason
    add_traffic(watched, "v2", 20, ["over_promise"] * 8, prefix="v2b-")
    status = canary.observe_canary(watched, settings)
    assert status.state == "rolled_back" and status.decision == "harm"
    assert status.evidence is not None and status.evidence.canary_requests == 40 and status.evidence.champion_requests == 200
    assert {h.problem_type for h in status.harms} == {"over_promise", "overall"}
    assert "harm (sequential test" in status.reason and "after 40 canary / 200 champion requests" in status.reason
    assert registry.resolve(watched, "v2").status == "rolled_back"
    recorded = canary.canary_history(watched, "v2")
    assert [e["kind"] for e in recorded] == ["started", "observation", "observation", "rolled_back"]
    assert recorded[2]["detail"]["evidence"]["decision"] == "harm"


def test_a_fine_canary_is_kept_and_its_evidence_reaches_the_approval_request(watched: Store, tmp_path: Path) -> None:
    settings = _settings(watched, min_requests=30)
    report = tmp_path / "reports" / "report-9.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"gate": {"passed": True, "reasons": ["every check passed"]}, "targeted": ["wrong_intent"]}))
    target = candidate(watched, report.parent, 9, report_hash=report_hash_of(report))
    canary.start_canary(watched, target.id, 0.25)
    ctx = Context(settings=settings, _store=watched)
    assert decisions.build_pending(ctx, "run-1", target, "v1").canary is None  # started, not observed yet
    add_traffic(watched, "v1", 300, ["wrong_intent"] * 30)
    add_traffic(watched, target.id, 60, ["wrong_intent"] * 2)
    ambiguous = canary.observe_canary(watched, settings)
    assert ambiguous.state == "collecting" and ambiguous.decision == "continue"
    add_traffic(watched, target.id, 160, ["wrong_intent"] * 3, prefix="more-")
    status = canary.observe_canary(watched, settings)
    assert status.state == "healthy" and status.decision == "no_harm" and status.harms == []
    assert registry.current_routing(watched).canary == target.id

    pending = decisions.build_pending(ctx, "run-1", target, "v1")
    assert pending.canary is not None and pending.canary.decision == "no_harm" and pending.canary.canary_requests == 220
    again = decisions.PendingApproval.model_validate_json(pending.model_dump_json())  # as runs.pending stores it
    assert again.canary == pending.canary
    blocks = json.dumps(approval_blocks(settings, pending))
    assert "*Canary: no harm*" in blocks and "after 220 canary / 300 champion requests" in blocks
    console = Console(record=True, width=400)
    TerminalView(console, settings).show_pending(pending)
    shown = [line for line in console.export_text().splitlines() if line.strip().startswith("canary")]
    assert len(shown) == 1 and "no harm (sequential test" in shown[0]


def test_the_canary_tool_returns_the_decision_and_its_evidence(watched: Store) -> None:
    settings = _settings(watched, min_requests=30)
    canary.start_canary(watched, "v2", 0.2)
    add_traffic(watched, "v1", 200, ["over_promise"] * 10)
    add_traffic(watched, "v2", 40, ["over_promise"] * 16)
    ctx = Context(settings=settings, _store=watched)
    spec = next(s for s in canary_tools.SPECS if s.fn is canary_tools.canary_status)
    status = canary_tools.canary_status(ctx)
    assert status.decision == "harm" and status.evidence is not None and status.evidence.harm_threshold is not None
    assert spec.facts is not None and spec.facts(status)["canary_decision"] == "harm"


def test_canary_settings_refuse_a_window_that_ends_before_it_starts() -> None:
    with pytest.raises(ValueError, match="max_requests 10 is below min_requests 50"):
        CanarySettings(max_requests=10)
