"""What a candidate cost: the eval report's `cost` block.

  eval_seconds   wall time of this evaluation (both models, every set, judging included)
  train_seconds  wall time of the candidate's training job (started -> finished), when the candidate is
                 a registered version that records its job; None otherwise
  labels         human labels behind the dataset the candidate trained on: what the dataset builder
                 counted in the manifest's `labels` block (labelled failures that became training rows,
                 `used` + `fine_used`), else the failures the manifest lists (`failure_ids`) that carry
                 a label (a relabelled failure counts once: training used its newest label); None
                 without a recorded dataset
  llm_calls      LLM calls made during this evaluation (the LLM judge; 0 offline), from the counters in
  llm_tokens     flywheel.llm, and the tokens they used

Like timing, cost changes from run to run: the report hash leaves it out (flywheel.evals.report). Its
keys stay plain numbers so that a per-cycle summary can add them up.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from flywheel.store.db import Store

COST_KEYS = ("eval_seconds", "train_seconds", "labels", "llm_calls", "llm_tokens")


class Cost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_seconds: float
    train_seconds: float | None = None
    labels: int | None = None
    llm_calls: int = 0
    llm_tokens: int = 0


def training_cost(store: Store, version_id: str | None) -> tuple[float | None, int | None]:
    """(train_seconds, labels) of a registered version, each None when the version does not record it."""
    if version_id is None:
        return None, None
    from flywheel.data.labels import latest_labels
    from flywheel.store import datasets as dataset_repo
    from flywheel.store import versions as version_store
    from flywheel.trainer.jobs import find_job

    with store.engine.connect() as conn:
        version = version_store.find_version(conn, version_id)
        if version is None:
            return None, None
        labels: int | None = None
        manifest = dataset_repo.manifest(conn, version.dataset_id) if version.dataset_id else None
        manifest = manifest if isinstance(manifest, dict) else {}
        counted, ids = manifest.get("labels"), manifest.get("failure_ids")
        if isinstance(counted, dict) and isinstance(counted.get("used"), int):
            labels = counted["used"] + int(counted.get("fine_used") or 0)
        elif isinstance(ids, list):
            labels = len(latest_labels(conn, [str(i) for i in ids]))
    seconds: float | None = None
    job = find_job(store, version.job_id) if version.job_id else None
    if job is not None and job.started_at is not None and job.finished_at is not None:
        seconds = round((job.finished_at - job.started_at).total_seconds(), 3)
    return seconds, labels
