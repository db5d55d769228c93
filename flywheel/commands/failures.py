"""`flywheel failures` (list, counts, show), `flywheel judge`, `flywheel correct`, `flywheel label`.

The commands only parse flags and print: every query goes through flywheel.store.failures and every
stage through its own module, the same functions the agent's tools call.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flywheel.cli import app, context, echo_json, err_console, out_console
from flywheel.errors import UserInputError
from flywheel.records import FailureStatus, FailureView, SampleTier
from flywheel.settings import SEVERITIES

failures_app = typer.Typer(no_args_is_help=False, help="List, count and show captured failures.")
app.add_typer(failures_app, name="failures")

# Fields `failures counts --by` accepts; store.failures.counts groups by these.
COUNT_FIELDS = ("problem_type", "severity", "acceptance", "intent", "status", "rule", "first_seen_version", "tier")

SHOW_UNRESOLVED = 20  # outcomes listed under `flywheel correct`'s table

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _out() -> Console:
    return out_console(soft_wrap=True)  # long logged text is not hard-wrapped: it copies whole


def _one_of(flag: str, value: str | None, allowed: list[str] | tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:
        raise UserInputError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")
    return value


# --- failures: list -----------------------------------------------------------------------------------


@failures_app.callback(invoke_without_command=True)
def failures_list(
    ctx: typer.Context,
    problem_type: Annotated[str | None, typer.Option("--problem-type", help="latest verdict's problem type")] = None,
    severity: Annotated[str | None, typer.Option(help="low | medium | high | critical")] = None,
    intent: Annotated[str | None, typer.Option(help="the logged intent")] = None,
    version: Annotated[str | None, typer.Option(help="model version the failure was first seen in")] = None,
    status: Annotated[str | None, typer.Option(help="captured | triaged | judged | verified | ...")] = None,
    rule: Annotated[str | None, typer.Option(help="the capture rule, e.g. qa_reject")] = None,
    tier: Annotated[str | None, typer.Option(help="problem | candidate_baseline | secondary_baseline | core_baseline")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="at most this many rows")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List failures, highest risk first (duplicates are hidden unless --status duplicate)."""
    if ctx.invoked_subcommand is not None:
        return
    from flywheel.store.failures import FailureFilter, list_failures

    c = context(ctx)
    flt = FailureFilter(
        problem_type=_one_of("--problem-type", problem_type, list(c.settings.taxonomy.problem_types)),
        severity=_one_of("--severity", severity, SEVERITIES),
        intent=intent,
        version=version,
        status=_one_of("--status", status, [s.value for s in FailureStatus]),
        rule=rule,
        tier=_one_of("--tier", tier, [t.value for t in SampleTier]),
        limit=limit,
    )
    rows = list_failures(c.store, flt)
    if as_json:
        echo_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title=f"{len(rows)} failure(s)", title_justify="left")
    for name in ("id", "status", "rule", "intent", "version", "problem type", "severity", "tier", "cluster", "verified"):
        table.add_column(name, no_wrap=name in ("id", "status"))
    for r in rows:
        table.add_row(
            r.id,
            r.status,
            r.rule,
            r.intent or "-",
            r.first_seen_version,
            r.problem_type or "-",
            r.severity or "-",
            r.tier,
            str(r.cluster_size),
            "yes" if r.verified else "",
        )
    _out().print(table)


# --- failures counts ----------------------------------------------------------------------------------


@failures_app.command("counts")
def failures_counts(
    ctx: typer.Context,
    by: Annotated[str, typer.Option(help=f"comma-separated fields: {', '.join(COUNT_FIELDS)}")] = "problem_type,severity",
    as_json: JsonFlag = False,
) -> None:
    """Failures and their frequency (cluster sizes summed), grouped by verdict or failure fields."""
    from flywheel.store.failures import counts

    fields = [f.strip() for f in by.split(",") if f.strip()]
    if not fields:
        raise UserInputError("--by needs at least one field")
    for name in fields:
        _one_of("--by field", name, COUNT_FIELDS)
    rows = counts(context(ctx).store, fields)
    if as_json:
        echo_json(rows)
        return
    table = Table(title="failure counts", title_justify="left")
    for name in [*fields, "failures", "frequency"]:
        table.add_column(name, justify="right" if name in ("failures", "frequency") else "left")
    for row in rows:
        table.add_row(*[("-" if row[f] is None else str(row[f])) for f in fields], str(row["failures"]), str(row["frequency"]))
    _out().print(table)


