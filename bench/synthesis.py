"""The demo's cycle without and with synthesis, from the same production model and labelling budget.

For each pack and seed: one production model (trained once, cached in that (pack, seed)'s work folder),
the same traffic and the same simulated labeller; the two runs differ only in `synthesis.enabled`. Each
cycle runs through the supervisor graph as in `flywheel demo` and stops at the approval (nobody
approves here), so the candidates are compared as they stand, on the whole of test.csv (the pack's
untouched test split; `--test-rows N` takes a slice instead).

    python bench/synthesis.py                                   # banking77, seeds 0,1,2, quick sizes
    python bench/synthesis.py --packs banking77,derived --seeds 0,1,2
    python bench/synthesis.py --set synthesis.generators='["mining"]' --workdir bench/out/synthesis-mining

Every finished run is appended to <workdir>/synthesis-results.jsonl; a re-run skips runs already there.
Prints one line per run (stderr) and, last, one JSON object on stdout:
{"packs": {PACK: {"champion", "without", "with": means over seeds of task success and every problem rate,
 "gain": with - without per seed (mean, standard error, sign count), "mcnemar": with vs without on the same
 test items pooled over seeds (task success, wrong_intent), "rarest_intents": per-intent task success for
 the 20 intents with the fewest train.csv rows, "synthesis": samples generated, kept and dropped per
 generator and reason, and the stage's wall time}}, "runs": [...]}
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop import pack_folder, pack_label, paired_t  # bench/loop.py: the same packs and paired statistics

RESULTS = "synthesis-results.jsonl"
RAREST = 20


def run_one(pack: str, folder: Path | None, seed: int, synthesis: bool, args: argparse.Namespace) -> dict[str, Any]:
    from flywheel.demo.run import DemoOptions, run_demo
    from flywheel.evals.metrics import outcome_passed

    started = time.monotonic()
    run_dir = args.workdir / "runs" / pack / f"seed-{seed}"  # one production model per (pack, seed), reused
    options = DemoOptions(
        data=folder, workdir=run_dir, quick=not args.full, yes=False, seed=seed, synthesis=synthesis, test_rows=args.test_rows
    )
    for name, value in args.set:
        os.environ[f"FLYWHEEL_{name.upper().replace('.', '__')}"] = value
    result = run_demo(options, say=lambda _line: None)
    outcomes: dict[str, dict[str, Any]] = {}
    if result.report:
        report = json.loads(Path(result.report).with_name("report.json").read_text(encoding="utf-8"))
        intents = _test_intents(run_dir / "test_set.jsonl")
        for role in ("champion", "candidate"):
            outcomes[role] = {
                o["id"]: {
                    "passed": outcome_passed(o),
                    "wrong_intent_free": outcome_passed(o, "wrong_intent"),
                    "intent": intents.get(o["id"]),
                }
                for o in report[f"{role}_metrics"]["test"]["outcomes"]
            }
    cycle = result.steps.get("cycle") or {}
    return {
        "pack": pack,
        "seed": seed,
        "synthesis": synthesis,
        "state": result.state,
        "champion": result.before.model_dump(),
        "candidate": result.candidate.model_dump(),
        "labelled": cycle.get("labelled"),
        "synthesized": cycle.get("synthesized"),
        "synthesis_seconds": cycle.get("synthesis_seconds"),
        "generated": _generated(run_dir) if synthesis else {},
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": outcomes,
    }


def _test_intents(path: Path) -> dict[str, str | None]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[row["id"]] = (row.get("reference") or {}).get("intent")
    return out


def _generated(run_dir: Path) -> dict[str, Any]:
    """Per generator: generated, kept, and dropped by the first reason (read before the next run clears it)."""
    from flywheel.context import Context
    from flywheel.settings import load_settings
    from flywheel.store import synthetic as synthetic_repo

    ctx = Context(settings=load_settings(run_dir))
    try:
        rows = synthetic_repo.listing(ctx.store, limit=1_000_000)
    finally:
        ctx.close()
    out: dict[str, Any] = {}
    for row in rows:
        entry = out.setdefault(row["generator"], {"generated": 0, "kept": 0, "dropped": Counter()})
        entry["generated"] += 1
        if row["kept"]:
            entry["kept"] += 1
        else:
            entry["dropped"][(row["reasons"] or ["?"])[0].split(":", 1)[0]] += 1
    return {name: {**e, "dropped": dict(e["dropped"].most_common())} for name, e in out.items()}


# ------------------------------------------------------------------------------------------------ summary


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


def side_means(runs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    names = sorted({n for r in runs for n in r[role]["problem_rates"]})
    return {
        "task_success": _mean([r[role]["task_success"] for r in runs]),
        "problem_rates": {n: _mean([r[role]["problem_rates"].get(n) for r in runs]) for n in names},
    }


def pooled_mcnemar(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> dict[str, Any]:
    from flywheel.evals.metrics import mcnemar

    a: list[bool] = []
    b: list[bool] = []
    for without, with_ in pairs:
        shared = sorted(set(without) & set(with_))
        a += [without[i][key] for i in shared]
        b += [with_[i][key] for i in shared]
    test = mcnemar(a, b)
    return {**test.model_dump(), "change": round(test.change, 6), "items": len(a)}


def rarest_intents(pack_dir: Path | None, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    from flywheel.demo.pack import load_pack

    pack = load_pack(pack_dir)
    counts = Counter(r.intent for r in pack.train)
    rarest = sorted(pack.intents, key=lambda i: (counts[i], i))[:RAREST]
    rows = []
    for intent in rarest:
        without, with_ = _intent_rate(pairs, 0, intent), _intent_rate(pairs, 1, intent)
        gain = None if without is None or with_ is None else round(with_ - without, 4)
        rows.append({"intent": intent, "train_rows": counts[intent], "without": without, "with": with_, "gain": gain})
    return rows


def _intent_rate(pairs: list[tuple[dict[str, Any], dict[str, Any]]], side: int, intent: str) -> float | None:
    passed = [o["passed"] for pair in pairs for o in pair[side].values() if o["intent"] == intent]
    return round(sum(passed) / len(passed), 4) if passed else None


def _diff(by: dict[tuple[int, bool], dict[str, Any]], metric: str | None, seed: int) -> float | None:
    """with - without for one seed: task success (metric None) or a problem rate."""
    a, b = by[(seed, False)]["candidate"], by[(seed, True)]["candidate"]
    x = a["task_success"] if metric is None else a["problem_rates"].get(metric)
    y = b["task_success"] if metric is None else b["problem_rates"].get(metric)
    return None if x is None or y is None else y - x


def merge_generated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        for name, entry in (run.get("generated") or {}).items():
            total = out.setdefault(name, {"generated": 0, "kept": 0, "dropped": Counter()})
            total["generated"] += entry["generated"]
            total["kept"] += entry["kept"]
            total["dropped"].update(entry["dropped"])
    return {name: {**e, "dropped": dict(e["dropped"].most_common())} for name, e in out.items()}


def summarise(records: list[dict[str, Any]], packs: dict[str, Path | None], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pack, folder in packs.items():
        by = {(r["seed"], r["synthesis"]): r for r in records if r["pack"] == pack and r["seed"] in seeds}
        paired_seeds = [s for s in seeds if (s, False) in by and (s, True) in by]
        if not paired_seeds:
            continue
        without = [by[(s, False)] for s in paired_seeds]
        with_ = [by[(s, True)] for s in paired_seeds]
        pairs = [(by[(s, False)]["outcomes"]["candidate"], by[(s, True)]["outcomes"]["candidate"]) for s in paired_seeds]
        problem_types = sorted({n for r in without + with_ for n in r["candidate"]["problem_rates"]})

        out[pack] = {
            "seeds": paired_seeds,
            "champion": side_means(without, "champion"),
            "without": side_means(without, "candidate"),
            "with": side_means(with_, "candidate"),
            "gain": {
                "task_success": paired_t([d for s in paired_seeds if (d := _diff(by, None, s)) is not None]),
                **{n: paired_t([d for s in paired_seeds if (d := _diff(by, n, s)) is not None]) for n in problem_types},
            },
            # wrong_intent cut by the cycle itself: champion rate - candidate rate, without and with
            "wrong_intent_cut": {"without": _mean([_cut(r) for r in without]), "with": _mean([_cut(r) for r in with_])},
            "states": {"without": [r["state"] for r in without], "with": [r["state"] for r in with_]},
            "labelled": {"without": [r["labelled"] for r in without], "with": [r["labelled"] for r in with_]},
            "mcnemar": {"task_success": pooled_mcnemar(pairs, "passed"), "wrong_intent": pooled_mcnemar(pairs, "wrong_intent_free")},
            "rarest_intents": rarest_intents(folder, pairs),
            "synthesis": {
                "samples": merge_generated(with_),
                "kept_per_run": [r["synthesized"] for r in with_],
                "stage_seconds": [r["synthesis_seconds"] for r in with_],
            },
        }
    return out


def _cut(run: dict[str, Any]) -> float | None:
    a, b = run["champion"]["problem_rates"].get("wrong_intent"), run["candidate"]["problem_rates"].get("wrong_intent")
    return None if a is None or b is None else a - b


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", default="banking77", help="comma-separated: banking77, derived, or pack folders")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--full", action="store_true", help="the demo's full sizes (default: quick)")
    parser.add_argument("--test-rows", type=int, default=0, help="rows of test.csv in the fixed test set (0: all)")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/synthesis"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        help="a setting for both runs, e.g. synthesis.max_share=0.4",
    )
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    packs = {pack_label(name): pack_folder(name, args.workdir) for name in args.packs.split(",")}
    results = args.workdir / RESULTS
    records = load_records(results)
    done = {(r["pack"], r["seed"], r["synthesis"]) for r in records}
    for pack, folder in packs.items():
        for seed in seeds:
            for synthesis in (False, True):
                if (pack, seed, synthesis) in done:
                    continue
                try:
                    record = run_one(pack, folder, seed, synthesis, args)
                except Exception:  # one broken run must not lose the others: it is reported and skipped
                    traceback.print_exc()
                    continue
                with results.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                records.append(record)
                c = record["candidate"]
                print(
                    f"{pack} seed {seed} synthesis={synthesis}: {record['state']}, task success {c['task_success']}, "
                    f"wrong_intent {c['problem_rates'].get('wrong_intent')}, {record['seconds']}s",
                    file=sys.stderr,
                )
    summary = summarise(records, packs, seeds)
    runs = [{k: v for k, v in r.items() if k != "outcomes"} for r in records if r["pack"] in packs and r["seed"] in seeds]
    print(json.dumps({"test_rows": args.test_rows or "all", "quick": not args.full, "packs": summary, "runs": runs}))


if __name__ == "__main__":
    main()
