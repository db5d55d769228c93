"""The manager agent's commands: `flywheel chat`, `run`, `runs`, `resume RUN`, `approvals`.

(`flywheel approve` and `flywheel reject` live in flywheel.commands.release; when a run waits on the
version they resume that run to its promotion through flywheel.agent.runner.decide.)

With no terminal attached (stdin is not a TTY) and no --yes, `flywheel run` stops at an approval, leaves
it pending, prints how to answer it and exits 0. An infrastructure error stops a run with exit status 4;
its checkpoint stays, and `flywheel resume RUN` continues it.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cli import app, context, echo_json, out_console
from flywheel.errors import InfrastructureError, UserInputError

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
PolicyOption = Annotated[str | None, typer.Option("--policy", help="auto | heuristic | llm (default: agent.policy)")]
YesFlag = Annotated[
    bool, typer.Option("--yes", "-y", help="approve a candidate that passes its gate, as you (the approver list still applies)")
]


def _out() -> Console:
    return out_console(soft_wrap=True)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _view(c: Any, quiet: bool, may_ask: bool) -> Any:
    from flywheel.agent.chat import TerminalView

    return TerminalView(_out(), c.settings, read=input if may_ask else None, verbose=not quiet)


def _finish(outcome: Any, view: Any, as_json: bool) -> None:
    """Print how the run ended; a failed run exits 4 (InfrastructureError) with how to resume it."""
    if as_json:
        echo_json(outcome.model_dump(mode="json"))
    else:
        out = view.console
        if outcome.state == "waiting_approval" and outcome.pending is not None:
            view.show_pending(outcome.pending)
            out.print(f"\n{escape(outcome.pending.version)} waits for a decision. Answer with:\n  {escape(outcome.pending.answer_hint())}")
        elif outcome.state == "stopped":
            out.print(
                f"run {outcome.run_id} stopped: {escape(outcome.stop_reason or '')}; continue with `flywheel resume {outcome.run_id}`"
            )
        elif outcome.state == "done":
            out.print(f"run {outcome.run_id} done.")
    if outcome.state == "failed":
        raise InfrastructureError(outcome.error or f"run {outcome.run_id} failed")


@app.command("run")
def run_command(
    ctx: typer.Context,
    yes: YesFlag = False,
    policy: PolicyOption = None,
    as_json: JsonFlag = False,
    until_stable: Annotated[
        bool,
        typer.Option(
            "--until-stable",
            help="run cycle after cycle until no targeted problem type improves by more than loop.min_gain, a [loop] budget "
            "is spent, or loop.max_gate_failures cycles end without a promotion",
        ),
    ] = False,
    max_cycles: Annotated[
        int | None, typer.Option("--max-cycles", min=1, max=1000, help="with --until-stable: at most this many (default loop.max_cycles)")
    ] = None,
) -> None:
    """Run one autonomous improvement cycle now: triage, judge, correct, build a dataset, train, evaluate.
    A candidate that passes its gate waits for a person's approval."""
    from flywheel.agent.runner import start_run

    c = context(ctx)
    may_ask = _interactive() and not as_json
    view = _view(c, as_json, may_ask)
    if until_stable:
        _run_until_stable(c, view, yes, policy, as_json, may_ask, max_cycles)
        return
    if max_cycles is not None:
        raise UserInputError("--max-cycles goes with --until-stable")
    outcome = start_run(c, "run", policy, yes, ask=view.ask if may_ask else None, on_event=None if as_json else view.on_event)
    _finish(outcome, view, as_json)


