"""Benchmark: each training recipe option of [train] on and off, from the same snapshot and production model.

For each pack (banking77 and the derived 40-intent pack of bench/packs.py) the quick demo runs once
(bench/loop.py's packs; seed 0): it trains the production model, serves and ingests its traffic, labels,
corrects and builds the SFT snapshot the demo trains on; a DPO snapshot is built from the same store.
Every variant below then trains on that snapshot (in this process, as bench/recipe.py does) once per
training seed, and is evaluated on the pack's fixed test set:

    sft                     the project's [train] settings (the "off" side of every SFT option)
    curriculum_loss         curriculum = "champion_loss"
    curriculum_difficulty   curriculum = "difficulty"
    focal                   focal_gamma = 2
    anchor_l2               anchor = "l2"
    anchor_ewc              anchor = "ewc"
    dpo                     method dpo on the DPO snapshot (sigmoid loss; the "off" side of the two below)
    dpo_ipo, dpo_robust     dpo_loss_type ipo; robust with dpo_label_smoothing 0.1
    kto                     method kto on the DPO snapshot (compared with dpo)

    python bench/recipes.py                                   # both packs, seeds 0,1, every variant
    python bench/recipes.py --packs derived --seeds 0,1,2 --variants focal,kto
    python bench/recipes.py --set min_steps=300 --test-rows 0   # the demo's own training length, all 600 test rows

By default every run trains one epoch (`--set min_steps=0 --set epochs=1`, ~50 steps on the quick demo's
snapshot) and is evaluated on 300 of the 600 test rows. Measured on two cores shared with other jobs, a run
(training and evaluation) took 2.5 to 10 minutes; every variant on both packs with two seeds is 40 runs,
far beyond 40 minutes there: run a subset (--variants, --seeds) to stay near it.

Each option is compared with its "off" run seed by seed (paired t over seeds) and item by item (McNemar's
exact test on the same test items, pooled over seeds): task success, and the mean task success of the 10
test intents with the fewest rows in the snapshot's train split. Finished runs are appended to
<workdir>/recipes-results.jsonl; a re-run skips them. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop import load_records, pack_folder, pack_label, paired_t  # bench/loop.py: the same packs and paired statistics

RESULTS = "recipes-results.jsonl"
PREPARED = "recipes-project.json"
RAREST = 10

# name -> (snapshot kind, [train] overrides, the variant it is compared with)
VARIANTS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "sft": ("sft", {}, None),
    "curriculum_loss": ("sft", {"curriculum": "champion_loss"}, "sft"),
    "curriculum_difficulty": ("sft", {"curriculum": "difficulty"}, "sft"),
    "focal": ("sft", {"focal_gamma": 2.0}, "sft"),
    "anchor_l2": ("sft", {"anchor": "l2"}, "sft"),
    "anchor_ewc": ("sft", {"anchor": "ewc"}, "sft"),
    "dpo": ("dpo", {"method": "dpo"}, None),
    "dpo_ipo": ("dpo", {"method": "dpo", "dpo_loss_type": "ipo"}, "dpo"),
    "dpo_robust": ("dpo", {"method": "dpo", "dpo_loss_type": "robust", "dpo_label_smoothing": 0.1}, "dpo"),
    "kto": ("dpo", {"method": "kto"}, "dpo"),
}


# ---------------------------------------------------------------------------------------------- the project


def prepare(pack: str, folder: Path | None, workdir: Path) -> dict[str, Any]:
    """The demo project of one pack, with its SFT and DPO snapshots: built once, then reused.

    The demo's cycle runs with agent.max_training_runs = 0: the supervisor triages, labels, corrects and
    builds the snapshot, then stops where it would train (this benchmark trains every variant itself)."""
    run_dir = workdir / "runs" / pack
    marker = run_dir / PREPARED
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if all(Path(info[k]).is_dir() for k in ("sft", "dpo")):
            return info
    from flywheel.demo.run import DemoOptions, run_demo

    started = time.monotonic()
    os.environ["FLYWHEEL_AGENT__MAX_TRAINING_RUNS"] = "0"
    try:
        run_demo(DemoOptions(data=folder, workdir=run_dir, quick=True, yes=False, seed=0), say=lambda line: print(line, file=sys.stderr))
    finally:
        del os.environ["FLYWHEEL_AGENT__MAX_TRAINING_RUNS"]
    return snapshots(run_dir, started)


def snapshots(run_dir: Path, started: float) -> dict[str, Any]:
    """The demo's SFT snapshot and a DPO snapshot built from the same store, written to the marker file."""
    from flywheel.context import Context
    from flywheel.settings import load_settings
    from flywheel.trainer.dataset import build_snapshot, list_snapshots

    ctx = Context(settings=load_settings(run_dir))
    try:
        sft = list_snapshots(ctx.store, "sft")[0]
        dpo = build_snapshot(ctx, "dpo")
    finally:
        ctx.close()
    info = {"project": str(run_dir), "sft": sft.path, "dpo": dpo.path, "seconds": round(time.monotonic() - started, 1)}
    (run_dir / PREPARED).write_text(json.dumps(info), encoding="utf-8")
    return info


