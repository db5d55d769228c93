"""The training worker: `python -m flywheel.trainer.worker JOB_DIR`.

Started by a launcher in its own process group, with stdout and stderr going to the job's log. It reads
`JOB_DIR/job.json` (the job id and the settings), opens its own store, marks the job running, trains with
`flywheel.trainer.recipes.run` (resuming from the newest checkpoint in JOB_DIR), and records progress and a
heartbeat while it goes; at the end it writes the result, or the error with the log's path. A succeeded
job's adapter is then registered as a candidate model version.

A Ray job's worker (train.launcher "ray") with `[ray] storage` set also restores the newest checkpoint from
the storage when its folder has none, uploads each checkpoint as it is saved and, at the end, the adapter
(flywheel.trainer.storage); flywheel's side then downloads, checks and registers it. Under a multi-process
launcher (`accelerate launch`), only rank 0 keeps the books; the other ranks just train.

If the worker is killed outright it writes nothing more; the launcher sees the dead process (or the stale
heartbeat) and marks the job killed, and `flywheel jobs resume` starts a new worker on the same folder.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.records import utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store, open_store
from flywheel.trainer.jobs import JobStatus, get_job, read_job_file, set_fields, transition

HEARTBEAT_S = 5.0
PROGRESS_EVERY_S = 1.0
log = logging.getLogger("flywheel.worker")


class StoreProgress:
    """Receives the recipe's progress events and writes step, total and losses to the job row: at most
    once a second for steps, always for logs, evaluations and checkpoints."""

    def __init__(self, store: Store, job_id: str, pid: int):
        self.store = store
        self.job_id = job_id
        self.pid = pid
        self.progress: dict[str, Any] = {"step": 0, "total": 0, "host": socket.gethostname()}
        self._last_write = 0.0

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.progress.update(fields)
        last_step = event == "step" and self.progress.get("step", 0) >= self.progress.get("total", 0)
        self._write(force=event != "step" or last_step)

    def _write(self, force: bool = False) -> None:
        moment = time.monotonic()
        if not force and moment - self._last_write < PROGRESS_EVERY_S:
            return
        self._last_write = moment
        try:
            set_fields(
                self.store,
                self.job_id,
                only_status=[JobStatus.RUNNING],
                worker_pid=self.pid,
                progress=dict(self.progress),
                heartbeat_at=utcnow(),
            )
        except Exception as exc:  # a progress write must never stop training
            log.warning("could not record progress: %s", exc)


def _heartbeat(store: Store, job_id: str, pid: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            set_fields(store, job_id, only_status=[JobStatus.RUNNING], worker_pid=pid, heartbeat_at=utcnow())
        except Exception as exc:  # the database may be briefly busy; the next beat tries again
            log.warning("heartbeat failed: %s", exc)


def _register(settings: Settings, store: Store, job_id: str) -> None:
    """Register the job's adapter as a candidate version.

    Here, at the end of the worker, because every succeeded job passes through this one place, whoever
    started it and whether or not anyone waits (`flywheel train --no-wait`, the agent, `flywheel jobs
    resume`). It is the agent's register_candidate, idempotent by the adapter's weights, so `flywheel
    train` and the agent asking again get this same version. A failure here does not undo the job: it is
    logged, and the next register_candidate call (flywheel train, flywheel jobs show, the agent) retries."""
    from flywheel.context import Context
    from flywheel.tools.jobs import register_candidate

    try:
        version = register_candidate(Context(settings=settings, _store=store), job_id).version
    except Exception as exc:  # the adapter is trained and recorded; registering can be retried
        log.warning("job %s: could not register its adapter as a version: %s", job_id, exc)
        return
    log.info("job %s registered as %s; next: flywheel eval --candidate %s", job_id, version, version)


def _other_rank(work_dir: Path) -> int:
    """A data-parallel rank above 0: trains its share and leaves status, progress and uploads to rank 0."""
    from flywheel.trainer import recipes

    job_id, settings = read_job_file(work_dir)
    store = open_store(settings, migrate=False)
    try:
        spec = recipes.TrainSpec.model_validate(get_job(store, job_id).spec)
    finally:
        store.dispose()
    recipes.run(spec, work_dir)
    return 0


def _storage(settings: Settings, launcher: str) -> str:
    return settings.ray.storage if launcher == "ray" else ""


def _pushing_checkpoints(progress: StoreProgress, storage: str, job_id: str, checkpoints: Path) -> Any:
    """The recipe's progress function, uploading each checkpoint to `storage` as it is saved."""
    from flywheel.trainer.storage import push_checkpoint

    def on_progress(event: str, fields: dict[str, Any]) -> None:
        progress(event, fields)
        if event == "save" and fields.get("checkpoint") is not None:
            try:
                push_checkpoint(storage, job_id, checkpoints / f"checkpoint-{fields['checkpoint']}")
            except FlywheelError as exc:  # the next checkpoint is tried again; training goes on
                log.warning("job %s: %s", job_id, exc)

    return on_progress


