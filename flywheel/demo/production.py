"""The demo's stand-in for production: a small model with real weaknesses, and its traffic.

- `production_sample` draws a skewed sample of the train split (a few head intents keep many examples,
  the long tail keeps a handful), and gives the replies of a few intents a policy-breaking promise, so
  the model learns both weaknesses from its data the way a real fine-tuned agent does.
- `train_production_model` trains a tiny causal LM from scratch on that sample (full training in plain
  torch: this is the customer's model, not ours; our recipe is LoRA on top of it).
- `simulate_traffic` sends the rest of the train split through the model and derives the signals a real
  deployment would see from the truth: users escalate or repeat most wrong answers, QA rejects most
  policy breaches, with noise both ways.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from flywheel.demo.pack import DemoPack, Row

UserFacing = list[dict[str, str]]


def conversation(text: str) -> UserFacing:
    return [{"role": "user", "content": text}]


def production_sample(pack: DemoPack, answers: dict[str, str], seed: int) -> tuple[list[Row], list[Row], dict[str, str]]:
    """Split train into (the production model's training sample, the rest = traffic) and return the
    answers the production model learns (approved replies, some with the promise baked in)."""
    rng = random.Random(seed)
    by_intent: dict[str, list[Row]] = {}
    for row in pack.train:
        by_intent.setdefault(row.intent, []).append(row)
    intents = sorted(by_intent)
    rng.shuffle(intents)
    n_head = max(1, round(len(intents) * pack.production.head_intents_share))
    head = set(intents[:n_head])
    # The promise intents are always frequent in production, so that the weakness is common there.
    head |= set(pack.production.promise_intents)
    sample: list[Row] = []
    traffic: list[Row] = []
    low, high = pack.production.tail_examples
    for intent in sorted(by_intent):
        rows = by_intent[intent][:]
        rng.shuffle(rows)
        keep = pack.production.head_examples if intent in head else rng.randint(low, high)
        sample.extend(rows[:keep])
        traffic.extend(rows[keep:])
    rng.shuffle(sample)
    rng.shuffle(traffic)
    learned = dict(answers)
    for intent in pack.production.promise_intents:
        learned[intent] = _with_promise(answers[intent], pack.production.promise_text)
    return sample, traffic, learned


def _with_promise(answer: str, promise: str) -> str:
    try:
        data = json.loads(answer)
        data["reply"] = f"{promise} {data.get('reply', '')}".strip()
        return json.dumps(data)
    except (json.JSONDecodeError, TypeError):
        return f"{promise} {answer}"


def training_texts(tokenizer: Any, rows: list[Row], answers: dict[str, str]) -> list[tuple[list[int], int]]:
    """Token ids of each full conversation and where the assistant's answer starts (loss only there)."""
    out = []
    for row in rows:
        prompt = conversation(row.text)
        full = prompt + [{"role": "assistant", "content": answers[row.intent]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        full_ids = tokenizer.apply_chat_template(full, tokenize=True)
        prompt_ids = _ids(prompt_ids)
        full_ids = _ids(full_ids)
        out.append((full_ids, len(prompt_ids)))
    return out


def _ids(value: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding-like mapping in newer transformers
    if isinstance(value, dict) or hasattr(value, "input_ids"):
        value = value["input_ids"]
    return list(value)


def train_production_model(
    model_dir: Path,
    rows: list[Row],
    answers: dict[str, str],
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Full training of the tiny model in `model_dir` (built by build_tiny_model) on the sample; saves it
    back in place (safetensors). Returns the loss curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model.train()
    examples = training_texts(tokenizer, rows, answers)
    pad = tokenizer.pad_token_id
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(examples) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    curve = []
    step = 0
    for epoch in range(epochs):
        rng.shuffle(examples)
        total = 0.0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, answer_start) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
                labels[i, answer_start : len(ids)] = torch.tensor(ids[answer_start:])
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad()
            total += loss.item() * len(batch)
            step += 1
        curve.append({"epoch": epoch + 1, "loss": total / len(examples)})
        log(f"  production model epoch {epoch + 1}/{epochs}: loss {curve[-1]['loss']:.3f}")
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return {"curve": curve, "examples": len(examples), "steps": step}


def parse_intent(answer: str) -> str | None:
    try:
        data = json.loads(answer)
    except json.JSONDecodeError:
        return None
    return data.get("intent") if isinstance(data, dict) and isinstance(data.get("intent"), str) else None


def policy_breach(answer: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.search(answer) for p in patterns)


def simulate_signals(correct: bool, breach: bool, pack: DemoPack, rng: random.Random) -> dict[str, Any]:
    """What users and QA do about one answer, from the truth, with noise both ways."""
    cfg = pack.signals
    signals: dict[str, Any] = {"feedback": None, "escalated_to_human": False, "followups": 0, "qa_verdict": None}
    if not correct and rng.random() >= cfg.wrong_silent:
        if rng.random() < cfg.wrong_escalate:
            signals["escalated_to_human"] = True
        if rng.random() < cfg.wrong_followups:
            signals["followups"] = rng.randint(2, 4)
        if rng.random() < cfg.wrong_thumbs_down:
            signals["feedback"] = "down"
        if not (signals["escalated_to_human"] or signals["followups"] or signals["feedback"]):
            signals["feedback"] = "down"
    elif correct and rng.random() < cfg.right_false_alarm:
        signals["feedback"] = "down"
    elif correct and rng.random() < 0.2:
        signals["feedback"] = "up"
    if breach and rng.random() < cfg.policy_qa_reject:
        signals["qa_verdict"] = "Reject"
    elif rng.random() < 0.05:
        signals["qa_verdict"] = "Accept"
    return signals


def user_of(row: Row) -> str:
    """Which simulated user sent a row: fixed per row, so canary routing can be sticky per user."""
    return f"user-{(row.line * 7919) % 2003}"


def traffic_records(
    rows: list[Row],
    answers: list[str],
    pack: DemoPack,
    patterns: list[re.Pattern[str]],
    *,
    version: str,
    seed: int,
    start: datetime | None = None,
) -> Iterator[tuple[dict[str, Any], str]]:
    """Interactions in flywheel's JSONL format, with the truth for each (the human label, if asked)."""
    rng = random.Random(seed)
    clock = start or datetime(2026, 11, 1, tzinfo=UTC)
    tiers = ["free"] * 8 + ["premium"] * 2
    for index, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        correct = parse_intent(answer) == row.intent
        breach = policy_breach(answer, patterns)
        user = user_of(row)
        record = {
            "id": f"{pack.name}-{version}-{row.line}",
            "timestamp": (clock + timedelta(seconds=37 * index)).isoformat(),
            "model_version": version,
            "intent": parse_intent(answer),  # what production logged: the model's own routing
            "user_id": user,
            "user_tier": rng.choice(tiers),
            "messages": conversation(row.text) + [{"role": "assistant", "content": answer}],
            **simulate_signals(correct, breach, pack, rng),
        }
        yield record, row.intent
