"""Tools: launch a LoRA SFT or DPO training job, read (and wait on) its status, resume it, and register
its adapter as a candidate version.

Launching goes through flywheel.trainer.launcher, as `flywheel train` does: the job id is derived from
the spec (method, base model, dataset content, hyper-parameters), so launching the same thing twice
starts one process. `register_candidate` is the one place a finished job becomes a registry version (the
training worker calls it as the job ends, `flywheel train` and the agent call it again): it hands the
job's recorded adapter to `registry.register_version`, which is idempotent by the adapter's weights hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from flywheel.errors import NotFoundError, ToolInputError
from flywheel.records import Record
from flywheel.release import registry
from flywheel.tools.base import ToolContext, ToolSpec, report_progress
from flywheel.trainer import launcher
from flywheel.trainer.jobs import JobRecord, JobStatus

MAX_WAIT_S = 3600


class JobInfo(Record):
    id: str
    kind: str
    status: str
    attempts: int
    dataset_id: str | None = None
    progress: dict[str, Any] | None = None
    adapter_path: str | None = None
    error: str | None = None


class CandidateInfo(Record):
    version: str
    status: str
    job_id: str | None
    dataset_id: str | None
    parent: str | None
    gate_passed: bool | None = None


def _info(record: JobRecord) -> JobInfo:
    progress = {k: v for k, v in (record.progress or {}).items() if k in ("step", "total", "loss", "eval_loss", "epoch")}
    return JobInfo(
        id=record.id,
        kind=record.kind,
        status=str(record.status),
        attempts=record.attempts,
        dataset_id=record.spec.get("dataset_id") or None,
        progress=progress or None,
        adapter_path=(record.result or {}).get("adapter_path"),
        error=(record.error or "")[:500] or None,
    )


def _job_facts(info: JobInfo) -> dict[str, Any]:
    return {"job_id": info.id, "job_status": info.status}


def _base_model(ctx: Any) -> str | None:
    """train.base_model, else the champion's base model (what the adapters are trained on top of)."""
    if ctx.settings.train.base_model:
        return None  # build_spec reads the setting
    try:
        return registry.resolve(ctx.store, "champion").base_model
    except NotFoundError:
        return None


def champion_adapter(ctx: Any) -> tuple[str, str] | None:
    """The champion's adapter (folder, sha256) when it is one over the base model this training uses:
    what train.start_from "champion" continues from."""
    try:
        champion = registry.resolve(ctx.store, "champion")
    except NotFoundError:
        return None
    if not champion.adapter_path or not champion.adapter_sha256:
        return None
    base = ctx.settings.train.base_model or champion.base_model
    if Path(base).resolve() != Path(champion.base_model).resolve():
        return None  # trained over another base: its weights do not fit this one
    return champion.adapter_path, champion.adapter_sha256


def launch_training(ctx: ToolContext, dataset_id: str, method: Literal["sft", "dpo", "kto"] | None = None) -> JobInfo:
    """Start training a LoRA adapter on a dataset snapshot. The same dataset and settings run once: asking again returns the existing job.

    Args:
        dataset_id: the snapshot id from build_dataset.
        method: "sft", "dpo" or "kto" (default: the snapshot's kind; train.method kto wins over it).
    """
    from flywheel.trainer.recipes import build_spec

    folder = launcher.resolve_dataset(ctx, dataset_id)
    spec = build_spec(ctx.settings.train, folder, method=method, base_model=_base_model(ctx), init_adapter=champion_adapter(ctx))
    record = launcher.launch(ctx, spec)
    report_progress(ctx, f"training job {record.id} {record.status}", job_id=record.id)
    return _info(record)


def training_status(ctx: ToolContext, job_id: str, wait_seconds: Annotated[int, Field(ge=0, le=MAX_WAIT_S)] = 0) -> JobInfo:
    """A training job's status and progress; with wait_seconds, wait up to that long for it to end first.

    Args:
        job_id: the job id from launch_training.
        wait_seconds: wait at most this long for the job to finish (0: answer at once).
    """
    if wait_seconds <= 0:
        return _info(launcher.status(ctx, job_id))

    def show(record: JobRecord) -> None:
        p = record.progress or {}
        step = f" step {p.get('step', 0)}/{p['total']}" if p.get("total") else ""
        loss = f" loss {p['loss']:.4f}" if p.get("loss") is not None else ""
        report_progress(ctx, f"job {record.id} {record.status}{step}{loss}", job_id=record.id, step=p.get("step"), total=p.get("total"))

    record = launcher.wait(ctx, job_id, on_progress=show, timeout_s=float(wait_seconds), raise_on_failure=False)
    return _info(record)


def resume_training(ctx: ToolContext, job_id: str) -> JobInfo:
    """Start a failed or killed training job again from its last checkpoint. A running or finished job is returned as it is.

    Args:
        job_id: the job id.
    """
    return _info(launcher.resume(ctx, job_id))


def register_candidate(ctx: ToolContext, job_id: str) -> CandidateInfo:
    """Register the adapter a finished training job wrote as a new candidate model version (registering the same adapter again returns its version).

    Args:
        job_id: a succeeded training job.
    """
    record = launcher.status(ctx, job_id)
    if record.status != JobStatus.SUCCEEDED or not record.result:
        raise ToolInputError(f"job {job_id} is {record.status}, not succeeded: there is no adapter to register yet")
    result, spec = record.result, record.spec
    adapter_path, notes = result["adapter_path"], f"trained by job {record.id}"
    if result.get("adapter_uri"):  # a cluster job's adapter in [ray] storage: download it, check its sha256
        from flywheel.trainer.storage import fetch_adapter

        fetched = ctx.settings.artifacts_path / "adapters" / record.id
        adapter_path = str(fetch_adapter(result["adapter_uri"], fetched, result["adapter_sha256"]))
        notes += f", downloaded from {result['adapter_uri']}"
    version = registry.register_version(
        ctx.store,
        base_model=spec["base_model"],
        adapter_path=adapter_path,
        adapter_sha256=result.get("adapter_sha256"),
        dataset_id=spec.get("dataset_id") or None,
        job_id=record.id,
        notes=notes,
    )
    return CandidateInfo(
        version=version.id,
        status=str(version.status),
        job_id=version.job_id,
        dataset_id=version.dataset_id,
        parent=version.parent,
        gate_passed=version.gate_passed,
    )


SPECS = [
    ToolSpec(launch_training, mutates=True, facts=_job_facts),
    ToolSpec(training_status, facts=_job_facts),
    ToolSpec(resume_training, mutates=True, facts=_job_facts),
    ToolSpec(register_candidate, mutates=True, facts=lambda r: {"candidate": r.version, "candidate_status": r.status}),
]
