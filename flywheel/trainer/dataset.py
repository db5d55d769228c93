"""Dataset snapshots: verified corrections (and replay rows) turned into a balanced, versioned training set.

`build_snapshot(ctx, kind)` reads every failure with a verified correction, mixes new problem rows with
replay rows from the baseline tiers (and rows the caller supplies), applies the balancing rules of
`settings.dataset` (flywheel.trainer.balance, in the order listed there), splits off held-out rows and
writes an immutable folder:

    <artifacts>/datasets/<id>/train.jsonl    (or .parquet when dataset.format says so and pyarrow is installed)
                             heldout.jsonl
                             manifest.json   config, composition, weights, counts per step, content hash

Generated samples the quality scorer kept (flywheel.synthesis) are a source of their own: problem rows of
origin "synthetic:<generator>", outside the problem-type cap, under caps of their own
(flywheel.trainer.synthetic_mix: no prompt a verified row already answers, `synthesis.max_per_intent`,
`synthesis.max_share` of the rows) and weighted `synthesis.weight` below real rows.

The id is derived from the rows' content hash and the config, so building twice from the same state gives
the same snapshot, and a folder is never overwritten by different content. A row of table `datasets`
records it.

Rows the fixed test set (settings.eval.test_set) asks about are dropped from both splits: a row goes when
the normalised text of its user turns, or of its last user turn, equals a test row's. Normalising
(NFKC, case-folded, punctuation removed, whitespace collapsed) errs towards dropping: a near-copy of a
test prompt in training would make the test measure memory. The rows (and their keys) come from
flywheel.trainer.samples; replay rows are flywheel.trainer.replay's.

Row shapes:
    sft  {"messages": prompt + [{"role": "assistant", "content": correction}], "weight", "intent", ...}
    dpo  {"prompt": prompt, "chosen": [correction], "rejected": [original failing answer], "weight", ...}
"weight" is the per-row loss weight the trainer multiplies into the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from flywheel.context import Context
from flywheel.errors import InfrastructureError, NotFoundError, SettingsError, UserInputError
from flywheel.records import FailureStatus, Record, SampleTier, stable_hash, utcnow
from flywheel.settings import Settings
from flywheel.store import datasets as dataset_repo
from flywheel.store.db import Store
from flywheel.trainer import balance as bal
from flywheel.trainer import synthetic_mix
from flywheel.trainer.balance import Ledger, Sample
from flywheel.trainer.replay import ReplayRow, parse_replay_rows, stable_production_rows
from flywheel.trainer.replay_mix import mix_replay
from flywheel.trainer.samples import replay_samples, store_samples, synthetic_samples, test_set_keys

Kind = Literal["sft", "dpo"]
KINDS: tuple[str, ...] = ("sft", "dpo")
SPLITS: tuple[str, ...] = ("train", "heldout")


class Snapshot(Record):
    id: str
    kind: Kind
    path: str
    content_hash: str
    manifest: dict[str, Any]
    created_at: datetime | None = None

    def file(self, split: str = "train") -> Path:
        if split not in SPLITS:
            raise UserInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return Path(self.path) / self.manifest["files"][split]["name"]


# --- building -----------------------------------------------------------------------------------------------


def _row(sample: Sample, kind: str, weight: float) -> dict[str, Any]:
    meta = {
        "weight": weight,
        "intent": sample.intent,
        "problem_type": sample.problem_type,
        "category": sample.category,
        "severity": sample.severity,
        "tier": sample.tier,
        "failure_id": sample.key if sample.source == "store" else None,
        "sample_id": sample.key,
        "source": sample.source,
        "origin": sample.origin,
    }
    answer = {"role": "assistant", "content": sample.answer}
    if kind == "sft":
        return {"messages": [*sample.prompt, answer], **meta}
    return {"prompt": sample.prompt, "chosen": [answer], "rejected": [sample.rejected], **meta}


def _canonical(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in rows)


def _filter(samples: list[Sample], kind: str, test_groups: set[str], test_lasts: set[str], ledger: Ledger) -> list[Sample]:
    overlap = [s for s in samples if s.group in test_groups or (s.last_user and s.last_user in test_lasts)]
    kept = [s for s in samples if not (s.group in test_groups or (s.last_user and s.last_user in test_lasts))]
    ledger.step("test_set_filter", len(samples), len(kept), dropped=len(overlap), dropped_by_tier=bal.counts(overlap, "tier"))
    if kind == "dpo":
        unpaired = {s.key for s in kept if s.rejected is None or (s.rejected.get("content") or "") == s.answer}
        if unpaired:
            ledger.warnings.append(f"{len(unpaired)} row(s) have no distinct rejected answer and are left out of the DPO set")
        kept = [s for s in kept if s.key not in unpaired]
        ledger.step("dpo_pairs", len(kept) + len(unpaired), len(kept), dropped=len(unpaired))
    return kept


def _dedupe(samples: list[Sample], ledger: Ledger) -> list[Sample]:
    seen: dict[str, Sample] = {}
    for s in samples:
        seen.setdefault(s.key, s)
    if len(seen) < len(samples):
        ledger.warnings.append(f"{len(samples) - len(seen)} supplied row(s) repeat another row's id or content; kept once")
    return sorted(seen.values(), key=lambda s: s.key)


def build_snapshot(
    ctx: Context, kind: str = "sft", *, extra_rows: Sequence[ReplayRow | dict[str, Any]] | None = None, extra_errors: Sequence[str] = ()
) -> Snapshot:
    """Build (or find, when the same state was built before) a dataset snapshot and record it.

    `extra_rows` are replay rows from the caller, each with a tier (see `ReplayRow`); invalid ones are
    left out and listed in the manifest's warnings, as are `extra_errors` (e.g. unreadable file lines).
    Raises UserInputError when no verified problem row is left to train on.
    """
    if kind not in KINDS:
        raise UserInputError(f"unknown dataset kind {kind!r}; expected sft or dpo")
    settings = ctx.settings
    ds = settings.dataset
    if ds.replay_max_share <= 0:
        raise SettingsError("dataset.replay_max_share", "must be above 0, or no problem row could ever be trained on")
    ledger = Ledger()
    offered = list(extra_rows or [])
    if ds.production_replay_rows and kind == "sft":
        # Stable production answers (no negative signal, pass the rule judge) as the lowest replay tier, so a
        # young deployment with thin baseline tiers still mixes in what already works. The tier weights
        # draw core and secondary baseline rows first.
        offered += stable_production_rows(ctx, ds.production_replay_rows)
    replay_rows, errors = parse_replay_rows(offered)
    errors = [*extra_errors, *errors]
    ledger.warnings.extend(f"extra row left out: {e}" for e in errors)
    from_store = store_samples(ctx.store, settings)
    generated = synthetic_samples(ctx.store, settings)
    samples = _dedupe(from_store + replay_samples(replay_rows, settings) + generated, ledger)
    test_groups, test_lasts, test_info = test_set_keys(settings)
    if test_info is None:
        ledger.warnings.append("no fixed test set configured (eval.test_set): overlap with it was not checked")
    sources = SourceTracker(samples)
    rows = _filter(samples, kind, test_groups, test_lasts, ledger)
    sources.step("test_set_or_pairing", rows)
    rows, synthetic = synthetic_mix.split(rows)
    n_problems = sum(s.pool == bal.PROBLEM for s in rows)
    if n_problems == 0:
        raise UserInputError(
            f"no verified problem rows to build a {kind} dataset from ({sum(s.pool == bal.PROBLEM for s in samples)} before the test-set filter"
            + (" and DPO pairing" if kind == "dpo" else "")
            + "); judge and correct failures first"
        )

    seed = ds.seed
    rows = bal.cap_problem_types(rows, ds.problem_type_max_ratio, seed, ledger)
    sources.step("problem_type_cap", rows + synthetic)
    rows = bal.oversample_rare_high_risk(
        rows, ds.oversample_severities, ds.oversample_target_ratio, ds.problem_type_max_ratio, ds.max_repeats, ledger
    )
    if synthetic:
        synthetic = synthetic_mix.drop_conflicts(rows, synthetic, ledger)
        synthetic = synthetic_mix.cap_per_intent(synthetic, settings.synthesis.max_per_intent, seed, ledger)
        rows = rows + synthetic
        sources.step("synthetic_caps", rows)
    embed = ctx.index.embedder.embed if ds.replay_strategy == "boundary" else None
    rows = mix_replay(
        rows,
        ds.replay_min_share,
        ds.replay_max_share,
        ds.replay_target_share,
        ds.tier_weights,
        seed,
        ledger,
        ds.replay_strategy,
        embed,
        ds.boundary_neighbours,
    )
    if synthetic:
        rows = synthetic_mix.cap_share(rows, settings.synthesis.max_share, seed, ledger, settings.synthesis.generators)
    sources.step("replay_mix", rows)
    train, heldout = bal.split_heldout(rows, ds.heldout_ratio, seed, ledger)
    train = bal.intent_floor(train, ds.intent_min_samples, ds.max_repeats, ledger)
    train = bal.intent_cap(train, ds.intent_max_ratio, seed, ledger)
    sources.step("intent_cap", [*train, *heldout])
    bal.step_rng(seed, "order").shuffle(train)  # a fixed order; trainers shuffle again per epoch
    labels_used = label_yield(ctx.store, sources, {s.key for s in train} | {s.key for s in heldout})
    _refuse_low_label_yield(labels_used, ds)

    weights = [bal.row_weight(s, ds.loss_weights, ds.tier_weights) for s in train]
    train_rows = [_row(s, kind, w) for s, w in zip(train, weights)]
    heldout_rows = [_row(s, kind, bal.row_weight(s, ds.loss_weights, ds.tier_weights)) for s in heldout]
    content_hash = hashlib.sha256(_canonical(train_rows) + b"--heldout--\n" + _canonical(heldout_rows)).hexdigest()
    config = {
        "kind": kind,
        "dataset": ds.model_dump(mode="json"),
        "categories": dict(settings.taxonomy.categories),
        "default_severity": dict(settings.taxonomy.default_severity),
    }
    snapshot_id = f"ds-{kind}-{stable_hash({'content': content_hash, 'config': config}, 12)}"

    final_checks = bal.checks(train, ds)
    for name, check in final_checks.items():
        if not check["held"]:
            ledger.warnings.append(f"{name} not held in the final training rows: {check}")
    manifest: dict[str, Any] = {
        "id": snapshot_id,
        "kind": kind,
        "content_hash": content_hash,
        "config": config,
        "sources": {
            "store": bal.counts(from_store, "tier"),
            "extra": bal.counts([s for s in samples if s.source == "extra"], "tier"),
            "synthetic": bal.counts(generated, "origin"),
            "extra_rejected": errors,
        },
        "test_set": test_info,
        "by_source": sources.report(train, heldout),
        "labels": labels_used,
        "steps": ledger.steps,
        "composition": {"train": bal.composition(train), "heldout": bal.composition(heldout)},
        "weights": _weight_summary(train, weights, ds),
        "checks": final_checks,
        "warnings": ledger.warnings,
    }
    return _persist(ctx, snapshot_id, kind, content_hash, manifest, train_rows, heldout_rows)


class SourceTracker:
    """Which rows of each origin (label, kb_correction, production_replay, ...) each step left out, so
    the manifest can say, per source, how many rows it offered, how many the snapshot took and why the
    rest were dropped."""

    def __init__(self, offered: Sequence[Sample]):
        self.origin = {s.key: s.origin for s in offered}
        self.kept = set(self.origin)
        self.dropped_at: dict[str, str] = {}  # key -> the step that dropped it

    def step(self, name: str, rows: Sequence[Sample]) -> None:
        now = {s.key for s in rows}
        for key in self.kept - now:
            self.dropped_at[key] = name
        self.kept &= now

    def report(self, train: Sequence[Sample], heldout: Sequence[Sample]) -> dict[str, Any]:
        in_train, in_heldout = {s.key for s in train}, {s.key for s in heldout}
        out: dict[str, Any] = {}
        for key, origin in sorted(self.origin.items()):
            entry = out.setdefault(origin, {"offered": 0, "train": 0, "heldout": 0, "dropped": {}})
            entry["offered"] += 1
            if key in in_train:
                entry["train"] += 1
            elif key in in_heldout:
                entry["heldout"] += 1
            elif key in self.dropped_at:
                step = self.dropped_at[key]
                entry["dropped"][step] = entry["dropped"].get(step, 0) + 1
        return out


def label_yield(store: Store, sources: SourceTracker, used: set[str]) -> dict[str, Any]:
    """What became of the failures people labelled that are still problem samples: how many ended in the
    snapshot's rows and, for the rest, why not (the failure's status and the corrector's reason, or the
    snapshot step that dropped the row). Labels that confirmed an answer ("fine") are counted apart:
    they are positives, not fixes. Labelled samples that graduated in an earlier cycle are left out:
    a model already learned them, and the replay mix draws only some of them back."""
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import labels as label_repo

    with store.engine.connect() as conn:
        rows = label_repo.labelled_failures(conn, tier=str(SampleTier.PROBLEM))
        references = latest_labels(conn, [fid for fid, _ in rows])
        stuck = [fid for fid, status in rows if status in (str(FailureStatus.UNCORRECTABLE), str(FailureStatus.CORRECTED))]
        reasons = {
            fid: "; ".join((c.verification.reasons if c.verification else [])[:1])
            for fid, c in failure_repo.newest_corrections(conn, stuck).items()
        }
    report: dict[str, Any] = {"labelled": 0, "used": 0, "confirmed_fine": 0, "fine_used": 0, "left_out": {}}
    for fid, status in rows:
        reference = references.get(fid)
        fine = status == str(FailureStatus.NOT_FAILURE)
        report["confirmed_fine" if fine else "labelled"] += 1
        if fid in used:
            report["fine_used" if fine else "used"] += 1
            continue
        if fine:
            continue
        if fid in sources.dropped_at:
            why = f"dropped by the snapshot step {sources.dropped_at[fid]}"
        elif fid in reasons:
            why = f"{status}: {_generic(reasons[fid])}"
        else:
            why = f"status {status}" + (" (a label with no intent)" if reference is not None and not reference.intent else "")
        report["left_out"][why] = report["left_out"].get(why, 0) + 1
    report["yield"] = round(report["used"] / report["labelled"], 4) if report["labelled"] else None
    report["left_out"] = dict(sorted(report["left_out"].items(), key=lambda kv: -kv[1]))
    return report


def _generic(reason: str) -> str:
    """A corrector's reason with the intent name taken out, so equal reasons count together."""
    return re.sub(r"'[^']*'", "'…'", reason)[:200]


