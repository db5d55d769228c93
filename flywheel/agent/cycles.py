"""Cycles back to back: run improvement cycles, record what each did, and stop when the loop is stable.

One cycle is one supervisor run (flywheel.agent.runner.start_run): triage what the traffic revealed,
label, judge, correct, build, train, evaluate, canary, ask, promote, graduate. Between cycles the world
moves on: the new champion serves traffic and its failures are the next cycle's input (`before_cycle`
is where the demo serves that traffic; in production the gateway captures it as it comes).

After each cycle a `CycleRecord` is written from the run's outcome, the candidate's eval report and the
store (task success and every problem rate of the champion after the cycle on the fixed test set, the
samples per tier, graduated and demoted samples, labels spent, training runs, wall time, cost).

`stop_reason` decides, from the records and [loop], whether another cycle runs:
  - the last cycle could not finish (failed, waits for a person, nothing left to train on);
  - `until_stable` and the last cycle promoted a candidate whose targeted problem types (task success
    when none were targeted) improved by no more than loop.min_gain on the fixed test set;
  - loop.max_gate_failures cycles ended without a promotion (gate failed, rejected, canary rolled back);
  - a budget is spent: loop.max_labels, loop.max_training_runs, loop.max_wall_s, loop.max_cycles.
A cycle that fails its gate leaves the champion where it was and graduates nothing, so the next cycle
starts from the last champion (flywheel.release.graduation moves samples only on a promotion).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.context import Context
from flywheel.data.labels import count_labels
from flywheel.records import Record
from flywheel.release.graduation import GRADUATE
from flywheel.release.registry import resolve
from flywheel.settings_sections import LoopSettings
from flywheel.store import tiers

if TYPE_CHECKING:  # the runner pulls in the agent graph; the records here are read without it (demo results)
    from flywheel.agent.runner import OnEvent, RunOutcome

MAX_CYCLES = 1000  # a bound on any one loop (loop.max_cycles, `flywheel demo --cycles`)
NOT_PROMOTED = ("gate_failed", "rejected", "canary_rolled_back")
CANNOT_GO_ON = ("failed", "step_failed", "waiting_approval", "nothing_to_train", "stopped")

BeforeCycle = Callable[[int, str], None]  # (cycle number, the champion now) -> None


class CycleRecord(Record):
    cycle: int  # 1-based
    run_id: str
    # promoted | waiting_approval | rejected | gate_failed | canary_rolled_back | nothing_to_train | step_failed | stopped | failed
    state: str
    champion_before: str
    candidate: str | None = None
    champion: str  # after the cycle
    report: str | None = None  # the candidate's report.json
    task_success: float | None = None  # the champion's after the cycle, fixed test set
    problem_rates: dict[str, float] = {}
    targeted: list[str] = []
    improvement: dict[str, float] = {}  # promoted cycles: drop of each targeted rate (task success gain when none)
    tiers: dict[str, int] = {}
    graduated: int = 0
    down_weighted: int = 0
    demoted: int = 0  # baselines the promoted version failed again: back to problem
    confirmed: int = 0  # baselines moved up a tier with the approval
    labels: int = 0
    training_runs: int = 0
    wall_s: float = 0.0
    cost: dict[str, float] = {}  # the eval report's cost block, when it has one
    message: str = ""


class CyclesResult(Record):
    cycles: list[CycleRecord]
    stop_reason: str


def cycle_state(outcome: RunOutcome) -> str:
    """What became of a cycle, from its run's outcome."""
    result = outcome.outcome or {}
    if result.get("promoted"):
        return "promoted"
    if outcome.state == "waiting_approval":
        return "waiting_approval"
    if outcome.state == "failed":
        return "failed"
    cycle = outcome.cycle or {}
    if cycle.get("canary_state") == "rolled_back":
        return "canary_rolled_back"
    if cycle.get("gate_passed") is False:
        return "gate_failed"
    if result.get("decision") == "rejected":
        return "rejected"
    if cycle.get("errors"):
        return "step_failed"  # a tool refused (bad data, a guard such as dataset.min_label_yield): the message says which
    if not cycle.get("dataset_id"):
        return "nothing_to_train"
    return outcome.state


def record_cycle(ctx: Context, number: int, outcome: RunOutcome, champion_before: str, labels_before: int, wall_s: float) -> CycleRecord:
    state = cycle_state(outcome)
    cycle, result = outcome.cycle or {}, outcome.outcome or {}
    candidate = cycle.get("candidate")
    report_path, report = _report(ctx, candidate)
    record = CycleRecord(
        cycle=number,
        run_id=outcome.run_id,
        state=state,
        champion_before=champion_before,
        candidate=candidate,
        champion=resolve(ctx.store, "champion").id,
        report=str(report_path) if report_path else None,
        labels=count_labels(ctx.store) - labels_before,
        training_runs=1 if cycle.get("job_id") else 0,
        wall_s=round(wall_s, 1),
        graduated=int(result.get("graduated", 0)),
        down_weighted=int(result.get("down_weighted", 0)),
        demoted=int(result.get("regressed", 0)),
        confirmed=int(result.get("confirmed", 0)),
        message=outcome.message[:500] if outcome.message else (outcome.error or ""),
    )
    with ctx.store.engine.connect() as conn:
        record.tiers = tiers.tier_counts(conn)
        if state == "promoted" and candidate and not record.graduated:
            # a promotion answered outside this process (or replayed) still left its moves in the store
            record.graduated = len(tiers.moved_by(conn, candidate, GRADUATE))
    if report is not None:
        side = "candidate" if state == "promoted" else "champion"
        test = (report.get(f"{side}_metrics") or {}).get("test") or {}
        record.task_success = (test.get("task_success") or {}).get("rate")
        record.problem_rates = {name: rate["rate"] for name, rate in (test.get("problem_rates") or {}).items()}
        record.targeted = list(report.get("targeted") or [])
        record.cost = {k: v for k, v in (report.get("cost") or {}).items() if isinstance(v, (int, float))}
        if state == "promoted":
            record.improvement = _improvement(report, record.targeted)
    return record


