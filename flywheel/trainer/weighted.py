"""TRL trainers that weight each sample's loss by the row's `weight` column, and carry the training recipes.

The dataset builder gives every row a loss weight (safety failures count more than format slips, core
baseline samples more than candidates). Repeating rows would approximate that but skews the epoch count
and the held-out split, so the weight is applied in the loss instead:

- SFT: per-token negative log-likelihood over the completion tokens, averaged within each sample, times the
  sample's weight, averaged over the batch.
- DPO: the per-pair DPO loss (`train.dpo_loss_type`, TRL's formulas) times the pair's weight, averaged over the batch.
- KTO: TRL's per-example KTO loss times the example's weight (TRL's desirable/undesirable weights, per example).

The recipes of [train] (docs/learning.md, "Training recipes") live here too: `focal_gamma` in the SFT loss,
the anchor penalty (flywheel.trainer.anchor) added to every method's training loss, and the curriculum's
fixed row order (the train sampler below).

TRL 1.16 drops columns the model does not take and its collators ignore extra keys, so both trainers keep
`weight` among the signature columns and wrap the collator to carry it into the batch as a tensor.
Both use TRL's fused LM head (`fused_lm_head=True`), which returns per-token log-probabilities without
building the full logits, exactly as the parent trainers do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from torch.utils.data import Sampler, SequentialSampler
from transformers import Trainer
from trl import DPOTrainer, KTOTrainer, SFTTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from flywheel.trainer.anchor import Anchor

WEIGHT = "weight"
# The DPO loss types implemented below with per-pair weights; each is TRL's formula of the same name
# (tests/test_train_recipes.py checks them against TRL's own loss). TRL's others either mix pairs across the
# batch (aot), need more settings (discopop, exo_pair) or are not preference losses (sft).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "sigmoid_norm")


class WeightCollator:
    """Wrap a TRL collator: take each example's weight out, collate the rest, add the weights as a tensor."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [float(example.get(WEIGHT, 1.0)) for example in examples]
        batch = self.inner([{k: v for k, v in example.items() if k != WEIGHT} for example in examples])
        batch[WEIGHT] = torch.tensor(weights, dtype=torch.float32)
        return batch


