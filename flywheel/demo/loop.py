"""One improvement cycle as a straight sequence of flywheel's stages.

This is the cycle the supervisor graph runs step by step; here it is written out in order so the demo
and bench/loop.py can run it with simulated people (a labeller and canary users) plugged in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.approvals import promote, record_approval
from flywheel.canary import observe_canary, start_canary
from flywheel.context import Context
from flywheel.data.correct import correct_failures
from flywheel.data.labelling import label_failures
from flywheel.data.triage import triage
from flywheel.evals.judge import judge_failures
from flywheel.evals.report import ModelRef
from flywheel.evals.runner import record_on_version, run_eval
from flywheel.graduation import graduate, outcomes_from_report
from flywheel.registry import register_version, resolve
from flywheel.trainer.dataset import build_snapshot
from flywheel.trainer.launcher import launch, wait
from flywheel.trainer.models import LocalModel
from flywheel.trainer.recipes import build_spec
from flywheel.trainer.replay import stable_production_rows

Say = Callable[[str], None]
APPROVER = "demo-operator"


def run_cycle(ctx: Context, hooks: dict[str, Any], options: Any, say: Say, *, stop_after_eval: bool = False) -> dict[str, Any]:
    timings: dict[str, float] = {}
    steps: dict[str, Any] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 2)
        clock = now

    champion = resolve(ctx.store, "champion")
    captured = triage(ctx)
    steps["triage"] = captured.model_dump(include={"captured", "clusters", "duplicates", "taken", "skipped", "by_rule"})
    say(f"triage: {captured.captured} failures captured ({_fmt(captured.by_rule)}), {captured.clusters} clusters, {captured.taken} taken for judging")
    lap("triage")

    production = LocalModel(champion.base_model, champion.adapter_path)
    labelled = label_failures(ctx, hooks["labeller"], strategy=getattr(options, "strategy", None), model=production)
    del production
    steps["labelling"] = labelled.model_dump()
    say(f"labelling: {labelled.labelled} failures labelled by {hooks['labeller'].name} with {labelled.strategy} "
        f"({len(labelled.rounds)} rounds, stopped on {labelled.stop_reason}; budget {labelled.budget})")
    lap("labelling")

    judged = judge_failures(ctx)
    steps["judge"] = judged.model_dump(include={"total", "failures", "not_failure", "unjudged", "by_problem_type", "by_severity"})
    say(f"judge: {judged.failures} failures ({_fmt(judged.by_problem_type)}), {judged.not_failure} not failures, {judged.unjudged} unjudged")
    lap("judge")

    corrected = correct_failures(ctx)
    steps["correct"] = corrected.model_dump(include={"corrector", "verified", "corrected", "uncorrectable"})
    say(f"correct: {corrected.verified} verified corrections, {corrected.corrected} failed verification, {corrected.uncorrectable} uncorrectable")
    lap("correct")

    replay = stable_production_rows(ctx, limit=max(200, 3 * corrected.verified), version=champion.id)
    snapshot = build_snapshot(ctx, ctx.settings.train.method, extra_rows=replay)
    composition = snapshot.manifest.get("composition", {})
    steps["dataset"] = {"id": snapshot.id, "composition": composition, "warnings": snapshot.manifest.get("warnings", [])}
    say(f"dataset: snapshot {snapshot.id} ({_fmt(composition.get('tier', composition.get('by_tier', {})))})")
    lap("dataset")

    spec = build_spec(ctx.settings.train, snapshot.path, base_model=champion.base_model)
    job = launch(ctx, spec)
    say(f"train: job {job.id} ({spec.method}, LoRA r={spec.hyper.lora_r})")
    done = wait(ctx, job.id, on_progress=_progress(say), poll_s=2.0)
    result = done.result or {}
    candidate = register_version(
        ctx.store,
        base_model=champion.base_model,
        adapter_path=result["adapter_path"],
        adapter_sha256=result["adapter_sha256"],
        dataset_id=snapshot.id,
        job_id=job.id,
        parent=champion.id,
    )
    steps["train"] = {"job": job.id, "version": candidate.id, "train_loss": result.get("train_loss"), "best_eval_loss": result.get("best_eval_loss")}
    say(f"train: {candidate.id} registered (adapter sha256 {candidate.adapter_sha256[:12]}...)")
    lap("train")

    report = run_eval(ctx, _ref(candidate), _ref(champion), progress=say)
    record_on_version(ctx.store, report)
    out: dict[str, Any] = {"champion_before": champion.id, "candidate": candidate.id, "report_json": str(report.path_json), "report_html": str(report.path_html)}
    say(f"eval: gate {'passed' if report.gate.passed else 'FAILED'}; report {report.path_html}")
    for reason in report.gate.reasons[:8]:
        say(f"  - {reason}")
    lap("eval")
    if not report.gate.passed:
        return {**out, "state": "gate_failed", "timings": timings, "steps": steps}
    if stop_after_eval:
        return {**out, "state": "evaluated", "timings": timings, "steps": steps}

    start_canary(ctx.store, candidate.id, actor="flywheel-demo")
    traffic = hooks["canary_traffic"](candidate.id, ctx.settings.canary.share, say)
    status = observe_canary(ctx.store, ctx.settings)
    steps["canary"] = {"traffic": traffic, "state": str(status.state), "reason": status.reason}
    say(f"canary: {status.state}{': ' + status.reason if status.reason else ''}")
    lap("canary")
    if str(status.state) == "rolled_back":
        return {**out, "state": "canary_rolled_back", "timings": timings, "steps": steps}

    decision = _ask(candidate.id, report, options, say)
    if decision is None:
        how = f"flywheel -C {Path(ctx.settings.project_dir)} approve {candidate.id}"
        say(f"approval: {candidate.id} waits for a person. Approve with `{how}` or reject with `flywheel -C {ctx.settings.project_dir} reject {candidate.id} --reason ...`")
        return {**out, "state": "waiting_approval", "how_to_approve": how, "timings": timings, "steps": steps}
    record_approval(ctx.store, candidate.id, decision, APPROVER, "terminal", reason="flywheel demo")
    if decision != "approved":
        return {**out, "state": "rejected", "timings": timings, "steps": steps}
    promote(ctx.store, ctx.settings, candidate.id, APPROVER)
    moved = graduate(ctx.store, ctx.settings, candidate.id, fixed=outcomes_from_report(_read(report.path_json)), actor="flywheel-demo")
    steps["graduation"] = moved.model_dump(exclude={"moves"}) if hasattr(moved, "model_dump") else str(moved)
    say(f"promoted {candidate.id} to champion; graduation: {steps['graduation']}")
    lap("release")
    return {**out, "state": "promoted", "promoted": candidate.id, "timings": timings, "steps": steps}


def _ref(version: Any) -> ModelRef:
    return ModelRef(name=version.id, version=version.id, base_model=version.base_model, adapter_path=version.adapter_path, adapter_sha256=version.adapter_sha256)


def _read(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def _ask(version: str, report: Any, options: Any, say: Say) -> str | None:
    if options.yes:
        say(f"approval: {version} approved from the terminal (--yes)")
        return "approved"
    if not options.interactive or not sys.stdin.isatty():
        return None
    answer = input(f"Promote {version}? Report: {report.path_html} [y/N] ").strip().lower()
    return "approved" if answer in ("y", "yes") else "rejected"


def _fmt(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)) or "none"


def _progress(say: Say) -> Callable[[Any], None]:
    last = {"step": -1}

    def show(record: Any) -> None:
        progress = record.progress or {}
        step = progress.get("step", 0)
        if step != last["step"] and (step - last["step"] >= 20 or record.ended):
            last["step"] = step
            loss = progress.get("loss")
            say(f"  train step {step}/{progress.get('total', '?')}" + (f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""))

    return show