# ---------------------------------------------------------------------------------------------- one run


def rarest_intents(snapshot: Path, items: list[Any]) -> list[str]:
    """The RAREST test-set intents with the fewest rows in the snapshot's train split (none counts as 0)."""
    counts = Counter(
        json.loads(line).get("intent") for line in (snapshot / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    )
    intents = sorted({i.reference.intent for i in items if i.reference is not None and i.reference.intent})
    return sorted(intents, key=lambda intent: (counts.get(intent, 0), intent))[:RAREST]


def evaluate_champion(settings: Any, items: list[Any], rare: list[str]) -> dict[str, Any]:
    """The production model (the champion every variant starts from) on the same test set."""
    from recipe import evaluate

    metrics = evaluate(settings, items, settings.train.base_model)
    rates = [metrics.per_intent[i].rate for i in rare if i in metrics.per_intent]
    return {"task_success": round(metrics.task_success.rate, 4), "rarest_mean": round(statistics.fmean(rates), 4) if rates else None}


def run_one(
    pack: str, info: dict[str, Any], variant: str, seed: int, items: list[Any], rare: list[str], workdir: Path, common: dict[str, Any]
) -> dict[str, Any]:
    from recipe import evaluate  # bench/recipe.py: the eval runner's path, adapter loaded with its sha256

    from flywheel.settings import load_settings
    from flywheel.settings_sections import TrainSettings
    from flywheel.trainer import recipes

    kind, overrides, _ = VARIANTS[variant]
    settings = load_settings(info["project"])
    train = TrainSettings.model_validate({**settings.train.model_dump(), **common, **overrides, "seed": seed})
    spec = recipes.build_spec(train, info[kind], method=overrides.get("method", kind))
    run_dir = workdir / "train" / pack / f"{variant}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    started = time.monotonic()
    result = recipes.run(spec, run_dir)
    train_s = time.monotonic() - started
    metrics = evaluate(settings, items, settings.train.base_model, result.adapter_path, result.adapter_sha256)
    shutil.rmtree(run_dir, ignore_errors=True)
    per_intent = {intent: rate.rate for intent, rate in metrics.per_intent.items()}
    rare_rates = [per_intent[i] for i in rare if i in per_intent]
    return {
        "pack": pack,
        "variant": variant,
        "seed": seed,
        "job_id": spec.job_id(),
        "steps": result.steps,
        "epochs": round(result.epochs, 2),
        "best_eval_loss": result.best_eval_loss,
        "task_success": round(metrics.task_success.rate, 4),
        "wrong_intent": round(metrics.problem_rates["wrong_intent"].rate, 4) if "wrong_intent" in metrics.problem_rates else None,
        "rarest_mean": round(statistics.fmean(rare_rates), 4) if rare_rates else None,
        "train_seconds": round(train_s, 1),
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": {o.id: o.success for o in metrics.outcomes},
    }


# ---------------------------------------------------------------------------------------------- summary


def compare(runs: dict[tuple[str, int], dict[str, Any]], variant: str, against: str, seeds: list[int]) -> dict[str, Any]:
    """`variant` against `against` on one pack: per-seed differences (paired t) and pooled McNemar."""
    from flywheel.evals.metrics import mcnemar

    paired = [s for s in seeds if (variant, s) in runs and (against, s) in runs]
    off_ok: list[bool] = []
    on_ok: list[bool] = []
    for seed in paired:
        off, on = runs[(against, seed)]["outcomes"], runs[(variant, seed)]["outcomes"]
        for item in sorted(set(off) & set(on)):
            off_ok.append(off[item])
            on_ok.append(on[item])
    diffs = {
        key: [runs[(variant, s)][key] - runs[(against, s)][key] for s in paired if runs[(variant, s)][key] is not None]
        for key in ("task_success", "rarest_mean")
    }
    test = mcnemar(off_ok, on_ok) if off_ok else None
    return {
        "against": against,
        "seeds": paired,
        "task_success": {
            "on": _mean(runs, variant, paired, "task_success"),
            "off": _mean(runs, against, paired, "task_success"),
            **paired_t(diffs["task_success"]),
            "by_seed": [round(d, 4) for d in diffs["task_success"]],
        },
        "rarest_mean": {
            "on": _mean(runs, variant, paired, "rarest_mean"),
            "off": _mean(runs, against, paired, "rarest_mean"),
            **paired_t(diffs["rarest_mean"]),
            "by_seed": [round(d, 4) for d in diffs["rarest_mean"]],
        },
        "mcnemar": {**test.model_dump(), "change": round(test.change, 6), "items": len(off_ok)} if test is not None else None,
    }


def _mean(runs: dict[tuple[str, int], dict[str, Any]], variant: str, seeds: list[int], key: str) -> float | None:
    values = [runs[(variant, s)][key] for s in seeds if runs[(variant, s)][key] is not None]
    return round(statistics.fmean(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", default="banking77,derived")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/recipes"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a [train] setting for every run, on and off alike (JSON values); default: min_steps=0 epochs=1 "
        "(one epoch: ~50 steps instead of the ~310 the sizing rule gives, so the whole run stays near 40 minutes); "
        "--set min_steps=300 trains as the demo does",
    )
    parser.add_argument("--no-champion", action="store_true", help="do not evaluate the production model itself (saves one evaluation)")
    parser.add_argument("--test-rows", type=int, default=300, help="evenly spaced rows of the fixed test set (0: all 600)")
    args = parser.parse_args()
    common: dict[str, Any] = {}
    for item in args.set if args.set is not None else ["min_steps=0", "epochs=1"]:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            common[key] = json.loads(raw)
        except json.JSONDecodeError:
            common[key] = raw
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    # an option is compared with its "off" run: that one runs too, first
    variants = [v for v in VARIANTS if v in variants or any(VARIANTS[w][2] == v for w in variants)]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    packs = {pack_label(name): pack_folder(name, workdir) for name in args.packs.split(",") if name.strip()}
    started = time.monotonic()
    prepared = {pack: prepare(pack, folder, workdir) for pack, folder in packs.items()}
    if args.prepare_only:
        print(json.dumps(prepared))
        return

    from flywheel.evals.runner import load_test_set, test_set_path
    from flywheel.settings import load_settings

    results = workdir / RESULTS
    records = load_records(results)
    setup = {"set": common, "test_rows": args.test_rows}
    records = [r for r in records if r.get("setup") == setup]  # runs of another --set or --test-rows are not comparable
    done = {(r["pack"], r["variant"], r["seed"]) for r in records}
    failed = []
    summary: dict[str, Any] = {}
    champion: dict[str, Any] = {}
    for pack, info in prepared.items():
        settings = load_settings(info["project"])
        path = test_set_path(settings)
        assert path is not None  # the demo writes one
        items = load_test_set(path)
        if args.test_rows:
            items = items[:: max(1, len(items) // args.test_rows)][: args.test_rows]
        rare = rarest_intents(Path(info["sft"]), items)
        cached = Path(info["project"]) / f"champion-{args.test_rows or 'all'}.json"  # the same model and rows every run
        if not cached.is_file() and not args.no_champion:
            cached.write_text(json.dumps(evaluate_champion(settings, items, rare)), encoding="utf-8")
        champion[pack] = json.loads(cached.read_text(encoding="utf-8")) if cached.is_file() else None
        for seed in seeds:
            for variant in variants:
                if (pack, variant, seed) in done:
                    continue
                try:
                    record = run_one(pack, info, variant, seed, items, rare, workdir, common)
                except Exception as exc:  # one broken run must not lose the others: reported, not recorded
                    traceback.print_exc()
                    failed.append({"pack": pack, "variant": variant, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                record["setup"] = setup
                with results.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                records.append(record)
                print(
                    f"{pack} {variant} seed {seed}: task success {record['task_success']}, rarest {record['rarest_mean']}, "
                    f"{record['steps']} steps, {record['seconds']}s",
                    file=sys.stderr,
                    flush=True,
                )
        runs = {(r["variant"], r["seed"]): r for r in records if r["pack"] == pack and r["seed"] in seeds}
        summary[pack] = {
            "project": info["project"],
            "champion": champion[pack],
            "test_items": len(items),
            "rarest_intents": rare,
            "variants": {
                v: {
                    "task_success": _mean(runs, v, [s for s in seeds if (v, s) in runs], "task_success"),
                    "rarest_mean": _mean(runs, v, [s for s in seeds if (v, s) in runs], "rarest_mean"),
                    "seconds": _mean(runs, v, [s for s in seeds if (v, s) in runs], "seconds"),
                }
                for v in variants
            },
            "options": {v: compare(runs, v, VARIANTS[v][2] or "", seeds) for v in variants if VARIANTS[v][2]},
        }
    runs_out = [{k: v for k, v in r.items() if k != "outcomes"} for r in records if r["pack"] in packs and r["seed"] in seeds]
    print(
        json.dumps(
            {
                "quick": True,
                **setup,
                "seeds": seeds,
                "rarest": RAREST,
                "packs": summary,
                "runs": runs_out,
                "failed": failed,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
