"""`flywheel synthesize` (generate, score, store) and `flywheel synthetic` (what was kept or dropped, and why).

The commands parse flags and print; the work happens in flywheel.synthesis.stage, the same function
the agent's `synthesize` tool calls.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flywheel.cli import app, context, echo_json, err_console
from flywheel.errors import NotFoundError, UserInputError

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


@app.command("synthesize")
def synthesize_command(
    ctx: typer.Context,
    generator: Annotated[
        list[str] | None, typer.Option("--generator", "-g", help="run only this generator (repeatable; default: synthesis.generators)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="generate and score, store nothing: counts per generator and filter")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Generate training samples from verified ones, the knowledge base and traffic; score each; keep the good ones."""
    from flywheel.synthesis.stage import synthesize

    summary = synthesize(context(ctx), generator, dry_run=dry_run)
    if as_json:
        echo_json(summary.model_dump(mode="json"))
    else:
        _print_summary(summary, dry_run)
    if summary.problem_count:
        for problem in summary.problems:
            err_console.print(f"{problem.generator}: {problem.source}: {problem.problem}", highlight=False, soft_wrap=True, markup=False)
        if summary.problem_count > len(summary.problems):
            err_console.print(f"... and {summary.problem_count - len(summary.problems)} more bad inputs", highlight=False, markup=False)
        # the rest was generated, scored and stored; the exit status still says that some input was bad
        stored = "nothing was stored (dry run)" if dry_run else "the rest was scored and stored"
        raise UserInputError(f"{summary.problem_count} bad input(s) skipped (each with its source, on stderr); {stored}")


def _print_summary(summary: Any, dry_run: bool) -> None:
    short = len(summary.wants)
    typer.echo(f"{short} intents have fewer than the wanted verified samples; perplexity: {summary.perplexity}")
    pref = summary.preference
    typer.echo(
        f"preference predictor: {'trained' if pref['trained'] else 'not trained'} on {pref['accepted']} accepted, {pref['rejected']} rejected decisions"
    )
    for name, c in summary.generators.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(c.dropped.items(), key=lambda kv: -kv[1])) or "none"
        typer.echo(f"  {name:<10} generated {c.generated:>5}  kept {c.kept:>5}  dropped: {dropped}  ({c.seconds:.1f}s)")
        if c.problems:
            typer.echo(f"  {'':<10} {c.problems} bad inputs skipped")
    stored = "nothing stored (dry run)" if dry_run else f"{summary.new} new samples stored"
    typer.echo(f"{summary.generated} generated, {summary.kept} kept; {stored} in {summary.seconds:.1f}s")
    if not dry_run:
        typer.echo("next: flywheel synthetic --dropped (why samples were left out), then flywheel dataset build")


@app.command("synthetic")
def synthetic_command(
    ctx: typer.Context,
    sample_id: Annotated[str | None, typer.Argument(help="show one sample with its scores and provenance")] = None,
    kept: Annotated[bool, typer.Option("--kept", help="only kept samples")] = False,
    dropped: Annotated[bool, typer.Option("--dropped", help="only dropped samples")] = False,
    generator: Annotated[str | None, typer.Option("--generator", "-g", help="only this generator's samples")] = None,
    intent: Annotated[str | None, typer.Option(help="only this intent")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Generated samples with why each was kept or dropped."""
    from flywheel.store import synthetic as synthetic_repo

    store = context(ctx).store
    if sample_id is not None:
        row = synthetic_repo.find(store, sample_id)
        if row is None:
            raise NotFoundError(f"no generated sample with id {sample_id!r} (see flywheel synthetic)")
        echo_json(row)
        return
    if kept and dropped:
        kept = dropped = False  # both: every sample
    rows = synthetic_repo.listing(
        store, generator=generator, kept_only=True if kept else False if dropped else None, intent=intent, limit=limit
    )
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no generated samples match (run flywheel synthesize)")
        return
    for row in rows:
        user = next((m.get("content") or "" for m in reversed(row["messages"]) if m.get("role") == "user"), "")
        why = "kept" if row["kept"] else (row["reasons"] or ["dropped"])[0]
        typer.echo(f"{row['id']}  {row['generator']:<9} {row['intent'][:28]:<28} {user[:60]!r}  {why}")
