"""Many cycles: when the loop stops, how baseline samples climb the tiers with a person's approval, the
labelling budget per champion, and the champions' history chart."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from release_helpers import add_samples, add_traffic, candidate
from sqlalchemy import select, update

from flywheel.agent.cycles import CycleRecord, stop_reason
from flywheel.data.labels import add_label, labels_spent
from flywheel.evals.history import champion_history, history_chart, with_candidate
from flywheel.records import SampleTier
from flywheel.release import approvals, baseline_review, graduation, registry
from flywheel.settings_sections import LoopSettings
from flywheel.store.db import Store
from flywheel.store.failures import get_failures
from flywheel.store.schema import failures, tier_moves
from flywheel.store.tiers import tier_counts


def _record(n: int, state: str, **fields: Any) -> CycleRecord:
    return CycleRecord(cycle=n, run_id=f"run-{n}", state=state, champion_before="v1", champion="v1", **fields)


# --- when the loop stops ----------------------------------------------------------------------------------------


def test_the_loop_stops_when_stable_when_budgets_are_spent_and_after_two_gate_failures() -> None:
    limits = LoopSettings(min_gain=0.01, max_gate_failures=2, max_labels=500, max_training_runs=3, max_wall_s=3600)

    def why(history: list[CycleRecord], until_stable: bool = True, cycles: int = 10, elapsed: float = 0.0) -> str | None:
        return stop_reason(history, limits, until_stable=until_stable, max_cycles=cycles, elapsed_s=elapsed)

    gaining = _record(1, "promoted", improvement={"wrong_intent": 0.08}, labels=100, training_runs=1)
    assert why([gaining]) is None
    flat = _record(2, "promoted", improvement={"wrong_intent": 0.004, "over_promise": 0.01}, labels=100, training_runs=1)
    assert "stable: cycle 2" in (why([gaining, flat]) or "")
    assert why([gaining, flat], until_stable=False) is None  # the demo's fixed number of cycles goes on
    assert why([gaining, _record(2, "gate_failed")]) is None  # one miss: the next cycle starts from the last champion
    assert "2 cycles ended without a promotion" in (why([gaining, _record(2, "gate_failed"), _record(3, "rejected")]) or "")
    assert "label budget is spent (500" in (why([gaining, _record(2, "promoted", improvement={"x": 0.1}, labels=400)]) or "")
    three_runs = [_record(i, "promoted", improvement={"x": 0.1}, training_runs=1) for i in (1, 2, 3)]
    assert "training budget is spent (3 of" in (why(three_runs) or "")
    assert "time budget is spent" in (why([gaining], elapsed=4000) or "")
    assert why([gaining], cycles=1) == "1 cycle(s) run, as asked"
    for state, words in (
        ("failed", "failed"),
        ("step_failed", "stopped at a step"),
        ("waiting_approval", "waits for a person"),
        ("nothing_to_train", "nothing to train"),
    ):
        assert words in (why([_record(1, state, candidate="v2")]) or "")


def test_loop_settings_refuse_nonsense() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_cycles"):
        LoopSettings(max_cycles=0)
    with pytest.raises(ValidationError, match="min_gain"):
        LoopSettings(min_gain=-0.1)


# --- baselines climb one tier per cycle, with the approval ------------------------------------------------------


def _report(path: Path, passed: dict[str, bool], candidate_version: str, champion_version: str) -> dict[str, Any]:
    """A report document with the baseline set's outcomes and a one-item test set."""

    def outcome(ok: bool, item: str) -> dict[str, Any]:
        return {"id": item, "findings": [] if ok else [{"problem_type": "wrong_intent", "severity": "medium"}]}

    test = {"size": 1, "task_success": {"rate": 1.0}, "problem_rates": {"wrong_intent": {"rate": 0.0}}, "outcomes": [outcome(True, "t1")]}
    document = {
        "candidate": {"version": candidate_version, "name": candidate_version},
        "champion": {"version": champion_version, "name": champion_version},
        "targeted": ["wrong_intent"],
        "champion_metrics": {"test": {**test, "task_success": {"rate": 0.5}, "problem_rates": {"wrong_intent": {"rate": 0.5}}}},
        "candidate_metrics": {"test": test, "baseline": {"size": len(passed), "outcomes": [outcome(ok, i) for i, ok in passed.items()]}},
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return document


def _promote(store: Store, version: str) -> None:
    approvals.record_approval(store, version, "approved", "alice", "terminal")
    approvals.promote(store, store.settings, version, actor="alice")


def _tiers(store: Store) -> dict[str, str]:
    with store.engine.connect() as conn:
        return {f.id: str(f.tier) for f in get_failures(conn)}


def _age_moves(store: Store, days: int = 1) -> None:
    """Move every recorded tier move back in time, so that the samples entered their tiers a cycle ago."""
    with store.begin() as conn:
        for move_id, at in conn.execute(select(tier_moves.c.id, tier_moves.c.created_at)).fetchall():
            conn.execute(update(tier_moves).where(tier_moves.c.id == move_id).values(created_at=at - timedelta(days=days)))


def test_a_baseline_climbs_one_tier_per_promotion_only_when_fixed_on_the_eval_and_on_traffic(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    v2 = candidate(any_store, tmp_path, 2).id
    _promote(any_store, v2)
    add_samples(any_store, ["f-ok", "f-evalfail", "f-recurs", "f-late"])
    graduation.graduate(any_store, any_store.settings, v2, fixed={"f-ok": True, "f-evalfail": True, "f-recurs": True}, actor="alice")
    _age_moves(any_store)
    # v2's traffic repeats f-recurs's mistake: triage put a new failure into its cluster
    recurring = add_traffic(any_store, v2, 1, problems=["wrong_intent"], prefix="again-")[0]
    with any_store.begin() as conn:
        conn.execute(update(failures).where(failures.c.id == recurring).values(cluster_id="f-recurs"))

    v3 = candidate(any_store, tmp_path, 3).id
    report = _report(tmp_path / "report-3.json", {"f-ok": True, "f-evalfail": False, "f-recurs": True, "f-late": True}, v3, v2)
    proposals = baseline_review.propose(any_store, v3, report)
    # f-evalfail: v3 fails it; f-recurs: came back on traffic; f-late: still a problem sample
    assert [(p.failure_id, p.from_tier, p.to_tier) for p in proposals] == [("f-ok", "candidate_baseline", "secondary_baseline")]
    assert "1 baseline sample(s) up a tier (1 to secondary_baseline)" in baseline_review.summary(proposals)

    _promote(any_store, v3)
    graduation.graduate(any_store, any_store.settings, v3, fixed={"f-late": True, "f-ok": True}, actor="alice")
    # asked again after the switch (a promotion node re-run): f-late entered its tier with v3, not before
    again = baseline_review.propose(any_store, v3, _report(tmp_path / "r.json", {"f-ok": True, "f-late": True}, v3, v2))
    assert [p.failure_id for p in again] == ["f-ok"]
    assert baseline_review.confirm(any_store, v3, proposals, actor="alice") == ["f-ok"]
    assert baseline_review.confirm(any_store, v3, proposals, actor="alice") == []  # idempotent: one tier per cycle
    assert _tiers(any_store)["f-ok"] == "secondary_baseline" and _tiers(any_store)["f-late"] == "candidate_baseline"

    # a rollback of v3 undoes what its approval confirmed, as it undoes its graduation
    done = approvals.rollback(any_store, actor="ops", reason="incident")
    assert "f-ok" in done.reverted_samples and _tiers(any_store)["f-ok"] == "candidate_baseline"
    assert _tiers(any_store)["f-late"] == "problem"
    with any_store.engine.connect() as conn:
        counts = tier_counts(conn)
    assert counts["candidate_baseline"] == 3 and counts["secondary_baseline"] == 0 and counts["core_baseline"] == 0


def test_approving_with_the_agent_confirms_the_proposed_baselines_unless_declined(any_store: Store, tmp_path: Path) -> None:
    from flywheel.context import Context
    from flywheel.release.decisions import apply_decision, build_pending
    from flywheel.release.records import Decision

    registry.register_base(any_store, "tiny-base")
    v2 = candidate(any_store, tmp_path, 2).id
    _promote(any_store, v2)
    add_samples(any_store, ["f-a", "f-b"])
    graduation.graduate(any_store, any_store.settings, v2, fixed={"f-a": True, "f-b": True}, actor="alice")
    _age_moves(any_store)
    ctx = Context(settings=any_store.settings, _store=any_store)
    for seed, confirm in ((3, False), (4, True)):
        version = candidate(any_store, tmp_path, seed)
        document = _report(
            tmp_path / f"report-{seed}.json", {"f-a": True, "f-b": True}, version.id, registry.resolve(any_store, "champion").id
        )
        # the report on disk must match the hash recorded on the version
        path = Path(tmp_path / f"report-{seed}.json")
        path.write_text(json.dumps(document), encoding="utf-8")
        version = _with_report_hash(any_store, version.id, path)
        pending = build_pending(ctx, "run-x", version, registry.resolve(any_store, "champion").id)
        assert {p.failure_id for p in pending.baselines} == {"f-a", "f-b"}
        assert "2 baseline sample(s) up a tier" in pending.summary
        outcome = apply_decision(
            ctx, f"run-{seed}", version.id, Decision("approved", "alice", "ok", "terminal", version.eval_report_hash, confirm)
        )
        assert outcome.promoted and outcome.error is None
        assert outcome.confirmed == (2 if confirm else 0)
        expected = "secondary_baseline" if confirm else "candidate_baseline"
        assert _tiers(any_store) == {"f-a": expected, "f-b": expected}
        _age_moves(any_store)


def _with_report_hash(store: Store, version_id: str, path: Path):
    from flywheel.evals.report import report_hash_of

    return registry.attach_eval(store, version_id, report_path=str(path), report_hash=report_hash_of(path), gate_passed=True, metrics={})


# --- the labelling budget belongs to the champion ---------------------------------------------------------------


def test_the_labelling_budget_counts_labels_since_the_champion_took_over(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    add_samples(any_store, ["f-1", "f-2", "f-3"])
    add_label(any_store, "f-1", {"intent": "card_arrival"}, "alice")
    add_label(any_store, "f-2", {"intent": "card_arrival"}, "alice")
    settings = any_store.settings
    assert labels_spent(any_store, settings) == 2
    v2 = candidate(any_store, tmp_path, 2).id
    _promote(any_store, v2)
    assert labels_spent(any_store, settings) == 0  # a new champion: its failures get a budget of their own
    add_label(any_store, "f-3", {"intent": "card_arrival"}, "alice")
    assert labels_spent(any_store, settings) == 1
    project = settings.model_copy(update={"selection": settings.selection.model_copy(update={"budget_scope": "project"})})
    assert labels_spent(any_store, project) == 3


# --- the champions' history ---------------------------------------------------------------------------------------


def test_the_history_follows_the_champions_and_charts_them(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    base = registry.resolve(any_store, "champion").id
    v2 = candidate(any_store, tmp_path, 2).id
    _write(tmp_path / "report-2.json", v2, base, before=(0.4, 0.5), after=(0.6, 0.3))
    _promote(any_store, v2)
    v3 = candidate(any_store, tmp_path, 3).id
    _write(tmp_path / "report-3.json", v3, v2, before=(0.6, 0.3), after=(0.7, 0.2))
    _promote(any_store, v3)
    history = champion_history(any_store)
    assert [(p.version, p.task_success, p.problem_rates["wrong_intent"]) for p in history] == [
        (base, 0.4, 0.5),
        (v2, 0.6, 0.3),
        (v3, 0.7, 0.2),
    ]
    review = _write(tmp_path / "report-4.json", "v4", v3, before=(0.7, 0.2), after=(0.75, 0.1))
    points = with_candidate(history, review)
    assert [p.version for p in points] == [base, v2, v3, "v4"] and points[-1].candidate
    chart = history_chart(points)
    assert chart is not None and "<svg" in chart and "wrong_intent" in chart and "3 = v4 (candidate)" in chart
    assert history_chart(points[:1]) is None
    # the eval report draws it from its `history` block once two champions are in it
    from flywheel.evals.report import _history_chart

    drawn = _history_chart({**review, "history": [p.model_dump(mode="json") for p in history]})
    assert drawn is not None and "3 = v4 (candidate)" in drawn
    assert _history_chart({**review, "history": [history[0].model_dump(mode="json")]}) is None


def _write(path: Path, version: str, champion: str, before: tuple[float, float], after: tuple[float, float]) -> dict[str, Any]:
    def side(numbers: tuple[float, float]) -> dict[str, Any]:
        return {"size": 10, "task_success": {"rate": numbers[0]}, "problem_rates": {"wrong_intent": {"rate": numbers[1]}}}

    document = {
        "candidate": {"version": version},
        "champion": {"version": champion},
        "champion_metrics": {"test": side(before)},
        "candidate_metrics": {"test": side(after)},
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return document


def test_a_sample_that_never_moved_is_not_proposed(any_store: Store, tmp_path: Path) -> None:
    """Baselines loaded by hand (no tier move on record) are left for a person's explicit confirm."""
    registry.register_base(any_store, "tiny-base")
    add_samples(any_store, ["f-hand"], tier=SampleTier.CANDIDATE)
    v2 = candidate(any_store, tmp_path, 2).id
    report = _report(tmp_path / "report-2.json", {"f-hand": True}, v2, "v1")
    assert baseline_review.propose(any_store, v2, report) == []


# --- `flywheel run --until-stable` on a real project ------------------------------------------------------------


def test_run_until_stable_promotes_then_stops_when_nothing_is_left(
    project: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent_helpers import seed_project

    from flywheel.cli import main

    seed_project(project, tiny_model_dir)
    assert main(["-C", str(project), "run", "--max-cycles", "2"]) == 2  # --max-cycles goes with --until-stable
    assert "--max-cycles goes with --until-stable" in capsys.readouterr().err
    assert main(["-C", str(project), "run", "--until-stable", "--max-cycles", "3", "--yes", "--json"]) == 0
    (first,) = _cycles(capsys.readouterr().out, "stable: cycle 1 improved its targets by no more than loop.min_gain 1.0 pts")
    assert first["state"] == "promoted" and first["champion_before"] == "v1" and first["champion"] == "v2"
    assert first["graduated"] == 3 and first["tiers"]["candidate_baseline"] == 3 and first["tiers"]["problem"] == 0
    assert first["training_runs"] == 1 and first["wall_s"] > 0 and first["task_success"] is not None
    # the fixed test set holds no over_promise item: the targeted rate could not fall, so the loop is stable
    assert first["improvement"] == {"over_promise": 0.0}
    # run again: the cycle starts from v2, finds its samples graduated and nothing new, and stops there
    assert main(["-C", str(project), "run", "--until-stable", "--yes", "--json"]) == 0
    (second,) = _cycles(capsys.readouterr().out, "cycle 1 found nothing to train on")
    assert second["state"] == "nothing_to_train" and second["champion_before"] == "v2" and second["training_runs"] == 0


def _cycles(printed: str, stop_reason: str) -> list[dict[str, Any]]:
    result = json.loads(printed[printed.index("\n{") + 1 :] if not printed.startswith("{") else printed)
    assert result["stop_reason"].startswith(stop_reason), result["stop_reason"]
    return result["cycles"]


def test_a_sample_whose_mistake_came_back_on_the_canary_does_not_graduate(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    add_samples(any_store, ["f-ok", "f-back"])
    v2 = candidate(any_store, tmp_path, 2).id
    again = add_traffic(any_store, v2, 1, problems=["wrong_intent"], prefix="canary-")[0]
    with any_store.begin() as conn:
        conn.execute(update(failures).where(failures.c.id == again).values(cluster_id="f-back"))
    outcomes = baseline_review.fixed_on_traffic(any_store, v2, {"f-ok": True, "f-back": True})
    assert outcomes == {"f-ok": True, "f-back": False}
    # traffic the previous champion served says nothing about v2
    assert baseline_review.fixed_on_traffic(any_store, "v1", {"f-back": True}) == {"f-back": True}
