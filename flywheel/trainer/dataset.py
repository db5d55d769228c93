"""Dataset snapshots: verified corrections (and replay rows) turned into a balanced, versioned training set.

`build_snapshot(ctx, kind)` reads every failure with a verified correction, mixes new problem rows with
replay rows from the baseline tiers (and rows the caller supplies), applies the balancing rules of
`settings.dataset` (flywheel.trainer.balance, in the order listed there), splits off held-out rows and
writes an immutable folder:

    <artifacts>/datasets/<id>/train.jsonl    (or .parquet when dataset.format says so and pyarrow is installed)
                             heldout.jsonl
                             manifest.json   config, composition, weights, counts per step, content hash

The id is derived from the rows' content hash and the config, so building twice from the same state gives
the same snapshot, and a folder is never overwritten by different content. A row of table `datasets`
records it.

Rows the fixed test set (settings.eval.test_set) asks about are dropped from both splits: a row goes when
the normalised text of its user turns, or of its last user turn, equals a test row's. Normalising
(NFKC, case-folded, punctuation removed, whitespace collapsed) errs towards dropping: a near-copy of a
test prompt in training would make the test measure memory.

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
import unicodedata
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from sqlalchemy import and_, or_, select

from flywheel.context import Context
from flywheel.errors import InfrastructureError, NotFoundError, SettingsError, UserInputError
from flywheel.records import FailureStatus, Message, Record, SampleTier, Severity, stable_hash, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.trainer import balance as bal
from flywheel.trainer.balance import Ledger, Sample

Kind = Literal["sft", "dpo"]
KINDS: tuple[str, ...] = ("sft", "dpo")
SPLITS: tuple[str, ...] = ("train", "heldout")
NO_PROBLEM = "none"  # problem type of a replay row that never was a failure (a stable production sample)
PRODUCTION_REPLAY_PREFIX = "replay-"  # ids of the rows flywheel.trainer.replay offers
UNCATEGORISED = "uncategorised"


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


class ReplayRow(Record):
    """A row supplied by the caller (e.g. a stable production sample) to mix in as replay.

    `messages` is the conversation ending with the assistant answer to train on; `rejected` is a worse
    answer to the same prompt, needed only for DPO snapshots.
    """

    messages: list[Message] = Field(min_length=2)
    tier: SampleTier
    intent: str | None = None
    problem_type: str | None = None
    severity: Severity | None = None
    weight: float = Field(1.0, ge=0)
    rejected: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _ends_with_answer(self) -> "ReplayRow":
        last = self.messages[-1]
        if last.role != "assistant" or not (last.content or "").strip():
            raise ValueError("the last message must be the assistant answer to train on, with text")
        if not any(m.role == "user" for m in self.messages[:-1]):
            raise ValueError("no user message before the answer")
        return self


# --- prompts, the test set ----------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def prompt_keys(messages: Sequence[Message | dict[str, Any]]) -> tuple[str, str]:
    """(all user turns, last user turn), normalised: what the test-set filter and the split compare."""
    users = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
        if role == "user" and content:
            users.append(normalise_text(content))
    return "\n".join(users), (users[-1] if users else "")


def test_set_keys(settings: Settings) -> tuple[set[str], set[str], dict[str, Any] | None]:
    """Prompt keys of the fixed test set, and what the manifest says about it (None: none configured)."""
    if not settings.eval.test_set:
        return set(), set(), None
    from flywheel.evals.runner import load_test_set  # the one reader of the test set; strict on bad rows

    path = Path(settings.eval.test_set)
    path = path if path.is_absolute() else settings.project_dir / path
    items = load_test_set(path)
    groups, lasts = set(), set()
    for item in items:
        group, last = prompt_keys(item.messages)
        if group:
            groups.add(group)
        if last:
            lasts.add(last)
    return groups, lasts, {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "items": len(items)}


# --- samples ------------------------------------------------------------------------------------------------


def _prompt_and_answer(messages: list[Message]) -> tuple[list[Message], Message | None]:
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    return (messages[:last], messages[last]) if last is not None else (list(messages), None)


def _dump(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


def origin_of(tier: str, labelled: bool, generator: str) -> str:
    """What a store row was built from, for the manifest's per-source accounting."""
    if tier != str(SampleTier.PROBLEM):
        return "baseline"
    if labelled:
        return "label"
    for prefix, name in (("kb", "kb_correction"), ("reply:", "reply_correction"), ("llm:", "llm_correction")):
        if generator.startswith(prefix):
            return name
    return "correction"