def weighted_sequence_nll(
    token_logps: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor, focal_gamma: float = 0.0
) -> torch.Tensor:
    """Mean over samples of weight x (mean NLL over that sample's trained tokens).

    With `focal_gamma` > 0 each token's NLL is multiplied by (1 - p)^gamma, p the probability the model gives
    the right token (focal loss): tokens the model already predicts well count less, so the rows it gets
    wrong (the long tail of rare intents) weigh more, on top of the row's own weight.

    `token_logps` is zero where `token_mask` is false (TRL's fused head gives it so). A sample without any
    trained token contributes zero rather than 0/0."""
    mask = token_mask.to(token_logps.dtype)
    token_nll = -token_logps
    if focal_gamma > 0:
        token_nll = token_nll * (1 - token_logps.exp()).clamp(min=0) ** focal_gamma
    per_sample = (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (per_sample * weights.to(per_sample.dtype)).mean()


def dpo_pair_losses(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each pair's DPO loss of `loss_type`, as TRL 1.16's DPOTrainer computes it (reverse KL)."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):  # both per answer token: the length would scale the loss
        assert chosen_tokens is not None and rejected_tokens is not None
        avg = chosen_logratios / chosen_tokens.clamp(min=1.0) - rejected_logratios / rejected_tokens.clamp(min=1.0)
        return (avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * avg)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    raise ValueError(f"DPO loss type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")


def weighted_dpo_loss(delta: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
    """Sigmoid DPO: mean over pairs of weight x -log sigmoid(beta x (chosen log-ratio - rejected log-ratio))."""
    return (-F.logsigmoid(beta * delta) * weights.to(delta.dtype)).mean()


class _KeepsWeight(Trainer):
    """Keeps the `weight` column through Trainer's column pruning and into the batch, and holds what the three
    trainers share of the recipes (the curriculum's row order, the anchor penalty). A Trainer subclass for its
    types only: mixed in before the TRL trainer, it leaves the method order as it was."""

    # Trainer sets None in __init__ and the column list later; mypy infers its type from the None alone.
    _signature_columns: list[str] | None  # type: ignore[assignment]  # the type Trainer actually uses

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        assert self._signature_columns is not None  # the call above has just set them
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]

    def _wrap_collator(self) -> None:
        if not isinstance(self.data_collator, WeightCollator):
            self.data_collator = WeightCollator(self.data_collator)

    # The recipes; flywheel.trainer.recipes.make_trainer sets them after construction.
    anchor: Anchor | None = None
    curriculum: bool = False  # the train dataset is already in curriculum order: read it as it is

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        # Trainer draws a random permutation each epoch, which would undo the curriculum's easy -> hard order.
        # The order is taken here rather than through TrainingArguments.train_sampling_strategy because that
        # option is recent (transformers 5.x; the project accepts 4.56) and TRL's configs set their own default
        # for it (KTOConfig: sequential), so the curriculum would depend on which trainer and version run it.
        if self.curriculum:
            dataset: Any = train_dataset if train_dataset is not None else self.train_dataset  # a datasets.Dataset: sized
            return SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def _anchored(self, loss: torch.Tensor, mode: str) -> torch.Tensor:
        """The training loss plus the anchor penalty (training only: held-out losses stay comparable)."""
        if self.anchor is None or mode != "train":
            return loss
        penalty = self.anchor.penalty()
        self._metrics[mode]["anchor_penalty"].append(float(penalty.detach()))  # type: ignore[attr-defined]  # TRL trainers' metric lists
        return loss + penalty.to(loss.dtype)


class WeightedSFTTrainer(_KeepsWeight, SFTTrainer):
    # The loss below is a per-micro-batch mean, not normalised by `num_items_in_batch`, so Trainer must divide
    # it by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False  # type: ignore[assignment]  # TRL declares it as a bare None ("unset"); it reads a bool

    focal_gamma: float = 0.0  # set by make_trainer from train.focal_gamma

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wrap_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop(WEIGHT)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        # focal only where it trains: the held-out loss stays the plain weighted NLL, comparable across recipes
        gamma = self.focal_gamma if mode == "train" else 0.0
        loss = self._anchored(weighted_sequence_nll(outputs.log_probs, outputs.label_mask, weights, gamma), mode)

        # The same metrics the parent logs, so curves stay comparable with unweighted runs.
        num_valid = outputs.label_mask.sum()
        if num_valid > 0:
            self._metrics[mode]["entropy"].append((outputs.entropy.detach().sum() / num_valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((outputs.is_top1.sum() / num_valid).item())
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


class WeightedDPOTrainer(_KeepsWeight, DPOTrainer):
    """DPO with per-pair weights, one loss type of DPO_LOSS_TYPES. The reference is the base model with the
    adapter switched off, as in TRL's own PEFT path; precomputed reference log-probs are used when present."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if len(self.loss_types) != 1 or self.loss_types[0] not in DPO_LOSS_TYPES:
            raise ValueError(f"WeightedDPOTrainer implements one loss type of {', '.join(DPO_LOSS_TYPES)}, not {self.loss_types}")
        if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl" or self.use_weighting:
            raise ValueError("WeightedDPOTrainer implements reverse-KL DPO without LD-DPO or WPO weighting only")
        self._wrap_collator()

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop(WEIGHT)
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        seq_len = completion_mask.size(1) - 1

        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                if is_peft_model(self.model) and self.ref_model is None:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        ref_outputs = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
                else:
                    ref_outputs = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
            ref_chosen, ref_rejected = ref_outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

        chosen_logratios = chosen_logps - ref_chosen
        rejected_logratios = rejected_logps - ref_rejected
        chosen_tokens, rejected_tokens = completion_mask.sum(dim=1).chunk(2, dim=0)
        per_pair = dpo_pair_losses(
            self.loss_types[0],
            chosen_logratios,
            rejected_logratios,
            self.beta,
            label_smoothing=self.label_smoothing,
            chosen_tokens=chosen_tokens.to(chosen_logratios.dtype),
            rejected_tokens=rejected_tokens.to(chosen_logratios.dtype),
        )
        loss = self._anchored((per_pair * weights.to(per_pair.dtype)).mean(), mode)

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(chosen_logps.detach().mean().item())
        metrics["logps/rejected"].append(rejected_logps.detach().mean().item())
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum().item())
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


class WeightedKTOTrainer(_KeepsWeight, KTOTrainer):
    """TRL's KTO with per-example weights. TRL multiplies each desirable example's loss by `desirable_weight`
    and each undesirable one's by `undesirable_weight` and averages them; for one batch those two become
    tensors, the configured factor times each example's weight, so the rest of TRL's loss stays as it is.
    TRL reads the rows in order (its KL estimate pairs each prompt with its batch neighbour's answer), so
    flywheel.trainer.recipes shuffles them once, with the run's seed, unless a curriculum orders them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wrap_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop(WEIGHT).to(self.accelerator.device)
        labels = torch.as_tensor(inputs["label"], dtype=torch.bool, device=weights.device)
        desirable, undesirable = self.desirable_weight, self.undesirable_weight
        self.desirable_weight, self.undesirable_weight = desirable * weights[labels], undesirable * weights[~labels]
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self.desirable_weight, self.undesirable_weight = desirable, undesirable
        if return_outputs:
            loss, outputs = result
            return self._anchored(loss, mode), outputs
        return self._anchored(result, mode)
