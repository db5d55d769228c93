"""The demo's loop once per selection strategy, at the same labelling budget, measured on the test set.

Same seed, same production model (built once and reused), same traffic; only the strategy that
chooses which failures a person labels differs. Each run stops after the evaluation (no canary or
promotion), since the candidate's test-set numbers are what is compared.

    python bench/loop.py --quick                      # the demo's quick slice, every strategy
    python bench/loop.py --strategies random,hybrid   # the full demo sizes, two strategies

Prints one line per strategy as it finishes and, last, one JSON object:
{"budget": N, "strategies": {NAME: {"task_success": ..., "problem_rates": {...}}, ...}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

STRATEGIES = ["random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/loop"))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flywheel.demo.loop import run_cycle
    from flywheel.demo.cycle import CanaryTraffic, TruthLabeller
    from flywheel.demo.run import DemoOptions, prepare, side

    results: dict[str, dict] = {}
    budget = None
    quiet = lambda _line: None  # noqa: E731 - the per-step log of each run is not the point here
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        started = time.monotonic()
        options = DemoOptions(data=args.data, workdir=args.workdir, quick=args.quick, yes=True, seed=args.seed, strategy=strategy)
        ctx, pack, size, truth, canary_rows, _ = prepare(options, quiet)
        try:
            budget = ctx.settings.selection.labelling_budget
            hooks = {"labeller": TruthLabeller(ctx, truth), "canary_traffic": CanaryTraffic(ctx, pack, canary_rows, args.workdir, args.seed, truth)}
            outcome = run_cycle(ctx, hooks, options, quiet, stop_after_eval=True)
            report = json.loads(Path(outcome["report_json"]).read_text())
            after = side(report, "candidate", outcome["candidate"])
            before = side(report, "champion", outcome["champion_before"])
            labelling = outcome["steps"]["labelling"]
            results[strategy] = {
                "task_success": after.task_success,
                "problem_rates": after.problem_rates,
                "labelled": labelling["labelled"],
                "labels_exposing_a_mistake": sum(r["gain"] * r["picked"] for r in labelling["rounds"]),
                "gate_passed": report["gate"]["passed"],
                "seconds": round(time.monotonic() - started, 1),
            }
            results.setdefault("_champion", {"task_success": before.task_success, "problem_rates": before.problem_rates})
            print(f"{strategy}: task success {after.task_success:.3f} (champion {before.task_success:.3f})", file=sys.stderr, flush=True)
        finally:
            ctx.close()
    champion = results.pop("_champion", None)
    print(json.dumps({"budget": budget, "champion": champion, "strategies": results}))


if __name__ == "__main__":
    main()
