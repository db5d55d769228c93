"""`flywheel demo`: the whole loop on an intent dataset, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.agent.cycles import MAX_CYCLES
from flywheel.cli import app


@app.command()
def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            help="dataset folder: train.csv, test.csv, categories.json (+ kb.jsonl, demo.toml); default: the bundled Banking77 pack"
        ),
    ] = None,
    workdir: Annotated[Path, typer.Option(help="project folder the demo writes (store, models, reports)")] = Path("flywheel-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="a small slice, for CI: the same path in a few minutes")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="approve the candidate at the approval step")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object on the last line")] = False,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="selection strategy for labelling (random, least_confidence, margin, entropy, kcenter, kmeans, expected_change, hybrid)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for sampling, simulation and training")] = 0,
    synthesis: Annotated[
        bool, typer.Option("--synthesis/--no-synthesis", help="generate and score extra training samples before building the dataset")
    ] = False,
    cycles: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_CYCLES, help="improvement cycles; before each after the first, the champion of the moment serves new traffic"
        ),
    ] = 1,
) -> None:
    """Run the whole loop on real data with no network and no LLM endpoint, and leave the HTML report."""
    from flywheel.agent.chat import TerminalView
    from flywheel.demo.run import DemoOptions, run_demo
    from flywheel.settings import load_settings

    console = Console(stderr=as_json, highlight=False, soft_wrap=True)
    interactive = sys.stdin.isatty()
    options = DemoOptions(
        data=data,
        workdir=workdir,
        quick=quick,
        yes=yes,
        interactive=interactive,
        seed=seed,
        strategy=strategy,
        synthesis=synthesis,
        cycles=cycles,
    )
    # the view prints each step of the supervisor's run and, at a terminal, asks for the approval inline
    view = TerminalView(console, load_settings(), read=input if interactive and not yes else None)
    result = run_demo(options, say=lambda line: console.print(line, markup=False), on_event=view.on_event, ask=view.ask)
    _print_table(console, result)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "before": result.before.model_dump(),
                    "after": result.after.model_dump(),
                    "candidate": result.candidate.model_dump(),
                    "paired": {name: {**test.model_dump(), "change": round(test.change, 6)} for name, test in result.paired.items()},
                    "promoted": result.promoted,
                    "report": result.report,
                    "state": result.state,
                    "snapshot": result.steps.get("snapshot"),
                    "timings": result.timings,
                    "cycles": [c.model_dump(mode="json") for c in result.cycles],
                    "stop_reason": result.stop_reason,
                }
            )
        )


def _print_table(console: Console, result) -> None:
    table = Table(title="fixed test set: before and after")
    table.add_column("metric")
    table.add_column(f"before ({result.before.version})", justify="right")
    table.add_column(f"after ({result.after.version})", justify="right")
    table.add_column("change", justify="right")

    def row(name: str, b: float | None, a: float | None) -> None:
        change = "" if b is None or a is None else f"{(a - b) * 100:+.1f} pts"
        table.add_row(name, _pct(b), _pct(a), change)

    row("task success", result.before.task_success, result.after.task_success)
    for name in sorted(set(result.before.problem_rates) | set(result.after.problem_rates)):
        row(f"rate: {name}", result.before.problem_rates.get(name), result.after.problem_rates.get(name))
    console.print(table)
    for name in ("task_success", "wrong_intent"):
        test = result.paired.get(name)
        if test is not None and test.n:
            console.print(
                f"candidate {result.candidate.version} vs {result.before.version}, {name.replace('_', ' ')} on the same {test.n} test items: "
                f"{test.fixed} fixed, {test.broken} broken, McNemar p = {test.p_value:.2g}",
                highlight=False,
            )
    if len(result.cycles) > 1:
        _print_cycles(console, result.cycles)
        console.print(f"cycles stopped: {result.stop_reason}", highlight=False)
    console.print(f"state: {result.state}; promoted: {result.promoted}; report: {result.report}", highlight=False)
    if result.how_to_approve:
        console.print(f"approve with: {result.how_to_approve}", highlight=False)
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    console.print(f"timings: {timings}", highlight=False)


def _print_cycles(console: Console, cycles) -> None:
    table = Table(title="cycle by cycle: the champion after each, fixed test set")
    for name in (
        "cycle",
        "state",
        "champion",
        "task success",
        "wrong_intent",
        "core/secondary/candidate",
        "graduated",
        "demoted",
        "labels",
        "wall",
    ):
        table.add_column(name, justify="left" if name in ("state", "champion") else "right")
    for c in cycles:
        table.add_row(
            str(c.cycle),
            c.state,
            c.champion,
            _pct(c.task_success),
            _pct(c.problem_rates.get("wrong_intent")),
            f"{c.tiers.get('core_baseline', 0)}/{c.tiers.get('secondary_baseline', 0)}/{c.tiers.get('candidate_baseline', 0)}",
            str(c.graduated),
            str(c.demoted),
            str(c.labels),
            f"{c.wall_s:.0f}s",
        )
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"
