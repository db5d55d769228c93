"""Builders shared by the agent tests: a project whose whole improvement cycle runs in seconds.

- a tiny causal LM built locally (the champion, and the base the adapters train on),
- training settings for one optimizer step on CPU,
- logged conversations whose answers break a policy (the rule judge finds over_promise), with
  thumbs-down signals so triage captures them, ingested through the real ingest,
- knowledge-base approved responses for their intents (the KB corrector writes verified corrections),
- optionally conversations carrying injected instructions,
- a small fixed test set (the promotion gate fails without one), worded apart from the logs so that
  building a dataset drops none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.context import Context
from flywheel.data.ingest import ingest_files
from flywheel.data.kb import KbEntry, KbSummary, add_entries
from flywheel.release import registry
from flywheel.settings import load_settings

INTENTS = {
    "refund_status": ("Where is my refund? It has been a week.", "Refunds reach the original card within 5 business days of approval."),
    "card_fee": ("Why was I charged a card fee?", "The card fee is listed in the price list; support can explain each charge."),
    "lost_card": ("I lost my card, what now?", "Freeze the card in the app under Cards, then order a replacement there."),
}
BAD_ANSWER = "We guarantee a full refund today, no questions asked."

# One optimizer step on CPU, a small learning rate (the adapter stays close to the base, so the tiny
# model's answers do not change and the gate compares like with like), short generations.
TOML = """
[train]
epochs = 1.0
batch_size = 64
learning_rate = 1e-6
lora_r = 2
lora_alpha = 4
max_length = 256
early_stopping_patience = 0
warmup_ratio = 0.0

[eval]
test_set = "test_set.jsonl"
max_new_tokens = 4
batch_size = 32

[dataset]
heldout_ratio = 0.0
intent_min_samples = 0
"""


def tiny_corpus() -> list[str]:
    corpus = [BAD_ANSWER]
    for question, answer in INTENTS.values():
        corpus += [question, answer]
    return corpus


def build_base(folder: Path) -> Path:
    from flywheel.demo.tiny_model import build_tiny_model

    return build_tiny_model(folder, tiny_corpus(), vocab_size=300, hidden=32, layers=1, heads=2, max_len=256)


def write_project(project: Path, extra_toml: str = "", **sections: dict[str, Any]) -> None:
    text = TOML + extra_toml
    for name, values in sections.items():
        text += f"\n[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    (project / "flywheel.toml").write_text(text, encoding="utf-8")
    write_test_set(project / "test_set.jsonl")


def write_test_set(path: Path, per_intent: int = 2) -> Path:
    """The fixed test set: each intent's question, asked as a new customer would, with its approved answer."""
    rows = [
        {
            "id": f"test-{intent}-{k}",
            "messages": [
                {"role": "system", "content": "You are the bank's assistant."},
                {"role": "user", "content": f"Hello, {question.lower()} (customer {k})"},
            ],
            "reference": {"intent": intent, "answer": answer},
        }
        for intent, (question, answer) in INTENTS.items()
        for k in range(per_intent)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def log_line(index: int, intent: str, answer: str | None = None, user_text: str | None = None, **signals: Any) -> dict[str, Any]:
    question, _ = INTENTS[intent]
    return {
        "id": f"conv-{index}",
        "timestamp": f"2026-01-0{1 + index % 9}T10:{index % 60:02d}:00Z",
        "model_version": "v1",
        "intent": intent,
        "user_id": f"user-{index}",
        "messages": [
            {"role": "system", "content": "You are the bank's assistant."},
            {"role": "user", "content": user_text or f"{question} (ticket {index})"},
            {"role": "assistant", "content": answer or BAD_ANSWER},
        ],
        "feedback": signals.pop("feedback", "down"),
        **signals,
    }


def write_logs(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def default_logs() -> list[dict[str, Any]]:
    intents = list(INTENTS)
    return [log_line(i, intents[i % len(intents)]) for i in range(6)]


def seed_project(
    project: Path, base: Path, logs: list[dict[str, Any]] | None = None, store_url: str | None = None, **toml_sections: dict[str, Any]
) -> None:
    """Settings, knowledge base, ingested logs and the base model as champion v1."""
    write_project(project, **toml_sections)
    overrides = {"store": {"url": store_url}} if store_url else {}
    ctx = Context(settings=load_settings(project, **overrides))
    try:
        entries = [
            KbEntry(id=f"kb-{intent}", text=answer, intent=intent, kind="approved_response", title=intent)
            for intent, (_, answer) in INTENTS.items()
        ]
        add_entries(ctx.index, entries, KbSummary())
        summary = ingest_files(ctx.store, ctx.settings, [write_logs(project / "logs.jsonl", logs or default_logs())])
        assert summary.stored == len(logs or default_logs()), summary
        registry.register_base(ctx.store, str(base))
    finally:
        ctx.close()


def fresh_adapter(base: Path, out: Path) -> Path:
    """A real PEFT LoRA adapter over `base`, freshly initialised (B = 0: it answers exactly as the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(out))
    return out