def run_job(work_dir: Path) -> int:
    from flywheel.trainer import recipes

    if int(os.environ.get("RANK", "0") or 0) > 0:
        return _other_rank(work_dir)
    job_id, settings = read_job_file(work_dir)
    store = open_store(settings, migrate=False)
    pid = os.getpid()
    try:
        job = get_job(store, job_id)
        started = transition(
            store, job_id, [JobStatus.QUEUED], JobStatus.RUNNING, pid=pid, started_at=utcnow(), heartbeat_at=utcnow(), error=None
        )
        if not started:
            log.warning("job %s is %s, not queued: this worker does nothing", job_id, job.status)
            return 0
        log.info("job %s attempt %d: %s on %s", job_id, job.attempts, job.spec.get("method"), job.spec.get("dataset_dir"))
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(store, job_id, pid, stop), daemon=True)
        beat.start()
        progress = StoreProgress(store, job_id, pid)
        storage = _storage(settings, job.launcher)
        adapter_uri = None
        try:
            spec = recipes.TrainSpec.model_validate(job.spec)
            on_progress = progress
            if storage:
                from flywheel.trainer.storage import publish_adapter, restore_checkpoint

                restore_checkpoint(storage, job_id, work_dir / recipes.CHECKPOINT_DIR)
                on_progress = _pushing_checkpoints(progress, storage, job_id, work_dir / recipes.CHECKPOINT_DIR)
            result = recipes.run(spec, work_dir, on_progress=on_progress)
            if storage:
                adapter_uri = publish_adapter(storage, job_id, Path(result.adapter_path))
        except BaseException as exc:
            stop.set()
            if isinstance(exc, FlywheelError):
                message = str(exc)
            else:
                traceback.print_exc()
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("job %s failed: %s", job_id, message)
            transition(
                store,
                job_id,
                [JobStatus.RUNNING],
                JobStatus.FAILED,
                error=f"{message} (log: {job.log_path})",
                finished_at=utcnow(),
                progress=progress.progress,
            )
            return 1
        stop.set()
        progress.progress.update(step=result.steps)
        succeeded = transition(
            store,
            job_id,
            [JobStatus.RUNNING],
            JobStatus.SUCCEEDED,
            result={**result.model_dump(mode="json"), **({"adapter_uri": adapter_uri} if adapter_uri else {})},
            finished_at=utcnow(),
            progress=progress.progress,
        )
        log.info("job %s succeeded: adapter %s sha256 %s", job_id, result.adapter_path, result.adapter_sha256)
        if succeeded and not adapter_uri:  # from storage, flywheel's side registers what it downloaded and checked
            _register(settings, store, job_id)
        return 0
    finally:
        store.dispose()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flywheel.trainer.worker JOB_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Progress bars are noise in a log file; the job row carries the progress.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    return run_job(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