def _run_until_stable(c: Any, view: Any, yes: bool, policy: str | None, as_json: bool, may_ask: bool, max_cycles: int | None) -> None:
    """Cycles back to back (flywheel.agent.cycles); one line per cycle, then why they stopped. Exit 4
    when the last cycle failed (resume it with `flywheel resume RUN`)."""
    from flywheel.agent.cycles import run_cycles

    def said(record: Any) -> None:
        if as_json:
            return
        shown = "-" if record.task_success is None else f"{record.task_success:.1%}"
        view.console.print(
            f"cycle {record.cycle} ({record.run_id}): {record.state}; champion {escape(record.champion)}, task success {shown}, "
            f"{record.graduated} graduated, {record.demoted} demoted, {record.labels} labels, {record.wall_s:.0f}s",
            highlight=False,
        )

    result = run_cycles(
        c,
        trigger="run",
        policy=policy,
        max_cycles=max_cycles,
        until_stable=True,
        yes=yes,
        ask=view.ask if may_ask else None,
        on_event=None if as_json else view.on_event,
        on_cycle=said,
    )
    if as_json:
        echo_json(result.model_dump(mode="json"))
    else:
        view.console.print(f"stopped after {len(result.cycles)} cycle(s): {escape(result.stop_reason)}", highlight=False)
    last = result.cycles[-1]
    if last.state == "failed":
        raise InfrastructureError(f"cycle {last.cycle} failed: {last.message}; continue with `flywheel resume {last.run_id}`")


@app.command("resume")
def resume_command(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="the run id (see `flywheel runs`)")],
    yes: YesFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Continue a run that was stopped, failed or interrupted, from the step it was in."""
    from flywheel.agent.runner import resume_run

    c = context(ctx)
    may_ask = _interactive() and not as_json
    view = _view(c, as_json, may_ask)
    outcome = resume_run(
        c,
        run_id,
        yes=yes,
        ask=view.ask if may_ask else None,
        on_event=None if as_json else view.on_event,
        confirm=view.confirm if may_ask else None,
    )  # a chat stopped at its plan asks again
    _finish(outcome, view, as_json)


@app.command("chat")
def chat_command(
    ctx: typer.Context,
    policy: PolicyOption = None,
    run_id: Annotated[str | None, typer.Option("--run", help="continue an earlier chat run")] = None,
) -> None:
    """Talk with the manager: ask what failed, why a version failed its gate, or ask it to fix something."""
    from flywheel.agent.chat import ChatSession

    c = context(ctx)
    if run_id is not None:
        from flywheel.agent.runs import get_run

        get_run(c.store, run_id)  # a clear error for an unknown id
    session = ChatSession(c, _view(c, False, True), policy, run_id=run_id)
    session.loop(input)


@app.command("runs")
def runs_command(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many, newest first")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List agent runs with their state."""
    from flywheel.agent.runner import list_runs

    rows = list_runs(context(ctx), limit)
    if as_json:
        echo_json([r.model_dump(mode="json") for r in rows])
        return
    if not rows:
        typer.echo("no agent runs yet (flywheel run starts one)")
        return
    table = Table(title="agent runs", title_justify="left")
    for column in ("run", "trigger", "state", "policy", "candidate", "updated", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        cycle = r.summary.get("cycle") or {}
        candidate = cycle.get("candidate") or "-"
        if cycle.get("candidate") and cycle.get("gate_passed") is not None:
            candidate += " (gate passed)" if cycle["gate_passed"] else " (gate failed)"
        note = (
            r.error
            or (f"waits: flywheel approve {r.pending['version']}" if r.pending and r.state == "waiting_approval" else "")
            or str(r.summary.get("last_message") or "")[:80]
        )
        table.add_row(r.id, r.trigger, r.state, r.policy, candidate, r.updated_at.strftime("%Y-%m-%d %H:%M"), escape(note))
    _out().print(table)


@app.command("approvals")
def approvals_command(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Pending approvals: candidates that passed their gate and wait for a person's decision."""
    from flywheel.agent.runner import pending_approvals

    pending = pending_approvals(context(ctx))
    if as_json:
        echo_json([p.model_dump(mode="json") for p in pending])
        return
    if not pending:
        typer.echo("no approvals pending")
        return
    out = _out()
    for item in pending:
        out.print(f"[bold]{escape(item.version)}[/] (run {item.run_id}, since {item.requested_at:%Y-%m-%d %H:%M}): {escape(item.summary)}")
        out.print(f"  report {escape(item.report_html or item.report_json)} (hash {item.report_hash[:12]})")
        out.print(f"  {escape(item.answer_hint())}")
