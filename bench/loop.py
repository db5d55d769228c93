"""The demo's loop once per selection strategy, at the same labelling budget, measured on the test set.

Same seed, same production model (built once and reused), same traffic; only the strategy that
chooses which failures a person labels differs. Each cycle runs through the supervisor graph as in
`flywheel demo` and stops at the approval (nobody approves here), so the candidate's test-set numbers
are compared as they stand.

    python bench/loop.py --quick                      # the demo's quick slice, every strategy
    python bench/loop.py --strategies random,hybrid   # the full demo sizes, two strategies

Prints one line per strategy (stderr) as it finishes and, last, one JSON object:
{"budget": N, "champion": {...}, "strategies": {NAME: {"task_success": ..., "problem_rates": {...}}, ...}}
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

    from flywheel.demo.run import DemoOptions, run_demo
    from flywheel.settings import load_settings

    results: dict[str, dict] = {}
    champion = None
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        started = time.monotonic()
        options = DemoOptions(data=args.data, workdir=args.workdir, quick=args.quick, yes=False, interactive=False, seed=args.seed, strategy=strategy)
        result = run_demo(options, say=lambda _line: None)
        cycle = result.steps.get("cycle", {})
        results[strategy] = {
            "task_success": result.candidate.task_success,
            "problem_rates": result.candidate.problem_rates,
            "gate_passed": cycle.get("gate_passed"),
            "labelled": cycle.get("labelled"),
            "seconds": round(time.monotonic() - started, 1),
        }
        champion = {"task_success": result.before.task_success, "problem_rates": result.before.problem_rates}
        print(f"{strategy}: task success {result.candidate.task_success} (champion {result.before.task_success})", file=sys.stderr, flush=True)
    budget = load_settings(args.workdir).selection.labelling_budget
    print(json.dumps({"budget": budget, "champion": champion, "strategies": results}))


if __name__ == "__main__":
    main()
