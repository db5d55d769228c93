"""`flywheel eval`: evaluate a candidate against the champion, apply the promotion gate, write the report.

Exit status: 0 when the gate passes, 1 when it fails (the report is written either way), and the
usual error statuses for bad input or broken infrastructure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cli import app, context, err_console, out_console
from flywheel.context import Context
from flywheel.errors import NotFoundError, UserInputError
from flywheel.evals.gate import SET_LABELS, GateResult
from flywheel.evals.metrics import points
from flywheel.evals.report import SET_ORDER, EvalReport, ModelRef
from flywheel.release import registry
from flywheel.release.evaluation import champion_ref, ref_from_version

GATE_FAILED_EXIT = 1


def _out() -> Console:
    return out_console(soft_wrap=False)


# --- resolving what to evaluate -----------------------------------------------------------------------------


def _resolve_version(ctx: Context, name: str) -> ModelRef | None:
    try:
        return ref_from_version(registry.resolve(ctx.store, name))
    except NotFoundError:
        return None


def _folder_ref(path: Path, base: str | None, flag: str) -> ModelRef:
    """A folder given on the command line: an adapter folder (over `base`) or a whole model folder."""
    if (path / "adapter_config.json").is_file():
        if not base:
            raise UserInputError(f"{flag} {path} is an adapter folder: give --base (or set train.base_model)")
        return ModelRef(name=path.name, base_model=base, adapter_path=str(path))
    if (path / "config.json").is_file():
        return ModelRef(name=path.name, base_model=str(path))
    raise UserInputError(f"{flag} {path}: neither a PEFT adapter folder nor a model folder")


def resolve_candidate(ctx: Context, candidate: str | None, candidate_adapter: Path | None, base: Path | None) -> ModelRef:
    default_base = str(base) if base else (ctx.settings.train.base_model or None)
    if candidate_adapter is not None:
        if candidate is not None:
            raise UserInputError("give --candidate or --candidate-adapter, not both")
        return _folder_ref(candidate_adapter, default_base, "--candidate-adapter")
    if candidate is None:
        raise UserInputError(
            "name the model to evaluate: --candidate VERSION (or an adapter folder), or --candidate-adapter PATH --base PATH"
        )
    found = _resolve_version(ctx, candidate)
    if found is not None:
        return found
    if Path(candidate).is_dir():
        return _folder_ref(Path(candidate), default_base, "--candidate")
    raise NotFoundError(f"--candidate {candidate!r}: no such registered version and no such folder (see `flywheel models`)")


def resolve_champion(ctx: Context, champion: str | None, candidate: ModelRef) -> ModelRef:
    """--champion when given; else the registry's champion; else the candidate's own base model
    (release.evaluation.champion_ref, what the agent's run_evaluation compares against too)."""
    if champion is not None:
        found = _resolve_version(ctx, champion)
        if found is not None:
            return found
        if Path(champion).is_dir():
            return _folder_ref(Path(champion), candidate.base_model, "--champion")
        raise NotFoundError(f"--champion {champion!r}: no such registered version and no such folder")
    return champion_ref(ctx.store, candidate)


# --- printing -----------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _change(before: float, after: float, lower_is_better: bool) -> str:
    delta = after - before
    if points(delta) == "+0.0":
        return "[dim]+0.0[/]"
    good = delta < 0 if lower_is_better else delta > 0
    return f"[{'green' if good else 'red'}]{points(delta)}[/]"


def metrics_table(report: EvalReport) -> Table:
    title = f"{escape(report.candidate.name)} (candidate) vs {escape(report.champion.name)} (champion)"
    table = Table(title=title, title_justify="left")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("champion", justify="right")
    table.add_column("candidate", justify="right")
    table.add_column("change (pts)", justify="right")
    for name in SET_ORDER:
        before, after = report.before.get(name), report.after.get(name)
        if before is None or after is None or after.empty:
            table.add_row(SET_LABELS[name], "[dim]empty: not evaluated[/]", "", "", "")
            continue
        label = f"{SET_LABELS[name]} ({after.size})"
        b, a = before.task_success, after.task_success
        table.add_row(label, "task success", _pct(b.rate), _pct(a.rate), _change(b.rate, a.rate, False))
        for problem_type, rate in after.problem_rates.items():
            old = before.problem_rates.get(problem_type)
            old_rate = old.rate if old else 0.0
            if old_rate == 0 and rate.rate == 0 and problem_type not in report.targeted:
                continue  # absent on both sides: keeps the table short
            mark = " [cyan](targeted)[/]" if problem_type in report.targeted else ""
            table.add_row("", f"{escape(problem_type)}{mark}", _pct(old_rate), _pct(rate.rate), _change(old_rate, rate.rate, True))
        table.add_section()
    return table


def print_gate(console: Console, gate: GateResult) -> None:
    """Failing checks, then passing ones; passing intent checks and types absent on both sides are
    counted rather than listed (the report lists every reason)."""
    verdict = "[bold green]PASSED[/]" if gate.passed else "[bold red]FAILED[/]"
    console.print(f"gate {verdict}: {len(gate.failed_checks)} of {len(gate.checks)} checks failed")
    for check in gate.failed_checks:
        console.print(f"  [red]x[/] {escape(check.reason)}")
    quiet = 0
    for check in gate.checks:
        if not check.passed:
            continue
        routine = not check.skipped and (check.kind == "intent" or (check.kind == "problem_type" and check.before == check.after == 0))
        if routine:
            quiet += 1
        else:
            console.print(f"  [green]ok[/] {escape(check.reason)}")
    if quiet:
        console.print(f"  [green]ok[/] {quiet} more checks passed: intents within bounds, problem types absent before and after")


# --- the command --------------------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    candidate: Annotated[
        str | None, typer.Option("--candidate", help="a registered version (v3, canary) or an adapter/model folder")
    ] = None,
    champion: Annotated[
        str | None, typer.Option("--champion", help="version to compare against (default: the champion alias, else the base model)")
    ] = None,
    candidate_adapter: Annotated[
        Path | None, typer.Option("--candidate-adapter", help="an adapter folder to evaluate without registering it")
    ] = None,
    base: Annotated[
        Path | None, typer.Option("--base", help="base model folder for --candidate-adapter (default: train.base_model)")
    ] = None,
    targeted: Annotated[
        str | None,
        typer.Option("--targeted", help="comma-separated problem types the candidate must reduce (default: the problem set's types)"),
    ] = None,
    curve: Annotated[
        Path | None, typer.Option("--curve", help="training curve JSON to chart (default: curve.json beside the adapter)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report JSON instead of tables")] = False,
) -> int:
    """Evaluate a candidate against the champion on the test, baseline and problem sets; gate; report."""
    from flywheel.evals.runner import record_on_version, run_eval

    c = context(ctx)
    cand = resolve_candidate(c, candidate, candidate_adapter, base)
    champ = resolve_champion(c, champion, cand)
    wanted = [t.strip() for t in (targeted or "").split(",") if t.strip()]
    progress: Callable[[str], None] = (
        (lambda _msg: None) if as_json else (lambda msg: err_console.print(msg, highlight=False, markup=False))
    )
    report = run_eval(c, cand, champ, wanted, curve_path=curve, progress=progress)
    attached = record_on_version(c.store, report)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "report_hash": report.report_hash,
                    "path_json": str(report.path_json),
                    "path_html": str(report.path_html),
                    "attached_to": attached,
                    "report": json.loads(report.path_json.read_text(encoding="utf-8")),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        console = _out()
        console.print(metrics_table(report))
        print_gate(console, report.gate)
        console.print(f"report {escape(str(report.path_html))}")
        console.print(f"report hash {report.report_hash}" + (f" (recorded on {attached})" if attached else ""))
        if attached and report.gate.passed:
            console.print(f"next: flywheel canary start {escape(attached)}, then flywheel approve {escape(attached)}", highlight=False)
        elif attached:
            console.print(f"next: flywheel reject {escape(attached)} --reason TEXT (an approval cannot override the gate)", highlight=False)
    return 0 if report.gate.passed else GATE_FAILED_EXIT
