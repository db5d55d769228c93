"""Benchmark: which LoRA recipe lets an adapter learn new intent boundaries without forgetting old ones.

Trains one adapter per variant on a snapshot (sequentially, in this process), evaluates each on the
project's fixed test set exactly as the eval runner does (greedy generation through `LocalModel`, the
adapter loaded with its recorded sha256, the rule judge with the reference intent), and compares it with
the base model: task success, wrong_intent rate, the worst per-intent drop, and the test-set gate.

    python bench/recipe.py --project /tmp/recipe-work \\
        --dataset /tmp/recipe-work/.flywheel/artifacts/datasets/ds-sft-7a64c31df347 \\
        baseline lora_r=4,lora_alpha=8 modules_to_save=lm_head replay=none epochs=8,seed=1

A variant is `baseline` or comma-separated `key=value` overrides of the project's [train] settings
(values are JSON when they parse, lists are joined with `+`: modules_to_save=embed_tokens+lm_head),
optionally named `name:key=value,...`. Every variant goes through the sizing rules of
flywheel.trainer.sizing as a training job does (`modules_to_save=` with nothing after it trains LoRA
only; `min_steps=0` keeps `epochs` as given). One key is not a train setting:
    replay=all|half|none   keep every, half of, or none of the replay rows (tier other than "problem")
`--repeat-seeds 0,1` runs every variant once per seed. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flywheel.evals.gate import TEST, evaluate_gate
from flywheel.evals.metrics import SetMetrics
from flywheel.evals.runner import build_judge, evaluate_model, load_test_set, test_set_path
from flywheel.inference.local_model import LocalModel
from flywheel.settings import Settings, load_settings
from flywheel.settings_sections import TrainSettings
from flywheel.trainer import recipes

EXTRA_KEYS = {"replay"}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
    overrides: dict[str, Any] = {}
    if body and body != "baseline":
        for part in body.split(","):
            key, sep, raw = part.partition("=")
            if not sep:
                raise SystemExit(f"variant {text!r}: {part!r} is not key=value")
            if key in ("modules_to_save", "target_modules") and raw != "all-linear":
                overrides[key] = [m for m in raw.split("+") if m]
                continue
            try:
                overrides[key] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[key] = raw
    unknown = set(overrides) - set(TrainSettings.model_fields) - EXTRA_KEYS
    if unknown:
        raise SystemExit(f"variant {text!r}: unknown keys {sorted(unknown)}")
    return name or body or "baseline", overrides


def replay_dataset(source: Path, out: Path, replay: str, seed: int = 0) -> Path:
    """A copy of the snapshot whose train split keeps all, half or none of the replay rows (tier other than "problem");
    the held-out split is kept as it is, so early stopping watches the same rows in every variant."""
    if replay == "all":
        return source
    if replay not in ("half", "none"):
        raise SystemExit(f"replay={replay!r}: expected all, half or none")
    out.mkdir(parents=True, exist_ok=True)
    rows = [line for line in (source / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    extra = [i for i, line in enumerate(rows) if json.loads(line).get("tier") != "problem"]
    drop = set(extra) if replay == "none" else set(random.Random(seed).sample(extra, len(extra) // 2))
    (out / "train.jsonl").write_text("".join(line + "\n" for i, line in enumerate(rows) if i not in drop), encoding="utf-8")
    for name in ("heldout.jsonl", "manifest.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def evaluate(settings: Settings, items: list, base: str, adapter: str | None = None, sha256: str | None = None) -> SetMetrics:
    model = LocalModel(base)
    if adapter is not None:
        model.load_adapter("candidate", adapter, expected_sha256=sha256)  # the sha256 check the gateway does
        model.set_adapter("candidate")

    def generate(conversations: list[list[dict[str, Any]]]) -> list[Any]:
        return list(model.generate(conversations, max_new_tokens=settings.eval.max_new_tokens, batch_size=settings.eval.batch_size))

    return evaluate_model(generate, items, build_judge(settings), settings, name=TEST)


def summary(before: SetMetrics, after: SetMetrics, settings: Settings) -> dict[str, Any]:
    drops = []
    for intent, rate in before.per_intent.items():
        if rate.n < settings.gate.min_intent_samples or intent not in after.per_intent:
            continue
        drops.append((after.per_intent[intent].rate - rate.rate, intent, rate.rate, after.per_intent[intent].rate))
    drops.sort()
    gate = evaluate_gate({TEST: before}, {TEST: after}, ["wrong_intent"], settings.gate)
    failed_intents = [c.subject for c in gate.checks if c.kind == "intent" and not c.passed]
    targeted = next(c for c in gate.checks if c.kind == "targeted" and c.set == TEST)
    worst = drops[0] if drops else (0.0, "", 0.0, 0.0)
    return {
        "task_success": round(after.task_success.rate, 4),
        "wrong_intent": round(after.problem_rates["wrong_intent"].rate, 4) if "wrong_intent" in after.problem_rates else None,
        "worst_intent_drop": {"intent": worst[1], "change": round(worst[0], 3), "before": worst[2], "after": worst[3]},
        "intents_down_10pt": sum(1 for d in drops if d[0] <= -0.1 + 1e-9),
        "intents_up_10pt": sum(1 for d in drops if d[0] >= 0.1 - 1e-9),
        "gate_targeted_passed": targeted.passed,
        "gate_failed_intents": failed_intents,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", required=True, type=Path)
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: PROJECT/bench-recipe)")
    parser.add_argument("--repeat-seeds", default="", help="comma-separated seeds; each variant runs once per seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the adapters and checkpoints")
    parser.add_argument("variants", nargs="*", default=["baseline"])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    settings = load_settings(args.project)
    work = (args.work or args.project / "bench-recipe").resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = test_set_path(settings)
    if path is None:
        raise SystemExit("the project has no eval.test_set")
    items = load_test_set(path)
    dataset = args.dataset.resolve()

    started = time.monotonic()
    base = evaluate(settings, items, settings.train.base_model)
    print(f"base: task_success {base.task_success.rate:.3f} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    out: dict[str, Any] = {
        "project": str(args.project),
        "dataset": str(dataset),
        "test_items": len(items),
        "base": {"task_success": round(base.task_success.rate, 4), "wrong_intent": round(base.problem_rates["wrong_intent"].rate, 4)},
        "variants": [],
    }
    seeds = [int(s) for s in args.repeat_seeds.split(",") if s.strip()]
    for text in args.variants:
        name, overrides = parse_variant(text)
        for seed in seeds or [None]:
            extra = {k: overrides[k] for k in EXTRA_KEYS if k in overrides}
            hyper = {k: v for k, v in overrides.items() if k not in EXTRA_KEYS}
            if seed is not None:
                hyper["seed"] = seed
            label = name if seed is None else f"{name}/seed{seed}"
            data = replay_dataset(dataset, work / "data" / f"replay-{extra.get('replay')}", extra.get("replay", "all"))
            train = settings.train.model_copy(update=hyper)
            train = TrainSettings.model_validate(train.model_dump())  # validate the overrides
            spec = recipes.build_spec(train, data)
            run_dir = work / "runs" / label.replace("/", "_")
            shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
            t0 = time.monotonic()
            result = recipes.run(spec, run_dir)
            train_s = time.monotonic() - t0
            t1 = time.monotonic()
            after = evaluate(settings, items, settings.train.base_model, result.adapter_path, result.adapter_sha256)
            row = {
                "variant": label,
                "overrides": overrides if seed is None else {**overrides, "seed": seed},
                "settings": spec.hyper.model_dump(mode="json", exclude={"base_model", "method"}),
                "train_rows": sum(1 for line in (data / "train.jsonl").open() if line.strip()),
                "steps": result.steps,
                "epochs_run": round(result.epochs, 2),
                "best_eval_loss": result.best_eval_loss,
                "adapter_bytes": Path(result.adapter_path, "adapter_model.safetensors").stat().st_size,
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(time.monotonic() - t1, 1),
                **summary(base, after, settings),
            }
            out["variants"].append(row)
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "variant",
                            "steps",
                            "train_seconds",
                            "task_success",
                            "wrong_intent",
                            "worst_intent_drop",
                            "intents_down_10pt",
                        )
                    }
                ),
                file=sys.stderr,
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