def _refuse_low_label_yield(report: dict[str, Any], ds: Any) -> None:
    labelled, used = report["labelled"], report["used"]
    if labelled < ds.label_yield_min_labels or used >= ds.min_label_yield * labelled:
        return
    why = "; ".join(f"{n} {reason}" for reason, n in list(report["left_out"].items())[:4])
    raise UserInputError(
        f"only {used} of the {labelled} failures people labelled became training rows (dataset.min_label_yield is "
        f"{ds.min_label_yield:.0%}): {why}. Correct them first (`flywheel judge && flywheel correct`), give answers in the "
        "labels, or add the missing replies to the knowledge base"
    )


def _weight_summary(train: Sequence[Sample], weights: Sequence[float], ds: Any) -> dict[str, Any]:
    by_category: dict[str, float] = {}
    for s, w in zip(train, weights):
        by_category[s.category] = round(by_category.get(s.category, 0.0) + w, 6)
    return {
        "loss_weights": dict(ds.loss_weights),
        "tier_weights": dict(ds.tier_weights),
        "formula": "loss_weights[category] * tier_weights[tier] * failure.weight (1.0 for a name not listed)",
        "mean": round(sum(weights) / len(weights), 6) if weights else 0.0,
        "min": min(weights, default=0.0),
        "max": max(weights, default=0.0),
        "total_by_category": dict(sorted(by_category.items())),
    }


