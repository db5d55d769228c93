"""Job records in the `jobs` table (flywheel.store.jobs): reads, inserts and guarded status changes.

Every status change is a conditional UPDATE (`WHERE status IN (...)`), so the launcher, the worker and a
`jobs cancel` racing each other cannot overwrite one another's verdict: whoever moves the job first wins,
the others see `False` and re-read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import field_validator

from flywheel.errors import NotFoundError
from flywheel.records import Record
from flywheel.settings import Settings
from flywheel.store import jobs as job_repo
from flywheel.store.db import Store


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.KILLED)
# The environment every worker runs with, whichever launcher starts it: offline, unbuffered.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class ProcessState:
    """What a launcher knows of a job's worker (flywheel.trainer.launcher.Launcher.poll)."""

    alive: bool | None  # None: this launcher cannot tell (another host, another scheduler)
    returncode: int | None = None
    reason: str | None = None  # why it ended, in the scheduler's words (a Ray job's message); None: unknown


class JobRecord(Record):
    id: str
    kind: str  # train_sft | train_dpo
    status: JobStatus
    spec: dict[str, Any]
    launcher: str = "local"
    pid: int | None = None
    work_dir: str
    log_path: str
    progress: dict[str, Any] | None = None  # step, total, loss, eval_loss, epoch, checkpoint, host
    result: dict[str, Any] | None = None  # flywheel.trainer.recipes.TrainResult, dumped
    error: str | None = None
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @field_validator("created_at", "started_at", "finished_at", "heartbeat_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        # SQLite hands back naive datetimes; everything flywheel writes is UTC.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def insert_job(store: Store, record: JobRecord) -> bool:
    """Store a new job; False when a job with that id exists already (nothing is changed then)."""
    row = record.model_dump()
    row["status"] = str(record.status)
    return job_repo.insert(store, row)


def find_job(store: Store, job_id: str) -> JobRecord | None:
    row = job_repo.find(store, job_id)
    return JobRecord.model_validate(row) if row is not None else None


def get_job(store: Store, job_id: str) -> JobRecord:
    record = find_job(store, job_id)
    if record is None:
        raise NotFoundError(f"no job {job_id!r} (see `flywheel jobs list`)")
    return record


def list_jobs(store: Store, statuses: Iterable[str] | None = None, limit: int = 50) -> list[JobRecord]:
    rows = job_repo.list_newest(store, [str(s) for s in statuses or ()], limit)
    return [JobRecord.model_validate(row) for row in rows]


def transition(store: Store, job_id: str, from_statuses: Iterable[str], to_status: str, **values: Any) -> bool:
    """Move a job to `to_status` (and set `values`) only if it is in one of `from_statuses`."""
    return job_repo.transition(store, job_id, [str(s) for s in from_statuses], str(to_status), values)


def set_fields(
    store: Store, job_id: str, *, only_status: Iterable[str] | None = None, worker_pid: int | None = None, **values: Any
) -> bool:
    """Update fields of a job (progress, heartbeat, pid) while it is in `only_status`, and for the worker
    with process `worker_pid` when given, so a superseded worker cannot write over its successor."""
    wanted = [str(s) for s in only_status] if only_status is not None else None
    return job_repo.set_fields(store, job_id, values, only_status=wanted, worker_pid=worker_pid)


# --- the job folder's hand-over file ----------------------------------------------------------------------

JOB_FILE = "job.json"


def write_job_file(work_dir: Path, job_id: str, settings: Settings) -> Path:
    """What a worker needs to find its job: the id and the settings (for the store URL). Readable by the
    owner only, since a PostgreSQL URL may carry a password."""
    path = work_dir / JOB_FILE
    payload = {"job_id": job_id, "settings": settings.model_dump(mode="json")}
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    path.chmod(0o600)
    return path


def read_job_file(work_dir: Path) -> tuple[str, Settings]:
    payload = json.loads((work_dir / JOB_FILE).read_text(encoding="utf-8"))
    return payload["job_id"], Settings(**payload["settings"])
