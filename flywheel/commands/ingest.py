"""`flywheel ingest FILE...`: load logged conversations into the store (see docs/ingest.md).

Exit status: 0 when every line was stored, was a duplicate, or is a bad line an earlier run quarantined
already; 2 when a line was newly quarantined (an id conflict included) or a file could not be read
(everything good was stored all the same). So a scheduled re-ingest of a growing file exits 2 once per
new bad line, not on every run for the same old ones; the summary still counts those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli import app, context, err_console
from flywheel.data.formats import FORMATS
from flywheel.data.ingest import FileSummary, IngestSummary, ingest_files
from flywheel.errors import UserInputError

EXIT_QUARANTINED = 2


def _line(f: FileSummary) -> str:
    if f.error:
        return f"{f.path}: {f.error}"
    text = f"{f.path}: read {f.read}, stored {f.stored}, duplicates {f.duplicates}, quarantined {f.quarantined}"
    if f.reasons:
        text += " (" + ", ".join(f"{kind} {n}" for kind, n in sorted(f.reasons.items())) + ")"
    if f.already_quarantined:
        text += f", already quarantined {f.already_quarantined}"
    return text


def summary_dict(summary: IngestSummary) -> dict:
    data = summary.model_dump()
    data["total"] = {
        "read": sum(f.read for f in summary.files),
        "stored": summary.stored,
        "duplicates": sum(f.duplicates for f in summary.files),
        "quarantined": summary.quarantined,
        "conflicts": summary.conflicts,
        "already_quarantined": summary.already_quarantined,
        "failed_files": summary.failed_files,
    }
    return data


@app.command()
def ingest(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="JSON Lines files (.jsonl, .jsonl.gz) or JSON arrays of interactions")],
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"record shape: {', '.join(FORMATS)} (auto detects it per line)")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Read logged conversations, scrub PII, and store them; bad lines go to the quarantine file."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    ctx_handles = context(ctx)
    summary = ingest_files(ctx_handles.store, ctx_handles.settings, list(files), fmt=fmt)
    if as_json:
        typer.echo(json.dumps(summary_dict(summary), indent=2))
    else:
        for f in summary.files:
            typer.echo(_line(f))
        if len(summary.files) > 1:
            total = summary_dict(summary)["total"]
            already = f", already quarantined {total['already_quarantined']}" if total["already_quarantined"] else ""
            typer.echo(
                f"total: read {total['read']}, stored {total['stored']}, duplicates {total['duplicates']}, quarantined {total['quarantined']}{already}"
            )
        typer.echo("next: flywheel triage")
    for f in summary.files:
        if f.error:
            err_console.print(f"[bold red]error:[/] {f.path}: {f.error}", highlight=False, soft_wrap=True)
    if summary.quarantined:
        conflicts = f" ({summary.conflicts} reuse a stored id with different content)" if summary.conflicts else ""
        err_console.print(
            f"{summary.quarantined} line(s) quarantined{conflicts}; see {summary.quarantine_path}", highlight=False, soft_wrap=True
        )
    if summary.already_quarantined:
        err_console.print(
            f"{summary.already_quarantined} bad line(s) already quarantined earlier (see {summary.quarantine_path}); not written again",
            highlight=False,
            soft_wrap=True,
        )
    if not summary.clean:
        raise typer.Exit(EXIT_QUARANTINED)
