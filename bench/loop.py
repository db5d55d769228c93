"""The demo's loop once per selection strategy, at the same labelling budget, on several packs and seeds.

For each pack and seed: the same production model (trained once, cached in that (pack, seed)'s work
folder and reused), the same traffic and the same fixed test set; only the strategy that chooses which
failures a person labels differs. Each cycle runs through the supervisor graph as in `flywheel demo` and
stops at the approval (nobody approves here), so each candidate's test-set numbers are compared as they
stand. Over the seeds it reports the spread, and each strategy against random seed by seed (paired: same
seed, same model and traffic) and item by item (McNemar's test on the same test items, summed over seeds),
so that a difference can be told from noise.

    python bench/loop.py --quick                                    # both packs, seeds 0,1,2, 4 strategies
    python bench/loop.py --quick --packs derived --seeds 0 --strategies random,kcenter
    python bench/loop.py --strategies all --packs banking77,path/to/pack
    python bench/loop.py --quick --set dataset.replay_strategy=boundary --workdir bench/out/loop-boundary

--packs: `banking77` (the bundled pack), `derived` (bench/packs.py: 40 of banking77's intents, seed 11,
written under the work folder), or a pack folder. Every finished run is appended to
<workdir>/loop-results.jsonl; a re-run skips the (pack, seed, strategy, quick) runs already there, so a
killed benchmark resumes where it stopped (delete the file to start over).

Prints one line per run (stderr) as it finishes and, last, one JSON object on stdout:
{"quick", "budget", "packs": {PACK: {"champion": {SEED: ...}, "strategies": {NAME: spread over seeds},
 "vs_random": {NAME: per-seed differences, sign count, mean ± standard error, pooled McNemar}}}, "runs": [...]}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

STRATEGIES = ["random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid"]
DEFAULT_STRATEGIES = "random,hybrid,margin,kcenter"
DERIVED = {"intents": 40, "seed": 11}  # the `derived` pack
RESULTS = "loop-results.jsonl"


# ---------------------------------------------------------------------------------------------- packs


def pack_folder(name: str, workdir: Path) -> Path | None:
    """The folder of a --packs entry (None: the bundled banking77 pack)."""
    if name == "banking77":
        return None
    if name == "derived":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from packs import derive_pack  # bench/packs.py

        folder = workdir / "packs" / f"banking77-{DERIVED['intents']}-s{DERIVED['seed']}"
        return derive_pack(None, folder, intents=DERIVED["intents"], seed=DERIVED["seed"])
    folder = Path(name)
    if not folder.is_dir():
        raise SystemExit(f"--packs: {name!r} is neither banking77, derived nor a pack folder")
    return folder


def pack_label(name: str) -> str:
    return name if name in ("banking77", "derived") else Path(name).resolve().name


# ---------------------------------------------------------------------------------------------- one run


def item_outcomes(report_json: Path, role: str = "candidate", set_name: str = "test") -> dict[str, bool]:
    """Item id -> passed (no finding, no error) for one model on one set of an eval report."""
    report = json.loads(report_json.read_text(encoding="utf-8"))
    from flywheel.evals.metrics import outcome_passed

    return {o["id"]: outcome_passed(o) for o in report[f"{role}_metrics"][set_name]["outcomes"]}


def run_one(pack: str, folder: Path | None, seed: int, strategy: str, quick: bool, workdir: Path) -> dict[str, Any]:
    from flywheel.demo.run import DemoOptions, run_demo

    started = time.monotonic()
    run_dir = workdir / "runs" / pack / f"seed-{seed}"  # one production model per (pack, seed), reused
    options = DemoOptions(data=folder, workdir=run_dir, quick=quick, yes=False, interactive=False, seed=seed, strategy=strategy)
    result = run_demo(options, say=lambda _line: None)
    # the next run clears this work folder's store and artifacts: read the report now
    outcomes: dict[str, bool] | None = None
    gate_failures: list[str] = []
    if result.report:
        report_json = Path(result.report).with_name("report.json")
        if report_json.is_file():
            outcomes = item_outcomes(report_json)
            gate = json.loads(report_json.read_text(encoding="utf-8")).get("gate") or {}
            gate_failures = [c["reason"] for c in gate.get("checks", []) if not c.get("passed") and not c.get("skipped")]
    cycle = result.steps.get("cycle") or {}
    paired = result.paired.get("task_success")
    candidate, champion = result.candidate, result.before
    gain = None if candidate.task_success is None or champion.task_success is None else _r(candidate.task_success - champion.task_success)
    return {
        "pack": pack,
        "seed": seed,
        "strategy": strategy,
        "quick": quick,
        "state": result.state,
        "candidate": {
            "version": candidate.version,
            "task_success": candidate.task_success,
            "wrong_intent": candidate.problem_rates.get("wrong_intent"),
            "problem_rates": candidate.problem_rates,
        },
        "champion": {
            "version": champion.version,
            "task_success": champion.task_success,
            "wrong_intent": champion.problem_rates.get("wrong_intent"),
            "problem_rates": champion.problem_rates,
        },
        "gain": gain,
        "gate_passed": cycle.get("gate_passed"),
        "gate_failures": gate_failures,  # the reason of each failed check
        "labelled": cycle.get("labelled"),
        "mcnemar": paired.model_dump() if paired is not None else None,  # champion -> candidate, task success
        "p_value": paired.p_value if paired is not None else None,
        "seconds": round(time.monotonic() - started, 1),
        "timings": result.timings,
        "outcomes": outcomes,  # candidate, item id -> passed (for the pooled test against random)
    }


def run_line(run: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 100:.1f}%"

    c, b = run["candidate"], run["champion"]
    p = run["p_value"]
    return (
        f"{run['pack']} seed {run['seed']} {run['strategy']}: task success {pct(c['task_success'])} (champion {pct(b['task_success'])}"
        f", p={'n/a' if p is None else f'{p:.3g}'}), wrong_intent {pct(c['wrong_intent'])} (champion {pct(b['wrong_intent'])})"
        f", gate {run['gate_passed']}, labelled {run['labelled']}, {run['state']}, {run['seconds']:.0f}s"
    )


# ---------------------------------------------------------------------------------------------- statistics


def spread(values: list[float | None]) -> dict[str, Any]:
    xs = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": len(xs),
        "mean": _r(statistics.fmean(xs)),
        "sd": _r(statistics.stdev(xs)) if len(xs) > 1 else None,
        "min": _r(min(xs)),
        "max": _r(max(xs)),
    }


def _r(value: float | None) -> float | None:
    """Six decimals: enough for rates over a few thousand items, without float noise in the JSON."""
    return None if value is None else round(value, 6) + 0.0


def paired_t(diffs: list[float]) -> dict[str, Any]:
    """Mean difference, its standard error, t and the two-sided p-value over the seeds (3 seeds: 2 df)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else None
    if n < 2:
        return {"mean": _r(mean), "se": None, "t": None, "p_value": None}
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        return {"mean": _r(mean), "se": 0.0, "t": None, "p_value": 1.0 if mean == 0 else 0.0}
    t = mean / se
    try:
        from scipy.stats import t as student

        p = float(2 * student.sf(abs(t), n - 1))
    except ImportError:
        p = None
    return {"mean": _r(mean), "se": _r(se), "t": _r(t), "p_value": _r(p)}


