"""Against forgetting (`train.anchor`): a penalty that pulls the trainable weights back to where the run started.

    penalty = anchor_strength / 2 * sum_i w_i * (theta_i - theta0_i)^2

over the trainable parameters only (the LoRA matrices and the modules trained in full, PEFT's
modules_to_save). theta0 is their value when training starts: a fresh adapter's initialisation (LoRA B is
zero, so the adapter starts as a no-op) and the base model's own embedding and output layer. Each run
starts from the base model and a fresh adapter, so this is the distance from the serving champion's base.

- "l2": w_i = 1 (L2-SP).
- "ewc": w_i is the diagonal Fisher information of the replay rows (rows of a baseline tier or production
  replay: what the model already does right and must keep), estimated at theta0 as the mean squared
  gradient of each row's answer loss (the empirical Fisher), then divided by its mean over all weights so
  that `anchor_strength` means the same for "l2" and "ewc". A weight the replay rows do not depend on
  moves freely; one they depend on is held. (LoRA A gets no Fisher at theta0 because B is zero there:
  A is free, B, which carries the update, is held.)

The penalty is 0 at the first step, grows as the weights move, and is logged as `anchor_penalty`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flywheel.trainer.rowloss import row_nll, tokenize

ANCHORS = ("none", "l2", "ewc")


class Anchor:
    """The starting values of the trainable parameters (and their EWC weights), and the penalty."""

    def __init__(self, model: Any, strength: float, fisher: list[torch.Tensor] | None = None):
        # Held by reference: a resumed run loads its checkpoint into these same tensors, in place.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.strength = strength
        self.fisher = fisher
        if fisher is not None and len(fisher) != len(self.params):
            raise ValueError("one Fisher tensor per trainable parameter")

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.start[0].device if self.start else "cpu")
        for index, (param, start) in enumerate(zip(self.params, self.start)):
            delta = (param - start).float()
            squared = delta * delta
            total = total + (squared * self.fisher[index] if self.fisher is not None else squared).sum()
        return self.strength / 2 * total


def fisher_diagonal(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int) -> list[torch.Tensor]:
    """The empirical Fisher of `examples` at the model's current weights, one tensor per trainable parameter,
    normalised to mean 1 over all trainable weights. One backward pass per row (per-row gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it serves
    try:
        for example in examples:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                row_nll(model, *tokenize(tokenizer, example, max_length)).backward()
            for total, param in zip(sums, params):
                if param.grad is not None:
                    total += param.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    count = sum(t.numel() for t in sums)
    mean = sum(float(t.sum()) for t in sums) / max(count, 1) / max(len(examples), 1)
    if mean <= 0:
        raise ValueError("the replay rows give no gradient: the Fisher estimate is zero everywhere")
    return [t / len(examples) / mean for t in sums]


def replay_examples(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a baseline tier or production replay: every tier but "problem" (new fixes). A row without a
    tier (a hand-written snapshot) is not known to be replay."""
    return [e for e in examples if e.get("tier") and e.get("tier") != "problem"]


def build(
    kind: str, strength: float, model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int, fisher_rows: int
) -> Anchor | None:
    """The anchor a spec asks for, set at the model's current (starting) weights. Raises ValueError when EWC
    finds no replay row to estimate the Fisher on."""
    if kind == "none":
        return None
    if kind == "l2":
        return Anchor(model, strength)
    if kind != "ewc":
        raise ValueError(f"unknown anchor {kind!r}; expected one of {', '.join(ANCHORS)}")
    replay = replay_examples(examples)
    if not replay:
        raise ValueError(
            "anchor ewc estimates the Fisher information on the snapshot's replay rows (tier other than problem), and it has none"
        )
    # An even spread over the replay rows (the snapshot's order is already shuffled), at most fisher_rows.
    step = max(1, len(replay) // fisher_rows)
    return Anchor(model, strength, fisher_diagonal(model, tokenizer, replay[::step][:fisher_rows], max_length))
