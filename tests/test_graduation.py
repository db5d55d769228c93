"""Sample graduation after a promotion, baseline confirmation, and what a rollback undoes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from release_helpers import add_samples, candidate
from sqlalchemy import select

from flywheel.cli import main
from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import SampleTier
from flywheel.release import approvals, graduation, registry
from flywheel.settings import load_settings
from flywheel.store.db import Store, open_store
from flywheel.store.failures import get_failures
from flywheel.store.schema import model_versions, tier_moves


def _promoted(store: Store, root: Path) -> str:
    registry.register_base(store, "tiny-base")
    version = candidate(store, root, 1).id
    approvals.record_approval(store, version, "approved", "alice", "terminal")
    approvals.promote(store, store.settings, version, actor="alice")
    return version


def _tiers(store: Store) -> dict[str, tuple[str, float]]:
    with store.engine.connect() as conn:
        return {f.id: (str(f.tier), f.weight) for f in get_failures(conn)}


def _moves(store: Store) -> list[tuple[str, str, str, str | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(tier_moves).order_by(tier_moves.c.id)).fetchall()
    return [(r.failure_id, r.from_tier, r.to_tier, r.version) for r in rows]


def test_graduation_moves_samples_by_outcome_with_records(any_store: Store, tmp_path: Path) -> None:
    version = _promoted(any_store, tmp_path)
    add_samples(any_store, ["f-fixed", "f-still"])
    add_samples(any_store, ["f-low"], weight=0.15)
    add_samples(any_store, ["f-sec"], tier=SampleTier.SECONDARY)
    add_samples(any_store, ["f-core"], tier=SampleTier.CORE)
    fixed = {"f-fixed": True, "f-still": False, "f-low": False, "f-sec": False, "f-core": True, "f-ghost": True}
    result = graduation.graduate(any_store, any_store.settings, version, fixed=fixed, actor="alice")
    assert result.graduated == ["f-fixed"]
    assert result.down_weighted == {"f-still": 0.5, "f-low": 0.1}  # x0.5, floored at graduation.min_weight
    assert result.regressed == ["f-sec"] and result.unchanged == ["f-core"]
    assert result.skipped == {"f-ghost": "no such failure"}
    assert _tiers(any_store) == {
        "f-fixed": ("candidate_baseline", 1.0),
        "f-still": ("problem", 0.5),
        "f-low": ("problem", 0.1),
        "f-sec": ("problem", 1.0),
        "f-core": ("core_baseline", 1.0),
    }
    moves = _moves(any_store)
    assert ("f-fixed", "problem", "candidate_baseline", version) in moves
    assert ("f-sec", "secondary_baseline", "problem", version) in moves
    assert len(moves) == 4
    # graduating the same version again moves nothing (a re-run after a crash)
    again = graduation.graduate(any_store, any_store.settings, version, fixed=fixed, actor="alice")
    assert again.graduated == [] and again.down_weighted == {} and len(_moves(any_store)) == 4


def test_graduation_with_a_still_failing_function_and_its_checks(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    add_samples(any_store, ["f-a", "f-b"])
    with pytest.raises(UserInputError, match="v2 is not the champion \\(v1\\)"):
        graduation.graduate(any_store, any_store.settings, "v2", fixed={"f-a": True}, actor="alice")
    with pytest.raises(UserInputError, match="exactly one"):
        graduation.graduate(any_store, any_store.settings, "v1", actor="alice")
    with pytest.raises(UserInputError, match="outcome of f-a: expected true or false"):
        graduation.graduate(any_store, any_store.settings, "v1", fixed={"f-a": "yes"}, actor="alice")  # type: ignore[dict-item]
    seen = []

    def still_failing(failure) -> bool:
        seen.append(failure.id)
        return failure.id == "f-b"

    result = graduation.graduate(any_store, any_store.settings, "v1", still_failing=still_failing, actor="alice")
    assert sorted(seen) == ["f-a", "f-b"] and result.graduated == ["f-a"] and list(result.down_weighted) == ["f-b"]


def test_people_confirm_baselines_step_by_step(any_store: Store, tmp_path: Path) -> None:
    version = _promoted(any_store, tmp_path)
    add_samples(any_store, ["f-1", "f-2", "f-3"])
    graduation.graduate(any_store, any_store.settings, version, fixed={"f-1": True, "f-2": True, "f-3": False}, actor="alice")
    with pytest.raises(UserInputError, match="f-3 is a problem sample"):
        graduation.confirm_baseline(any_store, ["f-1", "f-3"], actor="bob")
    with pytest.raises(NotFoundError, match="no failure with id 'f-9'"):
        graduation.confirm_baseline(any_store, ["f-1", "f-9"], actor="bob")
    assert _tiers(any_store)["f-1"][0] == "candidate_baseline"  # the refused calls moved nothing
    first = graduation.confirm_baseline(any_store, ["f-1", "f-2"], actor="bob", reason="checked by hand")
    assert [(m.failure_id, m.to_tier) for m in first] == [("f-1", "secondary_baseline"), ("f-2", "secondary_baseline")]
    second = graduation.confirm_baseline(any_store, ["f-1"], actor="carol")
    assert [(m.from_tier, m.to_tier) for m in second] == [("secondary_baseline", "core_baseline")]
    assert graduation.confirm_baseline(any_store, ["f-1"], actor="carol") == []  # core is the top
    assert _tiers(any_store)["f-1"][0] == "core_baseline" and _tiers(any_store)["f-2"][0] == "secondary_baseline"


def test_rollback_undoes_the_graduation_of_the_rolled_back_version(any_store: Store, tmp_path: Path) -> None:
    version = _promoted(any_store, tmp_path)
    add_samples(any_store, ["f-1", "f-2"])
    add_samples(any_store, ["f-sec"], tier=SampleTier.SECONDARY)
    graduation.graduate(any_store, any_store.settings, version, fixed={"f-1": True, "f-2": False, "f-sec": False}, actor="alice")
    done = approvals.rollback(any_store, actor="ops", reason="incident")
    assert sorted(done.reverted_samples) == ["f-1", "f-sec"]
    tiers = _tiers(any_store)
    # tiers return; the down-weight stays: f-2 did fail with that version
    assert tiers == {"f-1": ("problem", 1.0), "f-2": ("problem", 0.5), "f-sec": ("secondary_baseline", 1.0)}


def test_outcomes_from_an_eval_report() -> None:
    report = {
        "candidate_metrics": {
            "test": {"outcomes": [{"id": "t1", "findings": []}]},
            "problem": {"outcomes": [{"id": "f-1", "findings": []}, {"id": "f-2", "findings": [{"problem_type": "x"}]}]},
            "baseline": {"outcomes": [{"id": "f-3", "findings": [], "error": "no answer generated"}]},
        }
    }
    assert graduation.outcomes_from_report(report) == {"f-1": True, "f-2": False, "f-3": False}
    with pytest.raises(UserInputError, match="not an eval report"):
        graduation.outcomes_from_report({"something": 1})


def test_cli_graduate_and_baseline_confirm(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(load_settings(project))
    try:
        version = _promoted(store, tmp_path)
        add_samples(store, ["f-1", "f-2"])
        # the version's eval report on disk, with per-item outcomes, recorded under its real hash
        report_path = tmp_path / "report.json"
        report_path.write_text(
            json.dumps(
                {
                    "candidate_metrics": {
                        "problem": {
                            "outcomes": [{"id": "f-1", "findings": []}, {"id": "f-2", "findings": [{"problem_type": "over_promise"}]}]
                        }
                    }
                }
            )
        )
        digest = hashlib.sha256(report_path.read_bytes()).hexdigest()
        with store.begin() as conn:
            conn.execute(
                model_versions.update()
                .where(model_versions.c.id == version)
                .values(eval_report_path=str(report_path), eval_report_hash=digest)
            )
    finally:
        store.dispose()
    cli = ["-C", str(project)]
    capsys.readouterr()
    assert main([*cli, "graduate", "v1"]) == 2  # not the champion
    assert main([*cli, "graduate", "champion", "--json", "--by", "alice"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["graduated"] == ["f-1"] and result["down_weighted"] == {"f-2": 0.5}
    assert main([*cli, "baseline", "confirm", "f-1", "--by", "bob"]) == 0
    assert "f-1: candidate_baseline -> secondary_baseline" in capsys.readouterr().out
    assert main([*cli, "baseline", "confirm", "f-2"]) == 2
    assert main([*cli, "baseline", "confirm", "nope"]) == 3
    # a results file instead of the report; a tampered report is refused
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"f-2": True}))
    capsys.readouterr()
    assert main([*cli, "graduate", version, "--results", str(results)]) == 0
    assert "skipped f-2: already graduated with v2" in capsys.readouterr().out
    assert main([*cli, "graduate", version, "--results", str(tmp_path / "missing.json")]) == 2
    report_path.write_text("{}")
    assert main([*cli, "graduate", version]) == 5
