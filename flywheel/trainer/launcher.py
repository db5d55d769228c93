"""Training runs as jobs: launched once per spec, watched through the store, resumable after a kill.

A job's id is derived from its spec (method, base model and its config hash, dataset content hash,
hyper-parameters), so launching the same spec twice starts one process: the second call gets the existing
record. The worker (flywheel.trainer.worker) writes status, progress and a heartbeat to the `jobs` table;
`status()` reconciles that with the process itself: a job whose worker is gone without a verdict was
killed. `resume()` starts a new worker on the same folder, which continues from the newest checkpoint,
or from scratch with `restart=True`.

A `Launcher` starts, polls and cancels workers. `LocalProcessLauncher` runs them as child processes in
their own process groups; `flywheel.trainer.ray_launcher.RayJobLauncher` (train.launcher "ray") submits
them as Ray jobs. A job keeps the launcher that started it (its `launcher` field) for polls, resumes and cancels.

These functions are what the CLI and the agent's tools call: `launch`, `status`, `wait`, `resume`, `cancel`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from flywheel.context import Context
from flywheel.errors import InfrastructureError, JobFailed, NotFoundError, UserInputError
from flywheel.proc import pid_alive
from flywheel.records import utcnow
from flywheel.trainer.jobs import (
    ACTIVE,
    WORKER_ENV,
    JobRecord,
    JobStatus,
    ProcessState,
    find_job,
    get_job,
    insert_job,
    set_fields,
    transition,
    write_job_file,
)
from flywheel.trainer.recipes import ADAPTER_DIR, CHECKPOINT_DIR, TrainSpec

LOG_FILE = "train.log"
STALE_HEARTBEAT = timedelta(seconds=120)  # no beat for this long, and no way to ask the process: gone
NEVER_STARTED = timedelta(seconds=60)  # queued without a process for this long: the launch itself died


class Launcher(Protocol):
    name: str

    def launch(self, job: JobRecord) -> int | None:
        """Start the worker for `job` (its folder and job file exist). Returns a pid when there is one."""

    def poll(self, job: JobRecord) -> ProcessState:
        """Is the job's worker still running?"""

    def cancel(self, job: JobRecord) -> None:
        """Stop the job's worker; a no-op when it is not running."""


