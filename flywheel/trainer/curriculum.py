"""Curriculum ordering (`train.curriculum`): training rows from easy to hard instead of shuffled.

- "champion_loss": easy is what the model the run starts from (the champion's base) already answers well:
  the mean loss of the row's answer under it (flywheel.trainer.rowloss), lowest first.
- "difficulty": a score that needs no model: rows of common intents before rare ones (an intent's rows in
  the train split), and within an intent shorter answers before longer ones.

Ties keep the snapshot's own order, which the builder shuffled with its seed. The order is the same every
epoch: the trainers read the rows in dataset order when a curriculum is set (flywheel.trainer.weighted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from flywheel.trainer.rowloss import answer_losses, answer_text

CURRICULA = ("none", "champion_loss", "difficulty")


def difficulty_scores(examples: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(minus the row's intent count, answer length): sorts common intents and short answers first. A row
    without an intent counts as its own intent of one row."""
    counts = Counter(e.get("intent") for e in examples if e.get("intent"))
    return [(-counts.get(e.get("intent"), 1) if e.get("intent") else -1, len(answer_text(e))) for e in examples]


def order(
    examples: Sequence[dict[str, Any]], curriculum: str, *, model: Any = None, tokenizer: Any = None, max_length: int = 256
) -> list[int]:
    """Indices of `examples` from easy to hard (the identity for "none")."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; expected one of {', '.join(CURRICULA)}")
    indices = list(range(len(examples)))
    if curriculum == "none":
        return indices
    if curriculum == "difficulty":
        scores: Sequence[Any] = difficulty_scores(examples)
    else:
        if model is None or tokenizer is None:
            raise ValueError("curriculum champion_loss needs the starting model and its tokenizer")
        scores = answer_losses(model, tokenizer, examples, max_length)
    return sorted(indices, key=lambda i: scores[i])  # stable: ties keep the snapshot's order