def store_samples(store: Store, settings: Settings) -> list[Sample]:
    """One sample per failure with a verified correction: tier problem and status verified (new fixes),
    or a baseline tier (graduated samples, whatever their status). Intents come from a human label when
    one exists, else the failure, else the interaction.

    Also one positive sample per failure a person's label confirmed (status not_failure with a label:
    "fine", or the intent the answer gave): the logged answer itself, as the lowest replay tier (origin
    label_fine). A person checked it, so it protects what already works as well as any baseline row."""
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo
    from flywheel.store.schema import corrections, failures, labels, verdicts

    tax = settings.taxonomy
    query = select(failures).where(
        or_(
            and_(failures.c.tier == str(SampleTier.PROBLEM), failures.c.status == str(FailureStatus.VERIFIED)),
            failures.c.tier.in_([str(t) for t in SampleTier if t != SampleTier.PROBLEM]),
            and_(failures.c.status == str(FailureStatus.NOT_FAILURE), failures.c.id.in_(select(labels.c.failure_id))),
        )
    )
    out: list[Sample] = []
    with store.engine.connect() as conn:
        found = [failure_repo.failure_from_row(r) for r in conn.execute(query.order_by(failures.c.id))]
        interactions = interaction_repo.get_many(conn, [f.interaction_id for f in found])
        labelled = latest_labels(conn, [f.id for f in found])
        ids = [f.id for f in found]
        # Bulk versions of failure_repo.latest_correction(verified_only=True) / latest_verdict: two queries
        # per 500 failures instead of two per failure (8,000 failures: 12 s -> 3 s on SQLite here).
        corrected = _newest(conn, corrections, ids, corrections.c.verified.is_(True))
        judged = _newest(conn, verdicts, ids)
        for failure in found:
            interaction = interactions[failure.interaction_id]
            label = labelled.get(failure.id)
            prompt = interaction.prompt_messages()
            original = interaction.last_assistant()
            group, last = prompt_keys(prompt)
            if failure.status == FailureStatus.NOT_FAILURE and failure.tier == SampleTier.PROBLEM:
                if label is None or original is None or not (original.content or "").strip():
                    continue
                out.append(Sample(
                    key=failure.id, tier=str(SampleTier.CANDIDATE), intent=label.intent or failure.intent or interaction.intent or "unknown",
                    problem_type=NO_PROBLEM, severity=None, category=UNCATEGORISED, base_weight=failure.weight, prompt=_dump(prompt),
                    answer=original.content or "", rejected=None, group=group, last_user=last, origin="label_fine",
                ))
                continue
            correction = failure_repo.correction_from_row(corrected[failure.id]) if failure.id in corrected else None
            if correction is None or not correction.answer.strip():
                continue  # graduated without a verified answer: nothing to train on
            verdict = failure_repo.verdict_from_row(judged[failure.id]) if failure.id in judged else None
            problem_type = (verdict.problem_type if verdict else None) or "unknown"
            out.append(Sample(
                key=failure.id,
                tier=str(failure.tier),
                intent=(label.intent if label else None) or failure.intent or interaction.intent or "unknown",
                problem_type=problem_type,
                severity=(verdict.severity if verdict else None) or tax.default_severity.get(problem_type),
                category=tax.categories.get(problem_type, UNCATEGORISED),
                base_weight=failure.weight,
                prompt=_dump(prompt),
                answer=correction.answer,
                rejected=original.model_dump(exclude_none=True) if original is not None else None,
                group=group,
                last_user=last,
                origin=origin_of(str(failure.tier), label is not None and not label.fine, correction.generator),
            ))
    return out