class LocalProcessLauncher:
    """Workers as child processes: `python -m flywheel.trainer.worker JOB_DIR`, each in its own process group
    (so cancelling reaches anything it spawned), output appended to the job's log."""

    name = "local"

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def launch(self, job: JobRecord) -> int | None:
        env = {**os.environ, **WORKER_ENV}
        with open(job.log_path, "ab") as log_file:
            log_file.write(f"\n=== {utcnow().isoformat()} attempt {job.attempts} of job {job.id} ===\n".encode())
            log_file.flush()
            try:
                child = subprocess.Popen(
                    [self.python, "-m", "flywheel.trainer.worker", job.work_dir],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=job.work_dir,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise InfrastructureError(f"cannot start the training worker: {exc}") from exc
        self._children[job.id] = child
        return child.pid

    def poll(self, job: JobRecord) -> ProcessState:
        child = self._children.get(job.id)
        if child is not None and job.pid in (None, child.pid):
            code = child.poll()  # also reaps it, so a finished child does not linger as a zombie
            return ProcessState(alive=code is None, returncode=code)
        host = (job.progress or {}).get("host")
        if job.pid is None or (host and host != socket.gethostname()):
            return ProcessState(alive=None)
        return ProcessState(alive=_worker_alive(job.pid, job.work_dir))

    def cancel(self, job: JobRecord) -> None:
        if job.pid is None or not self.poll(job).alive:
            return
        _signal_group(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.poll(job).alive:
                return
            time.sleep(0.2)
        _signal_group(job.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session, so its pid is its group id
    except (ProcessLookupError, PermissionError):
        pass


def _worker_alive(pid: int, work_dir: str) -> bool:
    """Is `pid` a live (not zombie) worker for this job folder? /proc tells on Linux; elsewhere, whether the
    pid exists at all (pid reuse can then fool us, the heartbeat check stays as a backstop)."""
    return pid_alive(pid, argv_has=("flywheel.trainer.worker", work_dir))


# --- the job API ---------------------------------------------------------------------------------------------


def get_launcher(ctx: Context, name: str | None = None) -> Launcher:
    """The launcher named `name` (a job's `launcher` field), by default train.launcher's. The context keeps
    the one it made (it remembers the children it started), so keep using the same one."""
    wanted = name or ctx.settings.train.launcher
    if ctx.launcher is not None and ctx.launcher.name == wanted:
        return ctx.launcher
    made: Launcher
    if wanted == "ray":
        from flywheel.trainer.ray_launcher import RayJobLauncher

        made = RayJobLauncher(ctx.settings.ray)
    else:
        made = LocalProcessLauncher()
    if ctx.launcher is None:
        ctx.launcher = made
    return made


def refresh_log(ctx: Context, record: JobRecord) -> None:
    """A cluster launcher keeps the worker's output on the cluster: copy it into the job's log file."""
    try:
        sync = getattr(get_launcher(ctx, record.launcher), "sync_log", None)
    except UserInputError:  # that cluster is no longer configured: the log stays as last copied
        return
    if sync is not None:
        sync(record)


def job_dir(ctx: Context, job_id: str) -> Path:
    return ctx.settings.artifacts_path / "jobs" / job_id


def resolve_dataset(ctx: Context, ref: str | Path) -> Path:
    """A snapshot folder from a path, a dataset id in the store, or "latest" (the newest snapshot)."""
    from flywheel.trainer.dataset import get_snapshot

    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if str(ref) == "latest":
        from flywheel.trainer.dataset import list_snapshots

        newest = list_snapshots(ctx.store)
        if not newest:
            raise NotFoundError("no dataset snapshot yet: run `flywheel dataset build` first")
        ref = newest[0].id
    try:
        folder = Path(get_snapshot(ctx.store, str(ref)).path)
    except NotFoundError:
        raise NotFoundError(f"dataset {ref!r} is neither a folder nor a dataset id in the store") from None
    if not folder.is_dir():
        raise UserInputError(f"dataset {ref!r} points at {folder}, which does not exist")
    return folder


def launch(ctx: Context, spec: TrainSpec) -> JobRecord:
    """Start training `spec`, or return the job that already has this spec (whatever its status: a failed
    or killed one is continued with `resume`)."""
    job_id = spec.job_id()
    existing = find_job(ctx.store, job_id)
    if existing is not None:
        return status(ctx, job_id)
    folder = job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    record = JobRecord(
        id=job_id,
        kind=f"train_{spec.method}",
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),
        launcher=get_launcher(ctx).name,
        work_dir=str(folder),
        log_path=str(folder / LOG_FILE),
        attempts=1,
        created_at=utcnow(),
    )
    if not insert_job(ctx.store, record):  # another caller inserted it between our read and our insert
        return status(ctx, job_id)
    return _start(ctx, record)


def _start(ctx: Context, record: JobRecord) -> JobRecord:
    folder = Path(record.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_job_file(folder, record.id, ctx.settings)
    try:
        pid = get_launcher(ctx, record.launcher).launch(record)
    except (InfrastructureError, UserInputError) as exc:  # an unreachable cluster, a wrong runtime_env: failed, resumable
        transition(ctx.store, record.id, ACTIVE, JobStatus.FAILED, error=str(exc), finished_at=utcnow())
        raise
    if pid is not None:
        # The worker records its own pid when it starts; this covers the moments before that.
        set_fields(ctx.store, record.id, only_status=[JobStatus.QUEUED], pid=pid)
    return get_job(ctx.store, record.id)


def status(ctx: Context, job_id: str) -> JobRecord:
    """The job as stored, after marking it killed (or failed) if its worker is gone without a verdict."""
    record = get_job(ctx.store, job_id)
    if not record.active:
        return record
    state = get_launcher(ctx, record.launcher).poll(record)
    now = utcnow()
    gone = state.alive is False
    if state.alive is None:
        beat = record.heartbeat_at or record.started_at
        if record.status == JobStatus.RUNNING and beat is not None and now - beat > STALE_HEARTBEAT:
            gone = True
        queued_at = record.heartbeat_at or record.created_at  # resume stamps the heartbeat when it re-queues
        if record.status == JobStatus.QUEUED and record.pid is None and now - queued_at > NEVER_STARTED:
            gone = True
    if not gone:
        return record
    if state.returncode is not None and state.returncode > 0:
        new_status, reason = JobStatus.FAILED, f"the worker exited with status {state.returncode}"
    else:
        new_status, reason = JobStatus.KILLED, "the worker process is gone"
        if state.returncode is not None and state.returncode < 0:
            reason = f"the worker was killed by signal {-state.returncode}"
    reason = state.reason or reason
    transition(ctx.store, job_id, ACTIVE, new_status, error=f"{reason} (log: {record.log_path})", finished_at=now)
    return get_job(ctx.store, job_id)


def resume(ctx: Context, job_id: str, restart: bool = False) -> JobRecord:
    """Start a failed or killed job again: from its newest checkpoint, or from scratch with `restart`
    (which also retrains a succeeded job). A job that is queued or running is returned as it is."""
    record = status(ctx, job_id)
    if record.active or (record.status == JobStatus.SUCCEEDED and not restart):
        return record
    moved = transition(
        ctx.store,
        job_id,
        [record.status],
        JobStatus.QUEUED,
        attempts=record.attempts + 1,
        pid=None,
        error=None,
        result=None,
        progress=None,
        started_at=None,
        finished_at=None,
        heartbeat_at=utcnow(),
    )
    if not moved:  # someone else resumed or cancelled it meanwhile
        return status(ctx, job_id)
    if restart:
        for name in (CHECKPOINT_DIR, ADAPTER_DIR):
            shutil.rmtree(Path(record.work_dir) / name, ignore_errors=True)
    return _start(ctx, get_job(ctx.store, job_id))


def cancel(ctx: Context, job_id: str) -> JobRecord:
    """Stop a queued or running job; it is marked killed and can be resumed later."""
    record = status(ctx, job_id)
    if not record.active:
        return record
    transition(ctx.store, job_id, ACTIVE, JobStatus.KILLED, error=f"cancelled (log: {record.log_path})", finished_at=utcnow())
    get_launcher(ctx, record.launcher).cancel(record)
    return get_job(ctx.store, job_id)


def wait(
    ctx: Context,
    job_id: str,
    on_progress: Callable[[JobRecord], None] | None = None,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    raise_on_failure: bool = True,
) -> JobRecord:
    """Poll until the job ends (or `timeout_s` passes), calling `on_progress` whenever its progress changes.
    A failed or killed job raises JobFailed with the tail of its log unless `raise_on_failure` is False."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: object = object()
    while True:
        record = status(ctx, job_id)
        if on_progress is not None and (record.progress, record.status) != seen:
            seen = (record.progress, record.status)
            on_progress(record)
        if record.ended:
            refresh_log(ctx, record)
            if raise_on_failure and record.status != JobStatus.SUCCEEDED:
                raise failure(record)
            return record
        if deadline is not None and time.monotonic() >= deadline:
            return record
        time.sleep(poll_s)


def log_tail(record: JobRecord, lines: int = 20) -> str:
    path = Path(record.log_path)
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64_000))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def failure(record: JobRecord, lines: int = 20) -> JobFailed:
    """The JobFailed for a failed or killed job: what happened, where the log is, and its last lines."""
    hint = f"resume with `flywheel jobs resume {record.id}` (or --restart to start over)"
    tail = log_tail(record, lines)
    message = f"job {record.id} {record.status}: {record.error or 'no error recorded'}; {hint}"
    if tail:
        message += f"\n--- last lines of {record.log_path} ---\n{tail}"
    return JobFailed(message)
