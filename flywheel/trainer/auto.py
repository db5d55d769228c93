"""AutoSFT: profile a dataset snapshot and pick the LoRA rank, learning rate, epochs and batch size.

`flywheel train --auto` reads the snapshot's train split (`profile`), applies the rules below
(`choose`) and trains with the chosen settings exactly as `flywheel train` does. The rules start from the
[train] settings (the learning rate stays the one measured for this model, scaled) and run before
flywheel.trainer.sizing, whose two rules still apply on top: `modules_to_save = "auto"`, and enough
epochs for `min_steps` optimizer steps, never beyond `max_epochs`. Nothing here overrides those.

| parameter | rule | why |
| --- | --- | --- |
| lora_r | train rows <= 1,000: 8; <= 10,000: 16; more: 32 | capacity follows how much there is to learn; at 590 rows r=64 did worse than r=16 (trainer.sizing) |
| lora_alpha | lora_r x (train.lora_alpha / train.lora_r) | the update's scale alpha/r stays what the settings chose |
| batch_size | train rows <= 1,000: 8; <= 10,000: 16; more: 32 | few rows need more optimizer steps per epoch; many rows afford a steadier gradient |
| batch_size | halve (doubling grad_accum) while batch_size x p95 tokens > 8,192 | bounds a micro-batch's activations; the effective batch stays |
| learning_rate | train.learning_rate x sqrt(effective batch / the settings' effective batch) | Adam's square-root scaling keeps the noise of a step as the batch changes |
| learning_rate | x 0.25 for a preference method (dpo, kto) | the preference loss moves the policy through a log-ratio to the reference and overshoots at SFT's rate |
| learning_rate | x 0.5 when new problem rows are under 20% of the rows | a replay-heavy snapshot mostly rehearses what the champion does; smaller steps keep it there |
| epochs | train.epochs, +1 when intents are skewed (max/min share >= 10 or Gini >= 0.5) | the rarest intent's rows are seen that many times less per epoch |
| epochs | +1 when new problem rows are under 20% of the rows | the few new rows get another pass (at the halved rate above) |
| epochs | at most train.max_epochs; then trainer.sizing raises it for min_steps | early stopping on the held-out split still ends a run that starts to over-fit |

None of these was measured against the fixed settings yet: they are written down so that they can be.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import UserInputError
from flywheel.records import Record
from flywheel.settings_sections import TrainSettings
from flywheel.trainer.examples import read_manifest, split_file

# The thresholds of the rules (the module docstring's table, in code).
SIZE_TIERS = ((1_000, 8, 8), (10_000, 16, 16))  # (at most these train rows, lora_r, batch_size)
LARGE = (32, 32)  # lora_r, batch_size above the last tier
TOKEN_BUDGET = 8_192  # batch_size x p95 tokens per micro-batch
PREFERENCE_LR_FACTOR = 0.25
REPLAY_HEAVY_NEW_SHARE = 0.2
REPLAY_HEAVY_LR_FACTOR = 0.5
SKEW_RATIO = 10.0
SKEW_GINI = 0.5
NEW_TIER = "problem"  # the tier of rows built from this cycle's failures; every other tier is replay

CountTokens = Callable[[list[str]], list[int]]


class SnapshotProfile(Record):
    """What the rules read from a snapshot's train split."""

    dataset_dir: str
    method: str
    rows: int
    heldout_rows: int
    tokens_p50: int
    tokens_p95: int
    tokens_max: int
    token_counter: str  # "tokenizer" (the base model's) or "whitespace" (when it could not be loaded)
    over_max_length: float  # share of rows longer than train.max_length (they are truncated)
    intents: int
    intent_max_share: float
    intent_min_share: float
    intent_ratio: float  # max share / min share
    intent_gini: float  # 0: every intent as frequent; towards 1: a few intents hold the rows
    new_share: float  # rows of the "problem" tier: this cycle's corrected failures
    tiers: dict[str, int]

    @property
    def skewed(self) -> bool:
        return self.intents > 1 and (self.intent_ratio >= SKEW_RATIO or self.intent_gini >= SKEW_GINI)

    @property
    def replay_heavy(self) -> bool:
        return self.new_share < REPLAY_HEAVY_NEW_SHARE