def _report(ctx: Context, candidate: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    if not candidate:
        return None, None
    version = resolve(ctx.store, candidate)
    if not version.eval_report_path:
        return None, None
    path = Path(version.eval_report_path)
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return path, None


def _improvement(report: dict[str, Any], targeted: list[str]) -> dict[str, float]:
    """How much the promoted candidate improved on the champion on the fixed test set: each targeted
    problem rate's drop, or task success's gain when nothing was targeted."""
    before = (report.get("champion_metrics") or {}).get("test") or {}
    after = (report.get("candidate_metrics") or {}).get("test") or {}
    if not before or not after:
        return {}
    if not targeted:
        return {"task_success": round(after["task_success"]["rate"] - before["task_success"]["rate"], 6)}
    rates_b, rates_a = before.get("problem_rates") or {}, after.get("problem_rates") or {}
    return {t: round(rates_b[t]["rate"] - rates_a[t]["rate"], 6) for t in targeted if t in rates_b and t in rates_a}


def stop_reason(history: list[CycleRecord], limits: LoopSettings, *, until_stable: bool, max_cycles: int, elapsed_s: float) -> str | None:
    """Why no further cycle runs (None: run another). See the module docstring for the rules."""
    last = history[-1]
    if last.state in CANNOT_GO_ON:
        return {
            "failed": f"cycle {last.cycle} failed: {last.message}",
            "step_failed": f"cycle {last.cycle} stopped at a step: {last.message}",
            "waiting_approval": f"cycle {last.cycle}'s candidate {last.candidate} waits for a person's decision",
            "nothing_to_train": f"cycle {last.cycle} found nothing to train on",
            "stopped": f"cycle {last.cycle} stopped: {last.message}",
        }[last.state]
    misses = sum(1 for c in history if c.state in NOT_PROMOTED)
    if misses >= limits.max_gate_failures:
        return f"{misses} cycles ended without a promotion (loop.max_gate_failures {limits.max_gate_failures})"
    if until_stable and last.state == "promoted":
        best = max(last.improvement.values(), default=0.0)
        if best <= limits.min_gain:
            shown = ", ".join(f"{k} {v * 100:+.1f} pts" for k, v in last.improvement.items()) or "nothing measured"
            return (
                f"stable: cycle {last.cycle} improved its targets by no more than loop.min_gain {limits.min_gain * 100:.1f} pts ({shown})"
            )
    labels = sum(c.labels for c in history)
    if limits.max_labels and labels >= limits.max_labels:
        return f"the label budget is spent ({labels} of loop.max_labels {limits.max_labels})"
    runs = sum(c.training_runs for c in history)
    if limits.max_training_runs and runs >= limits.max_training_runs:
        return f"the training budget is spent ({runs} of loop.max_training_runs {limits.max_training_runs})"
    if limits.max_wall_s and elapsed_s >= limits.max_wall_s:
        return f"the time budget is spent ({elapsed_s:.0f} s of loop.max_wall_s {limits.max_wall_s:.0f})"
    if len(history) >= max_cycles:
        return f"{len(history)} cycle(s) run, as asked"
    return None


def run_cycles(
    ctx: Context,
    *,
    trigger: str = "run",
    policy: Any = None,
    max_cycles: int | None = None,
    until_stable: bool = True,
    yes: bool = False,
    ask: Any = None,
    on_event: OnEvent | None = None,
    before_cycle: BeforeCycle | None = None,
    on_cycle: Callable[[CycleRecord], None] | None = None,
) -> CyclesResult:
    """Run cycles until `stop_reason` says stop. `before_cycle(n, champion)` runs before every cycle
    after the first; `on_cycle` sees each record as it is made."""
    from flywheel.agent.runner import start_run

    limits = ctx.settings.loop
    cap = limits.max_cycles if max_cycles is None else max_cycles
    started = time.monotonic()
    history: list[CycleRecord] = []
    while True:
        number = len(history) + 1
        champion = resolve(ctx.store, "champion").id
        if before_cycle is not None and number > 1:
            before_cycle(number, champion)
        labels_before, began = count_labels(ctx.store), time.monotonic()
        outcome = start_run(ctx, trigger, policy, yes, ask=ask, on_event=on_event)
        record = record_cycle(ctx, number, outcome, champion, labels_before, time.monotonic() - began)
        history.append(record)
        if on_cycle is not None:
            on_cycle(record)
        why = stop_reason(history, limits, until_stable=until_stable, max_cycles=cap, elapsed_s=time.monotonic() - started)
        if why is not None:
            return CyclesResult(cycles=history, stop_reason=why)
