"""Setting up the demo world: a project folder, the production model, the test set and the logs.

Everything is written into the demo's work folder, which is an ordinary flywheel project: after the
demo, `flywheel -C <workdir> failures`, `models`, `eval` and the rest work on what it left behind.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flywheel.demo.pack import DemoPack, Row, approved_replies, output_schema
from flywheel.demo.production import conversation, production_sample, traffic_records, train_production_model
from flywheel.records import stable_hash
from flywheel.settings import CONFIG_FILE, Settings, load_settings

Say = Callable[[str], None]


class DemoSize(BaseModel):
    """How much of the pack the demo uses: the full run and the quick one differ only here."""

    traffic: int  # production interactions the loop learns from
    canary_traffic: int  # interactions served while the canary runs
    test: int  # rows of test.csv in the fixed test set (0: all)
    production_epochs: int
    labelling_budget: int
    triage_budget: int
    train_epochs: float


FULL = DemoSize(traffic=5000, canary_traffic=800, test=0, production_epochs=8, labelling_budget=800, triage_budget=3000, train_epochs=4)
QUICK = DemoSize(traffic=1500, canary_traffic=400, test=600, production_epochs=8, labelling_budget=300, triage_budget=1200, train_epochs=4)

TOKENIZER_VOCAB = 2000
MODEL_SHAPE = {"hidden": 128, "layers": 2, "heads": 4}


def write_project(workdir: Path, pack: DemoPack, size: DemoSize, seed: int, synthesis: bool = False) -> Settings:
    """flywheel.toml for the demo: the pack's policies, the output schema from its intents, the fixed
    test set, and loop sizes. The file is the record of how the demo was configured."""
    workdir.mkdir(parents=True, exist_ok=True)
    forbidden = pack.policies.get("forbidden_phrases", [])
    config: dict[str, Any] = {
        "policies": {"output_schema": output_schema(pack), "forbidden_phrases": forbidden},
        "triage": {"budget": size.triage_budget, "seed": seed, "dedup_threshold": 0.97},
        "selection": {"labelling_budget": size.labelling_budget, "round_size": max(25, size.labelling_budget // 5), "seed": seed},
        "dataset": {
            "intent_min_samples": 0,
            "intent_max_ratio": 0.2,
            "replay_min_share": 0.3,
            "replay_max_share": 0.6,
            "heldout_ratio": 0.1,
            "seed": seed,
        },
        "train": {
            "base_model": str(workdir / "production-model"),
            "method": "sft",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "epochs": size.train_epochs,
            "learning_rate": 1e-3,  # the embedding and output layer train in full here (trainer.sizing): 2e-3 over-shoots them
            "batch_size": 16,
            "max_length": 160,
            "early_stopping_patience": 1,
            "seed": seed,
        },
        "eval": {"test_set": str(workdir / "test_set.jsonl"), "max_new_tokens": 72, "batch_size": 64},
        "gate": {
            "targeted_min_relative_drop": 0.3,
            "targeted_min_count": 10,
            "max_regression": 0.05,
            "min_intent_samples": 20,
            **pack.gate,
        },
        "canary": {"share": 0.25, "min_requests": 50, "harm_margin": 0.05},
        "synthesis": {"enabled": synthesis, "seed": seed},
    }
    (workdir / CONFIG_FILE).write_text(_toml(config), encoding="utf-8")
    return load_settings(workdir)


def _toml(data: dict[str, Any]) -> str:
    """A small TOML writer for the demo's config (tables of scalars, lists and inline tables)."""
    lines = ["# Written by `flywheel demo`. An ordinary flywheel project: edit and re-run stages by hand."]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_test_set(path: Path, rows: list[Row]) -> int:
    """The fixed test set in flywheel's format; it comes from test.csv only."""
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(
                json.dumps({"id": f"test-{row.line}", "messages": conversation(row.text), "reference": {"intent": row.intent}}) + "\n"
            )
    return len(rows)


def build_production_model(workdir: Path, pack: DemoPack, size: DemoSize, seed: int, say: Say) -> tuple[Path, list[Row], dict[str, Any]]:
    """Train the production model once per (pack, size, seed); a re-run reuses it. Returns its folder,
    the traffic rows (train rows it never saw) and what was trained."""
    answers = approved_replies(pack)
    sample, traffic, learned = production_sample(pack, answers, seed)
    key = stable_hash(
        {"pack": [r.line for r in sample], "answers": learned, "epochs": size.production_epochs, "shape": MODEL_SHAPE, "seed": seed}
    )
    folder = workdir / "production-model"
    stamp = folder / "flywheel-demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        say(f"production model: reusing {folder}")
        return folder, traffic, json.loads(stamp.read_text())
    from flywheel.demo.tiny_model import build_tiny_model

    if folder.exists():
        shutil.rmtree(folder)
    say(
        f"production model: {len(sample)} training examples over {len(pack.intents)} intents (a long tail), "
        f"{len(pack.production.promise_intents)} intents taught a policy-breaking promise"
    )
    corpus = [r.text for r in pack.train] + list(learned.values()) + list(answers.values())
    # standard initialisation: this model is trained from scratch, not only adapted
    build_tiny_model(folder, corpus, vocab_size=TOKENIZER_VOCAB, max_len=256, seed=seed, init_std=0.02, **MODEL_SHAPE)
    trained = train_production_model(folder, sample, learned, epochs=size.production_epochs, seed=seed, log=say)
    info = {"key": key, "examples": len(sample), "curve": trained["curve"]}
    stamp.write_text(json.dumps(info), encoding="utf-8")
    return folder, traffic, info


def serve_traffic(
    model: Any,
    rows: list[Row],
    pack: DemoPack,
    settings: Settings,
    out: Path,
    *,
    version: str,
    seed: int,
    adapter: Any = None,
    start: Any = None,
) -> dict[str, str]:
    """Answer `rows` with `model` and write them as a JSONL log with simulated signals. Returns the
    truth per interaction id: what a person would say if asked to label it."""
    patterns = [re.compile(p.pattern, re.IGNORECASE) for p in settings.policies.forbidden_phrases]
    kwargs = {} if adapter is None else {"adapter": adapter}
    generations = model.generate([conversation(r.text) for r in rows], max_new_tokens=settings.eval.max_new_tokens, batch_size=64, **kwargs)
    truth: dict[str, str] = {}
    with out.open("a", encoding="utf-8") as handle:
        for record, intent in traffic_records(rows, [g.text for g in generations], pack, patterns, version=version, seed=seed, start=start):
            handle.write(json.dumps(record) + "\n")
            truth[record["id"]] = intent
    return truth