def against_random(runs: dict[tuple[int, str], dict[str, Any]], seeds: list[int], strategy: str) -> dict[str, Any]:
    """`strategy` against random on one pack: per-seed paired differences and the pooled item-level test."""
    from flywheel.evals.metrics import mcnemar, sign_test_p

    diffs: dict[str, float] = {}
    random_ok: list[bool] = []
    strategy_ok: list[bool] = []
    for seed in seeds:
        base, other = runs.get((seed, "random")), runs.get((seed, strategy))
        if base is None or other is None:
            continue
        a, b = base["candidate"]["task_success"], other["candidate"]["task_success"]
        if a is not None and b is not None:
            diffs[str(seed)] = _r(b - a)
        if base.get("outcomes") and other.get("outcomes"):
            for item in sorted(set(base["outcomes"]) & set(other["outcomes"])):
                random_ok.append(base["outcomes"][item])
                strategy_ok.append(other["outcomes"][item])
    values = list(diffs.values())
    wins, losses = sum(d > 0 for d in values), sum(d < 0 for d in values)
    pooled = mcnemar(random_ok, strategy_ok) if random_ok else None
    return {
        "seeds": len(values),
        "diff_by_seed": diffs,  # strategy's candidate task success minus random's, same seed
        "diff": {**spread(values), **{k: v for k, v in paired_t(values).items() if k != "mean"}},
        "beat_random": wins,
        "lost_to_random": losses,
        "tied": len(values) - wins - losses,
        "sign_test_p": sign_test_p(wins, losses),  # ties dropped; with 3 seeds never below 0.25
        # random's candidate -> this strategy's candidate on the same test items, summed over seeds:
        # fixed = items random failed and this strategy passed, broken = the other way
        "pooled_mcnemar": ({**pooled.model_dump(), "change": _r(pooled.change)} if pooled is not None else None),
    }