# --- failures show ID ---------------------------------------------------------------------------------


@failures_app.command("show")
def failures_show(
    ctx: typer.Context, failure_id: Annotated[str, typer.Argument(help="the failure's id, e.g. f-0123456789ab")], as_json: JsonFlag = False
) -> None:
    """One failure: its conversation, verdict, correction and where each came from."""
    from flywheel.data.labels import failure_view

    view = failure_view(context(ctx).store, failure_id)
    if as_json:
        echo_json(view.model_dump(mode="json"))
        return
    _print_view(view)


def _print_view(view: FailureView) -> None:
    out = _out()
    f, i = view.failure, view.interaction
    out.print(f"[bold]{f.id}[/]  status [bold]{f.status}[/]  tier {f.tier} (weight {f.weight:g})  risk {f.risk:g}")
    out.print(
        f"captured by rule {f.rule} (all: {', '.join(f.rules) or f.rule}), first seen in {f.first_seen_version}, "
        f"cluster of {f.cluster_size}" + (f" under {f.cluster_id}" if f.cluster_id and f.cluster_id != f.id else "")
    )
    s = i.signals
    signals = [
        f"feedback={s.feedback}" if s.feedback else "",
        "escalated" if s.escalated_to_human else "",
        f"followups={s.followups}" if s.followups else "",
        f"qa={s.qa_verdict}" if s.qa_verdict else "",
        f"complaint={s.complaint!r}" if s.complaint else "",
        f"tier={s.user_tier}" if s.user_tier else "",
    ]
    out.print(
        f"interaction {i.id} ({i.source or 'unknown source'}) at {i.timestamp:%Y-%m-%d %H:%M:%S}, model {i.model_version}, intent {i.intent or '-'}"
    )
    out.print("signals: " + (", ".join(x for x in signals if x) or "none"))
    out.rule("conversation")
    for m in i.messages:
        text = m.content or ""
        if m.tool_calls:
            text += "".join(f"\n  -> {c.function.name}({c.function.arguments})" for c in m.tool_calls)
        out.print(f"[bold]{m.role}[/]: ", end="")
        out.print(text, markup=False)
    out.rule("verdict")
    v = view.verdict
    if v is None:
        out.print("not judged yet")
    else:
        what = f"{v.problem_type} ({v.severity})" if v.is_failure else "not a failure"
        out.print(f"{v.status}: {what}, acceptance {v.acceptance or '-'}; judge {v.judge}, prompt {v.prompt_version or '-'}")
        if v.rationale:
            out.print(f"rationale: {v.rationale}", markup=False)
        if v.reason:
            out.print(f"reason: {v.reason}", markup=False)
    if view.reference is not None:
        r = view.reference
        out.rule("label")
        out.print(f"intent {r.intent or '-'} ({r.source})" + (f"\nanswer: {r.answer}" if r.answer else ""), markup=False)
    out.rule("correction")
    c = view.correction
    if c is None:
        out.print("none yet")
    else:
        ver = c.verification
        if not c.answer:  # an attempt that produced no answer (store.failures.save_uncorrectable)
            state = "could not correct"
        else:
            state = "verified" if c.verified else ("failed verification" if ver else "not verified")
        out.print(f"{state}; generator {c.generator}, prompt {c.prompt_version or '-'}, verifier {ver.verifier if ver else '-'}")
        if c.answer:
            out.print(c.answer, markup=False)
        for reason in ver.reasons if ver else []:
            out.print(f"  - {reason}", markup=False)
        if c.context_ids:
            out.print(f"context: {', '.join(c.context_ids)}", markup=False)
    if view.tier_moves:
        out.rule("tier moves")
        for move in view.tier_moves:
            out.print(
                f"{move['created_at']}: {move['from_tier']} -> {move['to_tier']} by {move['actor']}"
                + (f" at {move['version']}" if move.get("version") else "")
                + (f" ({move['reason']})" if move.get("reason") else ""),
                markup=False,
            )


# --- judge, correct -----------------------------------------------------------------------------------