# --- files and the store ------------------------------------------------------------------------------------


def _write_split(folder: Path, split: str, rows: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = folder / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), target)
    else:
        target = folder / f"{split}.jsonl"
        target.write_bytes(_canonical(rows))
    return {"name": target.name, "rows": len(rows), "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}


def _format(settings: Settings, warnings: list[str]) -> str:
    if settings.dataset.format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401 - only checks that pyarrow is installed
        except ImportError:
            warnings.append("dataset.format is parquet but pyarrow is not installed; wrote JSONL")
            return "jsonl"
    return settings.dataset.format


def _persist(
    ctx: Context,
    snapshot_id: str,
    kind: str,
    content_hash: str,
    manifest: dict[str, Any],
    train: list[dict[str, Any]],
    heldout: list[dict[str, Any]],
) -> Snapshot:
    root = ctx.settings.artifacts_path / "datasets"
    final = root / snapshot_id
    if not (final / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            fmt = _format(ctx.settings, manifest["warnings"])
            manifest["created_at"] = utcnow().isoformat()
            manifest["files"] = {
                "train": _write_split(staging, "train", train, fmt),
                "heldout": _write_split(staging, "heldout", heldout, fmt),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
            try:
                staging.rename(final)  # atomic: a reader sees no folder or a complete one
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                # another build of the same state finished first; theirs is checked below
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    existing = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
    if existing.get("content_hash") != content_hash:
        raise InfrastructureError(
            f"dataset folder {final} holds content {existing.get('content_hash')}, not {content_hash}; refusing to overwrite it"
        )
    snapshot = Snapshot(id=snapshot_id, kind=kind, path=str(final), content_hash=content_hash, manifest=existing)
    return _record(ctx.store, snapshot)


def _record(store: Store, snapshot: Snapshot) -> Snapshot:
    dataset_repo.insert_if_new(store, {**snapshot.model_dump(exclude={"created_at"}), "created_at": utcnow()})
    return get_snapshot(store, snapshot.id)


def list_snapshots(store: Store, kind: str | None = None) -> list[Snapshot]:
    """Every recorded snapshot, newest first."""
    return [Snapshot.model_validate(row) for row in dataset_repo.list_all(store, kind)]


def get_snapshot(store: Store, snapshot_id: str) -> Snapshot:
    row = dataset_repo.find(store, snapshot_id)
    if row is None:
        raise NotFoundError(f"no dataset snapshot with id {snapshot_id!r}")
    return Snapshot.model_validate(row)


def read_rows(snapshot: Snapshot, split: str = "train") -> list[dict[str, Any]]:
    """The rows of one split, from JSONL or Parquet. Parquet fills absent keys with None; they are dropped
    from messages again so both formats read back the same."""
    path = snapshot.file(split)
    if not path.is_file():
        raise NotFoundError(f"dataset {snapshot.id}: {path} is missing")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        for row in rows:
            for key in ("messages", "prompt", "chosen", "rejected"):
                if key in row and row[key] is not None:
                    row[key] = [{k: v for k, v in m.items() if v is not None} for m in row[key]]
        return rows
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