class Choice(Record):
    """One rule that set a value, with why."""

    parameter: str
    value: float
    reason: str


class AutoChoice(Record):
    profile: SnapshotProfile
    lora_r: int
    lora_alpha: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    epochs: float
    choices: list[Choice]

    def apply(self, train: TrainSettings) -> TrainSettings:
        """The settings `flywheel train` runs with: the [train] section with the chosen values."""
        return train.model_copy(
            update={
                "lora_r": self.lora_r,
                "lora_alpha": self.lora_alpha,
                "batch_size": self.batch_size,
                "grad_accum": self.grad_accum,
                "learning_rate": self.learning_rate,
                "epochs": self.epochs,
            }
        )

    def notes(self) -> list[str]:
        return [f"auto {c.parameter} {c.value:g}: {c.reason}" for c in self.choices]


# --- the profile ------------------------------------------------------------------------------------------


def whitespace_tokens(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def tokenizer_counter(base_model: Path) -> tuple[CountTokens, str]:
    """The base model's tokenizer as a counter; whitespace words when it cannot be loaded offline."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
    except (OSError, ValueError):
        return whitespace_tokens, "whitespace"
    return (lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]), "tokenizer"


def _rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [r for r in pq.read_table(path).to_pylist() if isinstance(r, dict)]
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the trainer skips it too, and says where
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _contents(messages: Any) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    if not isinstance(messages, list):
        return []
    return [str(m.get("content") or "") for m in messages if isinstance(m, dict)]


def row_text(row: dict[str, Any]) -> str:
    """The text one training sequence holds: an SFT row's messages; a preference row's prompt and its
    longer answer (chosen, rejected or completion). Role markers of the chat template are not counted."""
    if "messages" in row:
        return "\n".join(_contents(row["messages"]))
    answers = ["\n".join(_contents(row.get(key))) for key in ("chosen", "rejected", "completion")]
    return "\n".join([*_contents(row.get("prompt")), max(answers, key=len)])


def _quantile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)] if sorted_values else 0


def gini(counts: list[int]) -> float:
    """Gini coefficient of the counts: 0 when all are equal, (n-1)/n when one holds everything."""
    values, total = sorted(counts), sum(counts)
    if len(values) < 2 or total == 0:
        return 0.0
    ranked = sum((i + 1) * v for i, v in enumerate(values))
    return 2 * ranked / (len(values) * total) - (len(values) + 1) / len(values)


def profile(
    dataset_dir: Path, train: TrainSettings, method: str | None = None, count: tuple[CountTokens, str] | None = None
) -> SnapshotProfile:
    """The profile of the snapshot at `dataset_dir` (its train split), for the method it trains with."""
    train_path = split_file(dataset_dir, "train")
    if train_path is None:
        raise UserInputError(f"dataset snapshot {dataset_dir} has no train.jsonl or train.parquet")
    rows = _rows(train_path)
    if not rows:
        raise UserInputError(f"{train_path}: no rows to profile")
    heldout_path = split_file(dataset_dir, "heldout")
    counter, counter_name = count or (whitespace_tokens, "whitespace")
    lengths = sorted(counter([row_text(r) for r in rows]))
    intents = Counter(str(r["intent"]) for r in rows if r.get("intent"))
    shares = [n / sum(intents.values()) for n in intents.values()]
    tiers = Counter(str(r.get("tier") or "none") for r in rows)
    return SnapshotProfile(
        dataset_dir=str(dataset_dir),
        # as flywheel.trainer.recipes.build_spec picks it
        method=method or ("kto" if train.method == "kto" else None) or str(read_manifest(dataset_dir).get("kind") or train.method),
        rows=len(rows),
        heldout_rows=len(_rows(heldout_path)) if heldout_path else 0,
        tokens_p50=_quantile(lengths, 0.5),
        tokens_p95=_quantile(lengths, 0.95),
        tokens_max=lengths[-1],
        token_counter=counter_name,
        over_max_length=round(sum(n > train.max_length for n in lengths) / len(lengths), 4),
        intents=len(intents),
        intent_max_share=round(max(shares, default=0.0), 4),
        intent_min_share=round(min(shares, default=0.0), 4),
        intent_ratio=round(max(shares) / min(shares), 2) if shares else 0.0,
        intent_gini=round(gini(list(intents.values())), 4),
        new_share=round(tiers.get(NEW_TIER, 0) / len(rows), 4),
        tiers=dict(sorted(tiers.items())),
    )


# --- the rules --------------------------------------------------------------------------------------------


def choose(p: SnapshotProfile, train: TrainSettings) -> AutoChoice:
    """The rules of the module docstring, in its table's order; each value set says why."""
    choices: list[Choice] = []

    def chose(parameter: str, value: float, reason: str) -> None:
        choices.append(Choice(parameter=parameter, value=value, reason=reason))

    tier = next(((limit, r, b) for limit, r, b in SIZE_TIERS if p.rows <= limit), None)
    rank, batch = (tier[1], tier[2]) if tier else LARGE
    size = f"{p.rows:,} train rows (<= {tier[0]:,})" if tier else f"{p.rows:,} train rows (> {SIZE_TIERS[-1][0]:,})"
    chose("lora_r", rank, f"{size}: rank {rank}")
    alpha = max(1, round(rank * train.lora_alpha / train.lora_r))
    chose("lora_alpha", alpha, f"alpha/r kept at the settings' {train.lora_alpha}/{train.lora_r}")
    chose("batch_size", batch, f"{size}: batch {batch}")
    accum = train.grad_accum
    longest = min(p.tokens_p95, train.max_length)
    while batch > 1 and batch * longest > TOKEN_BUDGET:
        batch, accum = batch // 2, accum * 2
    if accum != train.grad_accum:
        chose(
            "batch_size", batch, f"p95 length {longest} tokens: micro-batch {batch} x grad_accum {accum} keeps <= {TOKEN_BUDGET:,} tokens"
        )
        chose("grad_accum", accum, "the effective batch stays")

    configured = train.batch_size * train.grad_accum
    lr = train.learning_rate * math.sqrt(batch * accum / configured)
    chose("learning_rate", lr, f"train.learning_rate {train.learning_rate:g} x sqrt(effective batch {batch * accum} / {configured})")
    if p.method != "sft":
        lr *= PREFERENCE_LR_FACTOR
        chose("learning_rate", lr, f"{p.method} is a preference method: x {PREFERENCE_LR_FACTOR:g}")
    if p.replay_heavy:
        lr *= REPLAY_HEAVY_LR_FACTOR
        chose("learning_rate", lr, f"new problem rows are {p.new_share:.0%} (< {REPLAY_HEAVY_NEW_SHARE:.0%}): x {REPLAY_HEAVY_LR_FACTOR:g}")

    epochs = train.epochs
    chose("epochs", epochs, f"train.epochs {train.epochs:g}")
    if p.skewed:
        epochs += 1
        chose("epochs", epochs, f"intents skewed (max/min share {p.intent_ratio:g}, Gini {p.intent_gini:.2f}): +1")
    if p.replay_heavy:
        epochs += 1
        chose("epochs", epochs, f"new problem rows are {p.new_share:.0%}: +1 pass over them")
    if epochs > train.max_epochs:
        epochs = train.max_epochs
        chose("epochs", epochs, f"at most train.max_epochs {train.max_epochs:g}")
    return AutoChoice(
        profile=p,
        lora_r=rank,
        lora_alpha=alpha,
        batch_size=batch,
        grad_accum=accum,
        learning_rate=float(f"{lr:.3g}"),
        epochs=epochs,
        choices=choices,
    )
