"""The loss of each training row's answer under a model: what the curriculum sorts by and EWC's Fisher reads.

A row here is a training example as flywheel.trainer.examples builds it (SFT and KTO: `prompt` and
`completion`; DPO: `prompt` and `chosen`); its answer is the completion or the chosen answer. The loss is
the mean negative log-likelihood of the answer's tokens given the prompt, tokenized the way TRL does it
(the chat template of the prompt with the generation prompt, then of prompt + answer; the answer is what
the second adds), so a row scores what training on it would see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def answer_text(example: dict[str, Any]) -> str:
    """The answer a row trains towards: the completion (SFT, KTO) or the chosen answer (DPO)."""
    messages = example.get("completion") or example.get("chosen") or []
    return str(messages[-1]["content"]) if messages else ""


def tokenize(tokenizer: Any, example: dict[str, Any], max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer (cut to max_length) and where the answer starts."""
    prompt = list(example["prompt"])
    answer = list(example.get("completion") or example.get("chosen") or [])
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    full_ids = list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=False))
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids[:max_length], min(start, max_length)


def row_nll(model: Any, ids: list[int], start: int) -> torch.Tensor:
    """Mean NLL of the tokens from `start` on, as a tensor that keeps its graph (EWC differentiates it).
    A row whose answer was cut away entirely by max_length scores 0."""
    start = max(start, 1)  # the first token has no prediction
    if start >= len(ids):
        return torch.zeros((), device=_device(model))
    input_ids = torch.tensor([ids], device=_device(model))
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, :-1].float()
    targets = input_ids[0, 1:]
    token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return token_nll[start - 1 :].mean()


def answer_losses(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int) -> list[float]:
    """Each row's answer loss under `model`, without gradients, in evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [float(row_nll(model, *tokenize(tokenizer, example, max_length))) for example in examples]
    finally:
        model.train(was_training)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
