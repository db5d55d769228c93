"""Tools: build a balanced dataset snapshot from verified corrections (flywheel.trainer.dataset), list them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from flywheel.records import Record
from flywheel.tools.base import ToolContext, ToolSpec, report_progress
from flywheel.trainer.dataset import Snapshot, build_snapshot, list_snapshots


class DatasetInfo(Record):
    id: str
    kind: str
    train_rows: int | None = None
    heldout_rows: int | None = None
    composition: dict[str, Any] = {}
    by_source: dict[str, Any] = {}  # per origin: offered, train, heldout, dropped by step
    labels: dict[str, Any] = {}  # what became of the failures people labelled
    warnings: list[str] = []


def _info(snapshot: Snapshot) -> DatasetInfo:
    manifest = snapshot.manifest
    files = manifest.get("files") or {}
    composition = (manifest.get("composition") or {}).get("train") or {}
    return DatasetInfo(
        id=snapshot.id,
        kind=snapshot.kind,
        train_rows=(files.get("train") or {}).get("rows"),
        heldout_rows=(files.get("heldout") or {}).get("rows"),
        composition={k: v for k, v in composition.items() if isinstance(v, (int, float, dict))},
        by_source=manifest.get("by_source") or {},
        labels=manifest.get("labels") or {},
        warnings=list(manifest.get("warnings") or [])[:5],
    )


def build_dataset(ctx: ToolContext, kind: Literal["sft", "dpo"] | None = None) -> DatasetInfo:
    """Build a balanced training snapshot from every verified correction plus replay of baseline samples. Building again from the same state gives the same snapshot id.

    Args:
        kind: "sft" (train on the corrected answer) or "dpo" (prefer it over the failing one); default: the train.method setting.
    """
    # train.method kto is not a snapshot kind: KTO trains on a dpo snapshot's good and bad answers
    chosen = kind or ("dpo" if ctx.settings.train.method == "kto" else ctx.settings.train.method)
    report_progress(ctx, f"building a {chosen} dataset snapshot")
    return _info(build_snapshot(ctx, chosen))


def list_datasets(ctx: ToolContext, limit: Annotated[int, Field(ge=1, le=50)] = 10) -> list[DatasetInfo]:
    """Dataset snapshots built so far, newest first.

    Args:
        limit: at most this many.
    """
    return [_info(s) for s in list_snapshots(ctx.store)[:limit]]


SPECS = [ToolSpec(build_dataset, mutates=True, facts=lambda r: {"dataset_id": r.id}), ToolSpec(list_datasets)]