def summarise(records: list[dict[str, Any]], packs: list[str], seeds: list[int], strategies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pack in packs:
        runs = {(r["seed"], r["strategy"]): r for r in records if r["pack"] == pack}
        champion = {}
        for seed in seeds:
            first = next((runs[(seed, s)] for s in strategies if (seed, s) in runs), None)
            if first is not None:
                champion[str(seed)] = {k: first["champion"][k] for k in ("version", "task_success", "wrong_intent")}
        per_strategy = {}
        for strategy in strategies:
            mine = [runs[(seed, strategy)] for seed in seeds if (seed, strategy) in runs]
            per_strategy[strategy] = {
                "seeds": len(mine),
                "task_success": spread([r["candidate"]["task_success"] for r in mine]),
                "wrong_intent": spread([r["candidate"]["wrong_intent"] for r in mine]),
                "gain": spread([r["gain"] for r in mine]),  # candidate minus champion task success
                "wrong_intent_change": spread([_minus(r["candidate"]["wrong_intent"], r["champion"]["wrong_intent"]) for r in mine]),
                "significant_gain": sum(1 for r in mine if r["p_value"] is not None and r["p_value"] < 0.05 and (r["gain"] or 0) > 0),
                "gate_passed": sum(1 for r in mine if r["gate_passed"]),
                "labelled": spread([r["labelled"] for r in mine]),
                "seconds": spread([r["seconds"] for r in mine]),
            }
        vs_random = {s: against_random(runs, seeds, s) for s in strategies if s != "random"} if "random" in strategies else {}
        out[pack] = {"champion": champion, "strategies": per_strategy, "vs_random": vs_random}
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------------- main


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick sizes")
    parser.add_argument("--packs", default="banking77,derived", help="comma-separated: banking77, derived, or pack folders")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"comma-separated, or all ({','.join(STRATEGIES)})")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/loop"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a flywheel setting for every run (as FLYWHEEL_SECTION__KEY), e.g. dataset.replay_strategy=boundary; "
        "give each arm of a comparison its own --workdir",
    )
    args = parser.parse_args()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        os.environ["FLYWHEEL_" + key.upper().replace(".", "__")] = value

    strategies = STRATEGIES if args.strategies.strip() == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; expected some of {STRATEGIES} or all")
    strategies = sorted(set(strategies), key=strategies.index)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pack_names = [p.strip() for p in args.packs.split(",") if p.strip()]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    from flywheel.demo.pack import load_pack
    from flywheel.demo.setup import FULL, QUICK

    folders = {pack_label(name): pack_folder(name, workdir) for name in pack_names}
    packs = list(folders)
    results_path = workdir / RESULTS
    done = {(r["pack"], r["seed"], r["strategy"], r["quick"]): r for r in load_records(results_path)}
    started = time.monotonic()
    failed = []
    for pack, folder in folders.items():
        for seed in seeds:
            for strategy in strategies:
                key = (pack, seed, strategy, args.quick)
                if key in done:
                    print(f"{pack} seed {seed} {strategy}: already in {results_path}, skipped", file=sys.stderr, flush=True)
                    continue
                try:
                    run = run_one(pack, folder, seed, strategy, args.quick, workdir)
                except Exception as exc:  # keep going; the run is not recorded, so a re-run retries it
                    traceback.print_exc(file=sys.stderr)
                    print(f"{pack} seed {seed} {strategy}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    failed.append({"pack": pack, "seed": seed, "strategy": strategy, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                with results_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(run) + "\n")
                done[key] = run
                print(run_line(run), file=sys.stderr, flush=True)

    records = [
        r
        for (pack, seed, strategy, quick), r in done.items()
        if pack in folders and seed in seeds and strategy in strategies and quick == args.quick
    ]
    size = QUICK if args.quick else FULL
    summary = {
        "quick": args.quick,
        "budget": size.labelling_budget,
        "seeds": seeds,
        "strategies": strategies,
        "packs": {
            pack: {"folder": str(load_pack(folders[pack]).folder), "intents": len(load_pack(folders[pack]).intents), **body}
            for pack, body in summarise(records, packs, seeds, strategies).items()
        },
        "runs": [{k: v for k, v in r.items() if k not in ("outcomes", "timings")} for r in records],
        "failed": failed,
        "results": str(results_path),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