def _newest(conn: Any, table: Any, failure_ids: Sequence[str], condition: Any = None) -> dict[str, Any]:
    """The newest row of `table` (verdicts or corrections) per failure id, optionally among rows meeting
    `condition`."""
    out: dict[str, Any] = {}
    for start in range(0, len(failure_ids), 500):
        query = select(table).where(table.c.failure_id.in_(list(failure_ids[start : start + 500])))
        if condition is not None:
            query = query.where(condition)
        for row in conn.execute(query.order_by(table.c.id)):
            out[row.failure_id] = row  # ascending ids: the newest is written last
    return out


def parse_replay_rows(items: Sequence[ReplayRow | dict[str, Any]], where: Sequence[str] | None = None) -> tuple[list[ReplayRow], list[str]]:
    """Validate caller rows; a bad one becomes `"<where>: what is wrong"` and the rest are kept."""
    good: list[ReplayRow] = []
    errors: list[str] = []
    for index, item in enumerate(items):
        place = where[index] if where else f"extra_rows[{index}]"
        try:
            good.append(item if isinstance(item, ReplayRow) else ReplayRow.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            errors.append(f"{place}: {key + ': ' if key else ''}{err['msg']}")
    return good, errors


def replay_samples(rows: Sequence[ReplayRow], settings: Settings) -> list[Sample]:
    tax = settings.taxonomy
    out: list[Sample] = []
    for row in rows:
        prompt, answer = _prompt_and_answer(row.messages)
        problem_type = row.problem_type or NO_PROBLEM
        group, last = prompt_keys(prompt)
        key = "x-" + (row.id or stable_hash(row.model_dump(mode="json", exclude_none=True), 16))
        origin = "production_replay" if (row.id or "").startswith(PRODUCTION_REPLAY_PREFIX) else "extra"
        out.append(Sample(
            key=key,
            tier=str(row.tier),
            intent=row.intent or "unknown",
            problem_type=problem_type,
            severity=row.severity or tax.default_severity.get(problem_type),
            category=tax.categories.get(problem_type, UNCATEGORISED),
            base_weight=row.weight,
            prompt=_dump(prompt),
            answer=(answer.content or "") if answer else "",
            rejected={"role": "assistant", "content": row.rejected} if row.rejected else None,
            group=group,
            last_user=last,
            source="extra",
            origin=origin,
        ))
    return out


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
    ctx: Context,
    kind: str = "sft",
    *,
    extra_rows: Sequence[ReplayRow | dict[str, Any]] | None = None,
    extra_errors: Sequence[str] = (),
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
        from flywheel.trainer.replay import stable_production_rows

        offered += stable_production_rows(ctx, ds.production_replay_rows)
    replay_rows, errors = parse_replay_rows(offered)
    errors = [*extra_errors, *errors]
    ledger.warnings.extend(f"extra row left out: {e}" for e in errors)
    from_store = store_samples(ctx.store, settings)
    samples = _dedupe(from_store + replay_samples(replay_rows, settings), ledger)
    test_groups, test_lasts, test_info = test_set_keys(settings)
    if test_info is None:
        ledger.warnings.append("no fixed test set configured (eval.test_set): overlap with it was not checked")
    sources = SourceTracker(samples)
    rows = _filter(samples, kind, test_groups, test_lasts, ledger)
    sources.step("test_set_or_pairing", rows)
    n_problems = sum(s.pool == bal.PROBLEM for s in rows)
    if n_problems == 0:
        raise UserInputError(
            f"no verified problem rows to build a {kind} dataset from ({sum(s.pool == bal.PROBLEM for s in samples)} before the test-set filter"
            + (" and DPO pairing" if kind == "dpo" else "") + "); judge and correct failures first"
        )

    seed = ds.seed
    rows = bal.cap_problem_types(rows, ds.problem_type_max_ratio, seed, ledger)
    sources.step("problem_type_cap", rows)
    rows = bal.oversample_rare_high_risk(rows, ds.oversample_severities, ds.oversample_target_ratio, ds.problem_type_max_ratio, ds.max_repeats, ledger)
    embed = ctx.index.embedder.embed if ds.replay_strategy == "boundary" else None
    rows = bal.mix_replay(rows, ds.replay_min_share, ds.replay_max_share, ds.replay_target_share, ds.tier_weights, seed, ledger, ds.replay_strategy, embed, ds.boundary_neighbours)
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
    """What became of the failures people labelled: how many ended in the snapshot's rows and, for the
    rest, why not (the failure's status and the corrector's reason, or the snapshot step that dropped
    the row). Labels that confirmed an answer ("fine") are counted apart: they are positives, not fixes."""
    from flywheel.data.labels import latest_labels
    from flywheel.store.schema import corrections, failures, labels

    with store.engine.connect() as conn:
        rows = list(conn.execute(select(failures.c.id, failures.c.status).where(failures.c.id.in_(select(labels.c.failure_id)))))
        references = latest_labels(conn, [r.id for r in rows])
        stuck = [r.id for r in rows if r.status in (str(FailureStatus.UNCORRECTABLE), str(FailureStatus.CORRECTED))]
        reasons: dict[str, str] = {}
        for start in range(0, len(stuck), 500):
            query = select(corrections.c.failure_id, corrections.c.verification).where(corrections.c.failure_id.in_(stuck[start : start + 500]))
            for c in conn.execute(query.order_by(corrections.c.id)):
                reasons[c.failure_id] = "; ".join((c.verification or {}).get("reasons", [])[:1])
    report: dict[str, Any] = {"labelled": 0, "used": 0, "confirmed_fine": 0, "fine_used": 0, "left_out": {}}
    for row in rows:
        reference = references.get(row.id)
        fine = row.status == str(FailureStatus.NOT_FAILURE)
        report["confirmed_fine" if fine else "labelled"] += 1
        if row.id in used:
            report["fine_used" if fine else "used"] += 1
            continue
        if fine:
            continue
        if row.id in sources.dropped_at:
            why = f"dropped by the snapshot step {sources.dropped_at[row.id]}"
        elif row.id in reasons:
            why = f"{row.status}: {_generic(reasons[row.id])}"
        else:
            why = f"status {row.status}" + (" (a label with no intent)" if reference is not None and not reference.intent else "")
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
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            warnings.append("dataset.format is parquet but pyarrow is not installed; wrote JSONL")
            return "jsonl"
    return settings.dataset.format


def _persist(ctx: Context, snapshot_id: str, kind: str, content_hash: str, manifest: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Snapshot:
    root = ctx.settings.artifacts_path / "datasets"
    final = root / snapshot_id
    if not (final / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            fmt = _format(ctx.settings, manifest["warnings"])
            manifest["created_at"] = utcnow().isoformat()
            manifest["files"] = {"train": _write_split(staging, "train", train, fmt), "heldout": _write_split(staging, "heldout", heldout, fmt)}
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
        raise InfrastructureError(f"dataset folder {final} holds content {existing.get('content_hash')}, not {content_hash}; refusing to overwrite it")
    snapshot = Snapshot(id=snapshot_id, kind=kind, path=str(final), content_hash=content_hash, manifest=existing)
    return _record(ctx.store, snapshot)


def _record(store: Store, snapshot: Snapshot) -> Snapshot:
    from sqlalchemy.dialects import postgresql, sqlite

    from flywheel.store.schema import datasets

    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    row = {**snapshot.model_dump(exclude={"created_at"}), "created_at": utcnow()}
    with store.begin() as conn:
        conn.execute(dialect.insert(datasets).values(**row).on_conflict_do_nothing(index_elements=["id"]))
    return get_snapshot(store, snapshot.id)


def list_snapshots(store: Store, kind: str | None = None) -> list[Snapshot]:
    """Every recorded snapshot, newest first."""
    from flywheel.store.schema import datasets

    query = select(datasets).order_by(datasets.c.created_at.desc(), datasets.c.id)
    if kind is not None:
        query = query.where(datasets.c.kind == kind)
    with store.engine.connect() as conn:
        return [Snapshot.model_validate(dict(r._mapping)) for r in conn.execute(query)]


def get_snapshot(store: Store, snapshot_id: str) -> Snapshot:
    from flywheel.store.schema import datasets

    with store.engine.connect() as conn:
        row = conn.execute(select(datasets).where(datasets.c.id == snapshot_id)).first()
    if row is None:
        raise NotFoundError(f"no dataset snapshot with id {snapshot_id!r}")
    return Snapshot.model_validate(dict(row._mapping))


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