def _print_summary(title: str, summary: Any, as_json: bool) -> None:
    data = summary.model_dump(mode="json") if hasattr(summary, "model_dump") else dict(summary)
    if as_json:
        echo_json(data)
        return
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = f"{len(value)} item(s)"  # per-item detail is in --json
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        table.add_row(key, str(value))
    _out().print(table)


@app.command()
def judge(
    ctx: typer.Context,
    failure_ids: Annotated[
        list[str] | None, typer.Option("--id", help="judge exactly these failures (may repeat), whatever their status")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Judge triaged failures: problem type, severity and acceptance for each."""
    from flywheel.evals.judge import judge_failures

    _print_summary("judge", judge_failures(context(ctx), failure_ids or None), as_json)
    if not as_json:
        _out().print("next: flywheel correct", highlight=False)


@app.command()
def correct(
    ctx: typer.Context,
    failure_ids: Annotated[
        list[str] | None, typer.Option("--id", help="only these failures (may repeat); retries corrected/uncorrectable ones")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write and verify a corrected answer for every judged failure."""
    from flywheel.correct.stage import correct_failures

    summary = correct_failures(context(ctx), failure_ids or None)
    _print_summary("correct", summary, as_json)
    if as_json:
        return
    # What a person should look at: every failure that did not end verified, with its first reason.
    unresolved = [o for o in summary.outcomes if o.status != "verified"]
    out = _out()
    for outcome in unresolved[:SHOW_UNRESOLVED]:
        out.print(f"{outcome.failure_id} {outcome.status}: {outcome.reasons[0] if outcome.reasons else ''}", markup=False)
    if len(unresolved) > SHOW_UNRESOLVED:
        out.print(f"... and {len(unresolved) - SHOW_UNRESOLVED} more (--json lists all)")
    out.print("next: flywheel dataset build", highlight=False)


# --- label --------------------------------------------------------------------------------------------


@app.command()
def label(
    ctx: typer.Context,
    failure_id: Annotated[str | None, typer.Argument(help="the failure to label")] = None,
    intent: Annotated[str | None, typer.Option(help="the right intent of the user's request")] = None,
    answer: Annotated[str | None, typer.Option(help="the right answer, when you know it")] = None,
    fine: Annotated[bool, typer.Option("--fine", help="the logged answer was right as it stands")] = False,
    by: Annotated[str | None, typer.Option(help="who labels (default: your user name)")] = None,
    file: Annotated[Path | None, typer.Option("--file", help='JSONL: {"failure_id", "intent", "answer"?, "by"?} per line')] = None,
    as_json: JsonFlag = False,
) -> None:
    """Record a human label for a failure: the right intent (optionally the right answer), or --fine."""
    from flywheel.data.labels import add_label, add_labels_from_file, count_labels

    c = context(ctx)
    store = c.store
    labeller = by or _user_name()
    if file is not None:
        if failure_id or intent or answer or fine:
            raise UserInputError("give either --file or FAILURE_ID --intent, not both")
        result = add_labels_from_file(store, file, labeller, settings=c.settings)
        for problem in result.errors:
            err_console.print(problem, highlight=False, markup=False, soft_wrap=True)
        total = count_labels(store)
        if as_json:
            echo_json({**result.model_dump(), "labels_total": total})
        else:
            typer.echo(f"stored {result.added} of {result.lines} label(s) from {file}; {total} label(s) in all")
        if result.errors:
            raise UserInputError(f"{len(result.errors)} line(s) of {file} were rejected; the other {result.added} are stored")
        if not as_json:
            typer.echo("next: flywheel judge")
        return
    if not failure_id or not (intent or fine):
        raise UserInputError("give FAILURE_ID and --intent or --fine (or --file labels.jsonl)")
    given = {"intent": intent, "answer": answer, "fine": fine}
    label_id = add_label(store, failure_id, {k: v for k, v in given.items() if v}, labeller, settings=c.settings)
    total = count_labels(store)
    if as_json:
        echo_json({"label_id": label_id, "failure_id": failure_id, "labels_total": total})
    else:
        said = "fine as answered" if fine else intent
        typer.echo(f"labelled {failure_id} as {said} (label {label_id}); {total} label(s) in all; `flywheel judge` takes it into account")


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"
