"""The registry, aliases, approvals, promotion, rejection and rollback, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from release_helpers import add_dataset, add_samples, candidate, make_adapter
from sqlalchemy import func, select

from flywheel.cli import main
from flywheel.errors import NotFoundError, PolicyViolation, UserInputError
from flywheel.records import SampleTier
from flywheel.release import approvals, registry
from flywheel.settings import load_settings
from flywheel.store import versions as version_store
from flywheel.store.db import Store, open_store
from flywheel.store.schema import alias_events, tier_moves
from flywheel.store.schema import approvals as approvals_table


def _run_threads(count: int, work) -> list:
    results: list = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _aliases(store: Store) -> dict[str, str]:
    routing = registry.current_routing(store)
    out = {"champion": routing.champion}
    with store.engine.connect() as conn:
        for name, (target, _share) in version_store.alias_map(conn).items():
            out[name] = target
    return out


# --- versions -----------------------------------------------------------------------------------------------


def test_concurrent_registration_allocates_distinct_gapless_ids(any_store: Store, tmp_path: Path) -> None:
    folders = [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(10)]
    versions = _run_threads(10, lambda i: registry.register_version(any_store, base_model="base", adapter_path=folders[i]))
    assert sorted(v.number for v in versions) == list(range(1, 11))
    # the same adapter registered by several threads at once is one version (and v11 follows v10, not v9)
    same = make_adapter(tmp_path / "same", seed=99)
    again = _run_threads(6, lambda _i: registry.register_version(any_store, base_model="base", adapter_path=same))
    assert {v.id for v in again} == {"v11"}
    assert [r.id for r in registry.list_versions(any_store)][:3] == ["v11", "v10", "v9"]


def test_register_records_lineage_and_checks_the_adapter_hash(any_store: Store, tmp_path: Path) -> None:
    base = registry.register_base(any_store, "tiny-base")
    assert base.id == "v1" and base.status == "champion" and registry.register_base(any_store, "tiny-base").id == "v1"
    folder = make_adapter(tmp_path / "a", seed=1)
    v2 = registry.register_version(any_store, base_model="tiny-base", adapter_path=folder, dataset_id="ds1", job_id="job1")
    assert (v2.parent, v2.dataset_id, v2.job_id, v2.status) == ("v1", "ds1", "job1", "candidate")
    assert v2.adapter_sha256 == registry.adapter_weights_sha256(folder)
    with pytest.raises(UserInputError, match="does not match"):
        registry.register_version(any_store, base_model="tiny-base", adapter_path=make_adapter(tmp_path / "b", 2), adapter_sha256="0" * 64)
    assert registry.verify_adapter(registry.resolve(any_store, "v2")) == folder
    (folder / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(UserInputError, match="does not match the recorded"):
        registry.verify_adapter(registry.resolve(any_store, "v2"))
    assert registry.verify_adapter(base) is None
    # a whole (e.g. merged) model folder with no adapter is a version too, once
    merged = registry.register_version(any_store, base_model="/models/merged", notes="merged v2")
    assert (merged.id, merged.parent, merged.adapter_path) == ("v3", "v1", None)
    assert registry.register_version(any_store, base_model="/models/merged").id == "v3"


def test_first_champion_registers_the_base_only_while_there_is_none(any_store: Store) -> None:
    v1, registered = registry.first_champion(any_store, "tiny-base", actor="test")
    assert registered and (v1.id, v1.status, v1.adapter_path) == ("v1", "champion", None)
    again, registered = registry.first_champion(any_store, "tiny-base", actor="test")
    assert not registered and again.id == "v1"
    # with a champion, another base is not registered as a stray candidate
    other, registered = registry.first_champion(any_store, "another-base", actor="test")
    assert not registered and other.id == "v1" and [r.id for r in registry.list_versions(any_store)] == ["v1"]


def test_a_succeeded_job_registers_one_candidate_however_often_asked(any_store: Store, project: Path, tmp_path: Path) -> None:
    from flywheel.context import Context
    from flywheel.errors import ToolInputError
    from flywheel.records import utcnow
    from flywheel.tools.jobs import register_candidate
    from flywheel.trainer.jobs import JobRecord, JobStatus, insert_job

    registry.register_base(any_store, "tiny-base")
    adapter = make_adapter(tmp_path / "adapter", seed=3)
    job = JobRecord(
        id="sft-1",
        kind="train_sft",
        status=JobStatus.SUCCEEDED,
        spec={"method": "sft", "base_model": "tiny-base", "dataset_id": "ds1"},
        work_dir=str(tmp_path),
        log_path=str(tmp_path / "train.log"),
        attempts=1,
        created_at=utcnow(),
        result={"adapter_path": str(adapter), "adapter_sha256": registry.adapter_weights_sha256(adapter)},
    )
    assert insert_job(any_store, job)
    ctx = Context(settings=load_settings(project), _store=any_store)  # the worker, the CLI and the agent all ask
    first, second = register_candidate(ctx, "sft-1"), register_candidate(ctx, "sft-1")
    assert first == second and (first.version, first.parent, first.job_id, first.dataset_id) == ("v2", "v1", "sft-1", "ds1")
    assert [r.id for r in registry.list_versions(any_store)] == ["v2", "v1"]
    # a job that has not succeeded has no adapter to register
    assert insert_job(any_store, job.model_copy(update={"id": "sft-2", "status": JobStatus.RUNNING, "result": None}))
    with pytest.raises(ToolInputError, match="not succeeded"):
        register_candidate(ctx, "sft-2")


def test_resolve_by_id_and_alias(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    assert registry.resolve(any_store, "champion").id == "v1"
    assert registry.resolve(any_store, "v2").adapter_path is not None
    with pytest.raises(NotFoundError, match="no version is canary"):
        registry.resolve(any_store, "canary")
    with pytest.raises(NotFoundError, match="no model version 'v7'"):
        registry.resolve(any_store, "v7")


def test_alias_switch_with_the_same_key_is_a_no_op(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    first = registry.switch_alias(any_store, "canary", "v2", actor="t", reason="try", effect_key="node-7", share=0.2)
    registry.switch_alias(any_store, "canary", None, actor="t", reason="other", effect_key="node-8")
    again = registry.switch_alias(any_store, "canary", "v2", actor="t", reason="try", effect_key="node-7", share=0.2)
    assert not first.replayed and again.replayed and again.to_version == "v2"
    assert registry.current_routing(any_store).canary is None  # the replay did not re-apply the switch
    # concurrent replays of one key: exactly one event
    _run_threads(5, lambda _i: registry.switch_alias(any_store, "canary", "v2", actor="t", reason="x", effect_key="node-9", share=0.1))
    with any_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(alias_events).where(alias_events.c.effect_key == "node-9")).scalar_one() == 1


# --- approvals and promotion --------------------------------------------------------------------------------


def test_promotion_needs_an_approval_bound_to_the_current_report(any_store: Store, tmp_path: Path) -> None:
    settings = any_store.settings
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1, report_hash="a" * 64)
    with pytest.raises(PolicyViolation, match="no approval recorded for v2"):
        approvals.promote(any_store, settings, "v2", actor="alice")
    approval = approvals.record_approval(any_store, "v2", "approved", "alice", "terminal", reason="looks good")
    assert approval.report_hash == "a" * 64
    # the report changes after the approval: the approval no longer counts
    registry.attach_eval(any_store, "v2", report_path="r2.json", report_hash="b" * 64, gate_passed=True)
    with pytest.raises(PolicyViolation, match="was for report aaaaaaaaaaaa.*now bbbbbbbbbbbb"):
        approvals.promote(any_store, settings, "v2", actor="alice")
    assert registry.current_routing(any_store).champion == "v1"
    approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    done = approvals.promote(any_store, settings, "v2", actor="alice", effect_key="run1:promote")
    assert (done.version, done.previous, done.replayed) == ("v2", "v1", False)
    assert _aliases(any_store) == {"champion": "v2", "previous": "v1"}
    assert registry.resolve(any_store, "v1").status == "previous"
    # the same effect key again, and promoting the champion again: nothing changes
    assert approvals.promote(any_store, settings, "v2", actor="alice", effect_key="run1:promote").replayed
    assert approvals.promote(any_store, settings, "v2", actor="alice").replayed
    with any_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(alias_events).where(alias_events.c.alias == "champion")).scalar_one() == 2


def test_approval_rules(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    with pytest.raises(PolicyViolation, match="v1 has no eval report"):
        approvals.record_approval(any_store, "v1", "approved", "alice", "terminal")
    candidate(any_store, tmp_path, 1)
    candidate(any_store, tmp_path, 2, gate=False)
    with pytest.raises(PolicyViolation, match="cannot override the gate"):
        approvals.record_approval(any_store, "v3", "approved", "alice", "terminal")
    with pytest.raises(PolicyViolation, match="approvals.slack_approvers"):
        approvals.record_approval(any_store, "v2", "approved", "U123", "slack")
    with pytest.raises(PolicyViolation, match="api approvals are off"):
        approvals.record_approval(any_store, "v2", "approved", "alice", "api")
    first = approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    assert approvals.record_approval(any_store, "v2", "approved", "bob", "terminal").id == first.id  # idempotent
    with pytest.raises(PolicyViolation, match="already decided: approved by alice"):
        approvals.record_approval(any_store, "v2", "rejected", "bob", "terminal", reason="no")
    # two people deciding differently at the same moment: exactly one decision is stored
    candidate(any_store, tmp_path, 3)

    def decide(i: int) -> str:
        try:
            return approvals.record_approval(any_store, "v4", "approved" if i % 2 else "rejected", f"p{i}", "terminal", reason="r").decision
        except PolicyViolation:
            return "refused"

    outcomes = _run_threads(6, decide)
    assert len({o for o in outcomes if o != "refused"}) == 1
    with any_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(approvals_table).where(approvals_table.c.version == "v4")).scalar_one() == 1


def test_approver_list_is_enforced_at_approval_and_at_promotion(project: Path, tmp_path: Path) -> None:
    settings = load_settings(project, approvals={"approvers": ["alice"], "slack_approvers": ["U1"]})
    store = open_store(settings)
    try:
        registry.register_base(store, "tiny-base")
        candidate(store, tmp_path, 1)
        with pytest.raises(PolicyViolation, match="'mallory' is not in approvals.approvers"):
            approvals.record_approval(store, "v2", "approved", "mallory", "terminal")
        approvals.record_approval(store, "v2", "approved", "U1", "slack")
        # the list changed after the approval: the approver must still be allowed when promoting
        narrowed = load_settings(project, approvals={"approvers": ["alice"], "slack_approvers": []})
        with pytest.raises(PolicyViolation, match="Slack user 'U1'"):
            approvals.promote(store, narrowed, "v2", actor="ops")
        assert approvals.promote(store, settings, "v2", actor="ops").version == "v2"
    finally:
        store.dispose()


def test_promotion_is_atomic(any_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    real = registry.set_alias

    def crash_on_previous(conn, alias, version, **kw):
        if alias == "previous":
            raise RuntimeError("crash between the two switches")
        return real(conn, alias, version, **kw)

    monkeypatch.setattr(registry, "set_alias", crash_on_previous)
    with pytest.raises(RuntimeError):
        approvals.promote(any_store, any_store.settings, "v2", actor="alice", effect_key="k1")
    assert _aliases(any_store) == {"champion": "v1"}
    assert registry.resolve(any_store, "v2").status == "candidate"
    monkeypatch.setattr(registry, "set_alias", real)
    # the re-run with the same key does the whole promotion (the crashed attempt left no trace)
    done = approvals.promote(any_store, any_store.settings, "v2", actor="alice", effect_key="k1")
    assert not done.replayed and _aliases(any_store) == {"champion": "v2", "previous": "v1"}


def test_gate_failure_and_rejected_versions_never_promote(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1)
    approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    registry.attach_eval(any_store, "v2", report_path="r.json", report_hash="c" * 64, gate_passed=False)
    with pytest.raises(PolicyViolation, match="did not pass the promotion gate"):
        approvals.promote(any_store, any_store.settings, "v2", actor="alice")
    candidate(any_store, tmp_path, 2)
    approvals.reject(any_store, "v3", "bob", reason="tone is off")
    with pytest.raises(PolicyViolation, match="v3 is rejected"):
        approvals.promote(any_store, any_store.settings, "v3", actor="alice")


def test_rejection_returns_the_cycle_samples_to_the_pool(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    add_samples(any_store, ["f-1", "f-2"])
    add_samples(any_store, ["f-core"], tier=SampleTier.CORE)
    add_dataset(any_store, "ds-1", ["f-1", "f-2", "f-core"])
    candidate(any_store, tmp_path, 1, dataset_id="ds-1")
    registry.switch_alias(any_store, "canary", "v2", actor="t", reason="canary", effect_key="c1", share=0.1)
    result = approvals.reject(any_store, "v2", "bob", reason="hallucinates fees")
    assert result.approval.decision == "rejected" and result.approval.reason == "hallucinates fees"
    assert sorted(result.returned_to_pool) == ["f-1", "f-2"]
    assert registry.resolve(any_store, "v2").status == "rejected"
    assert registry.current_routing(any_store).canary is None  # a rejected canary stops serving
    with any_store.engine.connect() as conn:
        moves = conn.execute(select(tier_moves).where(tier_moves.c.version == "v2")).fetchall()
    assert {(m.failure_id, m.from_tier, m.to_tier) for m in moves} == {("f-1", "problem", "problem"), ("f-2", "problem", "problem")}
    # rejecting again is the same decision: no new rows
    approvals.reject(any_store, "v2", "bob", reason="hallucinates fees")
    with any_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tier_moves)).scalar_one() == 2
    # without a dataset manifest the rejection still records, and says why no samples moved
    candidate(any_store, tmp_path, 2)
    assert approvals.reject(any_store, "v3", "bob", reason="no").pool_note == "the version records no dataset"
    # a rejection recorded through record_approval (Slack, web) takes the same effect
    candidate(any_store, tmp_path, 3)
    approvals.record_approval(any_store, "v4", "rejected", "bob", "terminal", reason="from chat")
    assert registry.resolve(any_store, "v4").status == "rejected"
    with pytest.raises(UserInputError, match="v1 is the champion; use `flywheel rollback`"):
        approvals.reject(any_store, "v1", "bob", reason="no")


def test_rollback_returns_to_previous_once(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    with pytest.raises(UserInputError, match="no previous version to roll back to \\(champion is v1\\)"):
        approvals.rollback(any_store, actor="ops", reason="x")
    candidate(any_store, tmp_path, 1)
    approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    approvals.promote(any_store, any_store.settings, "v2", actor="alice")
    done = approvals.rollback(any_store, actor="ops", reason="complaints spiked", effect_key="inc-1")
    assert (done.rolled_back, done.champion) == ("v2", "v1")
    assert _aliases(any_store) == {"champion": "v1"}
    assert [registry.resolve(any_store, v).status for v in ("v1", "v2")] == ["champion", "rolled_back"]
    assert approvals.rollback(any_store, actor="ops", effect_key="inc-1").replayed
    with pytest.raises(PolicyViolation, match="v2 is rolled_back"):
        approvals.promote(any_store, any_store.settings, "v2", actor="alice")
    history = registry.alias_history(any_store)
    assert history[1].reason == "complaints spiked" and history[1].to_version == "v1"


def test_list_versions_shows_aliases_lineage_and_metrics(any_store: Store, tmp_path: Path) -> None:
    registry.register_base(any_store, "tiny-base")
    candidate(any_store, tmp_path, 1, dataset_id="ds9")
    approvals.record_approval(any_store, "v2", "approved", "alice", "terminal")
    rows = {r.id: r for r in registry.list_versions(any_store)}
    assert rows["v1"].aliases == ["champion"] and rows["v1"].task_success is None
    v2 = rows["v2"]
    assert (v2.parent, v2.dataset_id, v2.gate_passed, v2.approval) == ("v1", "ds9", True, "approved by alice")
    assert v2.task_success == 0.8 and v2.targeted_problem_rates == {"over_promise": 0.05}


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_release_commands_and_exit_codes(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "flywheel.toml").write_text('[approvals]\napprovers = ["alice"]\n')
    store = open_store(load_settings(project))
    try:
        registry.register_base(store, "tiny-base")
        candidate(store, tmp_path, 1)
        candidate(store, tmp_path, 2)
    finally:
        store.dispose()
    cli = ["-C", str(project)]
    capsys.readouterr()
    assert main([*cli, "models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == ["v3", "v2", "v1"] and listed[2]["aliases"] == ["champion"]
    assert main([*cli, "models"]) == 0 and "v3" in capsys.readouterr().out
    assert main([*cli, "promote", "v2", "--by", "alice"]) == 5
    assert "no approval recorded for v2" in capsys.readouterr().err
    assert main([*cli, "approve", "v2", "--by", "mallory"]) == 5
    assert main([*cli, "approve", "v9", "--by", "alice"]) == 3
    assert main([*cli, "approve", "v2", "--by", "alice", "--reason", "fixes refunds"]) == 0
    out = capsys.readouterr().out
    assert "approved v2" in out and "promoted v2 to champion; previous is v1" in out
    assert main([*cli, "reject", "v3", "--by", "alice"]) == 2  # --reason is required
    assert main([*cli, "reject", "v3", "--by", "alice", "--reason", "worse tone"]) == 0
    assert main([*cli, "approve", "v3", "--by", "alice"]) == 5
    assert "already decided" in capsys.readouterr().err
    assert main([*cli, "rollback", "--reason", "pager", "--by", "alice"]) == 0
    assert "champion is v1" in capsys.readouterr().out
    assert main([*cli, "rollback"]) == 2
    assert main([*cli, "models", "--json"]) == 0
    statuses = {r["id"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert statuses == {"v1": "champion", "v2": "rolled_back", "v3": "rejected"}
