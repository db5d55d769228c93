"""`flywheel triage` and `flywheel kb add|search`.

The commands parse flags and print; the work happens in flywheel.data.triage and flywheel.data.kb,
the same functions the agent's tools call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli import app, context, echo_json, err_console
from flywheel.errors import UserInputError

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


@app.command("triage")
def triage_command(
    ctx: typer.Context,
    budget: Annotated[int | None, typer.Option(min=1, help="clusters to send to the judge (default: triage.budget)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Capture failures from new interactions, group near-duplicates, sample within the budget."""
    from flywheel.data.triage import triage

    summary = triage(context(ctx), budget=budget)
    if as_json:
        echo_json(summary.model_dump())
        return
    rules = ", ".join(f"{name} {count}" for name, count in sorted(summary.by_rule.items(), key=lambda kv: -kv[1])) or "none"
    typer.echo(f"scanned {summary.scanned} candidate interactions, captured {summary.captured} failures ({rules})")
    typer.echo(f"clusters: {summary.clusters} new, {summary.duplicates} near-duplicates folded in")
    if summary.reindexed:
        typer.echo(f"re-indexed {summary.reindexed} cluster representatives missing from the vector index")
    typer.echo(f"budget {summary.budget}: {summary.eligible} eligible clusters, {summary.taken} triaged, {summary.skipped} skipped")
    typer.echo("next: flywheel select --budget N (what people should label), then flywheel judge")


kb_app = typer.Typer(no_args_is_help=True, help="The knowledge base: approved responses, policies, documents.")
app.add_typer(kb_app, name="kb")


@kb_app.command("add")
def kb_add(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Markdown (.md) or JSONL (.jsonl) files")],
    as_json: JsonFlag = False,
) -> None:
    """Add KB files; re-adding unchanged content adds nothing. Bad entries are reported and skipped."""
    from flywheel.data.kb import add_files

    summary = add_files(context(ctx).index, files)
    if as_json:
        echo_json(summary.model_dump())
    else:
        typer.echo(
            f"{summary.files} files, {summary.sections} sections: {summary.added} added, "
            f"{summary.updated} updated, {summary.unchanged} unchanged"
        )
        for line in summary.errors:
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)
    problems = []
    if summary.missing:
        problems.append(f"{', '.join(summary.missing)} {'does' if len(summary.missing) == 1 else 'do'} not exist")
    if summary.errors:
        problems.append(f"{len(summary.errors)} bad {'entry' if len(summary.errors) == 1 else 'entries'} skipped")
    if problems:
        done = "the rest was added" if summary.sections else "nothing was added"
        raise UserInputError(f"{'; '.join(problems)}; {done}")
    if not as_json:
        typer.echo("next: flywheel triage (flywheel correct draws on these entries)")


@kb_app.command("search")
def kb_search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="what to look for")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="how many results")] = 5,
    kind: Annotated[str | None, typer.Option(help="approved_response | policy | doc | fact")] = None,
    intent: Annotated[str | None, typer.Option(help="only sections for this intent")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The KB sections nearest in meaning to QUERY."""
    from flywheel.data.kb import KINDS, search

    if kind is not None and kind not in KINDS:
        raise UserInputError(f"--kind {kind!r} is not one of: {', '.join(KINDS)}")
    hits = search(context(ctx).index, query, k=k, kind=kind, intent=intent)
    if as_json:
        echo_json([h.model_dump() for h in hits])
        return
    if not hits:
        typer.echo("no matching sections")
    for hit in hits:
        meta = hit.metadata
        label = " ".join(x for x in (meta.get("kind", ""), f"intent={meta['intent']}" if meta.get("intent") else "") if x)
        typer.echo(f"{hit.similarity:.3f}  {hit.id}  [{label}]  {meta.get('title', '')}  ({meta.get('source', '')})")
        snippet = " ".join(hit.text.split())
        typer.echo(f"       {snippet[:200]}{'…' if len(snippet) > 200 else ''}")
