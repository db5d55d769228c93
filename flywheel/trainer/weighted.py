"""TRL trainers that weight each sample's loss by the row's `weight` column.

The dataset builder gives every row a loss weight (safety failures count more than format slips, core
baseline samples more than candidates). Repeating rows would approximate that but skews the epoch count
and the held-out split, so the weight is applied in the loss instead:

- SFT: per-token negative log-likelihood over the completion tokens, averaged within each sample, times the
  sample's weight, averaged over the batch.
- DPO: the per-pair sigmoid DPO loss times the pair's weight, averaged over the batch.

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
from transformers import Trainer
from trl import DPOTrainer, SFTTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

WEIGHT = "weight"


class WeightCollator:
    """Wrap a TRL collator: take each example's weight out, collate the rest, add the weights as a tensor."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [float(example.get(WEIGHT, 1.0)) for example in examples]
        batch = self.inner([{k: v for k, v in example.items() if k != WEIGHT} for example in examples])
        batch[WEIGHT] = torch.tensor(weights, dtype=torch.float32)
        return batch


def weighted_sequence_nll(token_logps: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of weight x (mean NLL over that sample's trained tokens).

    `token_logps` is zero where `token_mask` is false (TRL's fused head gives it so). A sample without any
    trained token contributes zero rather than 0/0."""
    mask = token_mask.to(token_logps.dtype)
    per_sample = -(token_logps * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (per_sample * weights.to(per_sample.dtype)).mean()


def weighted_dpo_loss(delta: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
    """Sigmoid DPO: mean over pairs of weight x -log sigmoid(beta x (chosen log-ratio - rejected log-ratio))."""
    return (-F.logsigmoid(beta * delta) * weights.to(delta.dtype)).mean()


class _KeepsWeight(Trainer):
    """Keeps the `weight` column through Trainer's column pruning and into the batch. A Trainer subclass for
    its types only: mixed in before the TRL trainer, it leaves the method order as it was."""

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


class WeightedSFTTrainer(_KeepsWeight, SFTTrainer):
    # The loss below is a per-micro-batch mean, not normalised by `num_items_in_batch`, so Trainer must divide
    # it by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False  # type: ignore[assignment]  # TRL declares it as a bare None ("unset"); it reads a bool

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wrap_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.pop(WEIGHT)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        loss = weighted_sequence_nll(outputs.log_probs, outputs.label_mask, weights)

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
    """Sigmoid-loss DPO (the standard one) with per-pair weights. The reference is the base model with the
    adapter switched off, as in TRL's own PEFT path; precomputed reference log-probs are used when present."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if list(self.loss_types) != ["sigmoid"] or self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError("WeightedDPOTrainer implements the sigmoid loss with reverse-KL only")
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
        loss = weighted_dpo_loss(chosen_logratios - rejected_logratios, self.beta, weights)

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
