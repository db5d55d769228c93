"""Training jobs as Ray jobs (train.launcher "ray"), through Ray's Job Submission SDK.

The worker is the same `python -m flywheel.trainer.worker JOB_DIR` a local job runs; Ray starts it as the
job's entrypoint (after `[ray] entrypoint_prefix`, e.g. `accelerate launch --num_processes 4`) with the
resources of `[ray]` reserved for it. The worker writes status, progress and heartbeat to the store as it
does locally, so `flywheel jobs` and the agent's job tool read a Ray job like any other; this launcher
adds what only Ray knows: whether the entrypoint still runs, why it ended (Ray's message becomes the job's
error), and its output, copied into the job's log file.

The Ray submission id is derived from the job: the job id for the first attempt, `<job id>-r<attempt>`
for each resume (Ray refuses a second submission under one id). So a launch that finds its submission
already on the cluster (a crash between submitting and recording, a second flywheel process) attaches to
it instead of submitting again: one Ray job per attempt, whoever asks.

Failure modes, each one line and a failed, resumable job: an unreachable address, a submission the
cluster refuses, a runtime_env Ray cannot set up (reported as Ray's FAILED message), and a job Ray keeps
PENDING longer than `[ray] pending_timeout_s` (no node has the GPUs it asks for; stopped, then failed).

The job folder, the dataset snapshot and the base model are read at the same paths on the cluster (a
shared filesystem); `[ray] storage` carries the adapter and checkpoints back (flywheel.trainer.storage).
Ray is an optional extra, imported on first use.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.records import utcnow
from flywheel.settings_sections import RaySettings
from flywheel.trainer.jobs import WORKER_ENV, JobRecord, ProcessState

log = logging.getLogger("flywheel.ray")

INSTALL_HINT = 'Ray is not installed: pip install -e ".[ray]" (or pip install "flywheel[ray]")'
LOG_SYNC_EVERY_S = 5.0  # while a job runs, its output is copied at most this often
LOG_SETTLE_S = 20.0  # a job the worker has ended: how long to wait for Ray to see its entrypoint exit, for the last lines
_LOG_OFFSETS = ".ray-log-offsets"  # per submission: where its output starts in the job's log file


def import_ray_sdk() -> Any:
    """ray.job_submission, or one UserInputError line saying how to install Ray."""
    try:
        from ray import job_submission
    except ImportError as exc:
        raise UserInputError(INSTALL_HINT) from exc
    return job_submission


def submission_id(job: JobRecord) -> str:
    return job.id if job.attempts <= 1 else f"{job.id}-r{job.attempts}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # The SDK wraps the dashboard's answer, traceback included, in "Request failed with status code N: ..."
    lines = [line for line in text.splitlines() if line.strip()]
    tail = next((line for line in reversed(lines) if not line.startswith(" ")), "") if len(lines) > 1 else ""
    return f"{lines[0]} {tail}".strip() if tail and tail != lines[0] else (lines[0] if lines else type(exc).__name__)


class RayJobLauncher:
    """Submits, polls and stops workers as Ray jobs on `settings.address`."""

    name = "ray"

    def __init__(self, settings: RaySettings):
        if not settings.address:
            raise UserInputError('train.launcher is "ray" but ray.address is empty: set it to the Ray dashboard, e.g. http://head:8265')
        self.settings = settings
        self._client: Any = None
        self._synced: dict[str, float] = {}

    # --- the SDK, with its errors turned into flywheel's -------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            sdk = import_ray_sdk()
            try:
                self._client = sdk.JobSubmissionClient(self.settings.address)
            except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
                raise InfrastructureError(f"cannot reach the Ray cluster at {self.settings.address}: {_first_line(exc)}") from exc
        return self._client

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except (ConnectionError, OSError) as exc:  # requests' ConnectionError is an OSError
            raise InfrastructureError(f"cannot reach the Ray cluster at {self.settings.address} to {what}: {_first_line(exc)}") from exc
        except RuntimeError as exc:
            raise InfrastructureError(f"the Ray cluster at {self.settings.address} refused to {what}: {_first_line(exc)}") from exc

    def info(self, sid: str) -> Any | None:
        """Ray's JobDetails for a submission id, None when Ray has no such job."""
        try:
            return self._call(f"read job {sid}", "get_job_info", sid)
        except InfrastructureError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def submissions(self, job_id: str) -> list[Any]:
        """Every Ray job submitted for this flywheel job (all attempts)."""
        jobs = self._call("list jobs", "list_jobs")
        return [j for j in jobs if (j.metadata or {}).get("flywheel_job") == job_id]

    # --- the Launcher protocol -----------------------------------------------------------------------------

    def launch(self, job: JobRecord) -> int | None:
        sid = submission_id(job)
        if self.info(sid) is not None:
            log.info("job %s: Ray already has submission %s; attaching to it", job.id, sid)
            return None
        self._mark_log(job, sid)
        try:
            self._call(f"accept job {sid}", "submit_job", **self.submission(job))
        except InfrastructureError:
            if self.info(sid) is not None:  # submitted by someone else meanwhile: the same attempt, attach
                return None
            raise
        except (ValueError, TypeError) as exc:  # the SDK checks runtime_env before sending (a missing working_dir)
            raise UserInputError(f"ray.runtime_env: {_first_line(exc)}") from exc
        log.info("job %s submitted to Ray as %s", job.id, sid)
        return None  # the worker records its own pid on the cluster's node

    def submission(self, job: JobRecord) -> dict[str, Any]:
        """The keyword arguments of JobSubmissionClient.submit_job for this job's current attempt."""
        s = self.settings
        worker = f"-m flywheel.trainer.worker {shlex.quote(job.work_dir)}"
        entrypoint = f"{s.entrypoint_prefix} {worker}" if s.entrypoint_prefix else f"{shlex.quote(s.python or sys.executable)} {worker}"
        runtime_env = dict(s.runtime_env)
        runtime_env["env_vars"] = {**WORKER_ENV, **dict(runtime_env.get("env_vars") or {})}
        kwargs: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": submission_id(job),
            "runtime_env": runtime_env,
            "metadata": {"flywheel_job": job.id, "attempt": str(job.attempts)},
            "entrypoint_num_cpus": s.num_cpus,
        }
        if s.num_gpus:
            kwargs["entrypoint_num_gpus"] = s.num_gpus
        if s.memory_mb:
            kwargs["entrypoint_memory"] = s.memory_mb * 1024 * 1024
        return kwargs

    def poll(self, job: JobRecord) -> ProcessState:
        sid = submission_id(job)
        try:
            info = self.info(sid)
        except InfrastructureError as exc:
            log.warning("job %s: %s", job.id, exc)
            return ProcessState(alive=None)  # the cluster may be back soon; the heartbeat rules decide meanwhile
        if info is None:
            return ProcessState(alive=None)  # not submitted yet (or by a launch still under way)
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        if status in ("PENDING", "RUNNING"):
            self._sync_throttled(job, sid)
            waited = time.time() - (info.start_time or 0) / 1000
            if status == "PENDING" and info.start_time and waited > self.settings.pending_timeout_s:
                return self._give_up_pending(job, sid, info.message, waited)
            return ProcessState(alive=True)
        self.sync_log(job)
        if status == "SUCCEEDED":
            return ProcessState(alive=False, returncode=0)
        if status == "STOPPED":
            return ProcessState(alive=False, reason=f"Ray job {sid} was stopped: {info.message}")
        code = info.driver_exit_code if info.driver_exit_code and info.driver_exit_code > 0 else 1
        kind = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
        return ProcessState(alive=False, returncode=code, reason=f"Ray job {sid} failed{kind}: {_one_line(info.message)}")

    def _give_up_pending(self, job: JobRecord, sid: str, message: str | None, waited: float) -> ProcessState:
        try:
            self._call(f"stop job {sid}", "stop_job", sid)
        except InfrastructureError as exc:  # the verdict stands; a later resume submits under a new id
            log.warning("job %s: %s", job.id, exc)
        reason = (
            f"the Ray cluster kept job {sid} pending for {waited:.0f}s (over ray.pending_timeout_s "
            f"{self.settings.pending_timeout_s:g}): {_one_line(message)}"
        )
        return ProcessState(alive=False, returncode=1, reason=reason)

    def cancel(self, job: JobRecord) -> None:
        sid = submission_id(job)
        try:
            self._call(f"stop job {sid}", "stop_job", sid)
        except InfrastructureError as exc:
            if "does not exist" in str(exc) or "status code 404" in str(exc):
                return
            raise InfrastructureError(f"job {job.id} is marked killed, but {exc}; stop it with `ray job stop {sid}`") from exc
        self.sync_log(job)

    # --- the job's output ----------------------------------------------------------------------------------

    def _mark_log(self, job: JobRecord, sid: str) -> None:
        """Write the attempt's header to the job's log and remember where Ray's output for `sid` goes."""
        path = Path(job.log_path)
        with path.open("ab") as handle:
            handle.write(f"\n=== {utcnow().isoformat()} attempt {job.attempts} of job {job.id} (Ray job {sid}) ===\n".encode())
            offset = handle.tell()
        with (Path(job.work_dir) / _LOG_OFFSETS).open("a", encoding="utf-8") as marks:
            marks.write(f"{sid} {offset}\n")

    def _sync_throttled(self, job: JobRecord, sid: str) -> None:
        if time.monotonic() - self._synced.get(sid, 0.0) >= LOG_SYNC_EVERY_S:
            self.sync_log(job)

    def _settle(self, sid: str) -> None:
        deadline = time.monotonic() + LOG_SETTLE_S
        while time.monotonic() < deadline:
            try:
                info = self.info(sid)
            except InfrastructureError:
                return
            if info is None or info.status.is_terminal():
                return
            time.sleep(0.5)

    def sync_log(self, job: JobRecord) -> None:
        """Replace the current attempt's part of the job's log with what Ray holds of its output."""
        sid = submission_id(job)
        self._synced[sid] = time.monotonic()
        marks = Path(job.work_dir) / _LOG_OFFSETS
        offsets = dict(line.split() for line in marks.read_text(encoding="utf-8").splitlines() if line.strip()) if marks.is_file() else {}
        if sid not in offsets:
            return  # submitted by another flywheel process: its header is not in this log
        if job.ended:  # the worker wrote its verdict and is exiting: its last lines are still on their way
            self._settle(sid)
        try:
            text = self._call(f"read the logs of job {sid}", "get_job_logs", sid)
        except InfrastructureError as exc:
            log.debug("job %s: %s", job.id, exc)
            return
        with Path(job.log_path).open("r+b") as handle:
            handle.seek(int(offsets[sid]))
            handle.truncate()
            handle.write(text.encode("utf-8", errors="replace"))


def _one_line(message: str | None) -> str:
    """The first line of Ray's message, without the log excerpt Ray appends (the job's log has it all)."""
    first = next((line.strip() for line in (message or "").splitlines() if line.strip()), "no message")
    return first.split(", last available logs")[0][:500]
