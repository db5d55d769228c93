"""Release commands: `flywheel models`, `approve`, `reject`, `promote`, `rollback`, `canary ...`,
`graduate` and `baseline confirm`.

The commands parse flags and print; every decision and check lives in flywheel.release (registry,
approvals, canary, graduation), the same functions the gateway and the agent call. A person at the terminal approves on the "terminal" channel under their OS user name
(or --by); a refused promotion exits with status 5 (PolicyViolation) and says which check failed.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flywheel.cli import app, context, echo_json, out_console
from flywheel.errors import PolicyViolation, UserInputError
from flywheel.release import approvals, canary, graduation, registry
from flywheel.release.evaluation import verified_report
from flywheel.release.records import DecisionKind

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
ByOption = Annotated[str | None, typer.Option("--by", help="who decides (default: your OS user name)")]

canary_app = typer.Typer(no_args_is_help=True, help="Serve a candidate to a share of users and watch its problem rates.")
baseline_app = typer.Typer(no_args_is_help=True, help="Confirm graduated samples as baselines.")
app.add_typer(canary_app, name="canary")
app.add_typer(baseline_app, name="baseline")


def _out() -> Console:
    return out_console(soft_wrap=False)


def _who(by: str | None) -> str:
    return (by or getpass.getuser()).strip()


def _version_id(ctx: typer.Context, name: str) -> str:
    """A version id from an id or an alias (champion, canary, previous)."""
    return registry.resolve(context(ctx).store, name).id


# --- models -------------------------------------------------------------------------------------------------


@app.command()
def models(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List model versions with their aliases, status, lineage, gate, approval and key metrics."""
    rows = registry.list_versions(context(ctx).store)
    if as_json:
        echo_json([r.model_dump(mode="json") for r in rows])
        return
    if not rows:
        typer.echo("no model versions yet (flywheel train registers them)")
        return
    table = Table(title="model versions", title_justify="left")
    for column in ("version", "aliases", "status", "parent", "dataset", "job", "gate", "approval", "task success", "targeted rates"):
        table.add_column(column, overflow="fold")
    for r in rows:
        gate = "-" if r.gate_passed is None else ("[green]passed[/]" if r.gate_passed else "[red]failed[/]")
        rates = ", ".join(f"{k} {v:.1%}" for k, v in r.targeted_problem_rates.items()) or "-"
        table.add_row(
            r.id,
            ", ".join(r.aliases) or "-",
            r.status,
            r.parent or "-",
            r.dataset_id or "-",
            r.job_id or "-",
            gate,
            r.approval or "-",
            f"{r.task_success:.1%}" if r.task_success is not None else "-",
            rates,
        )
    _out().print(table)


# --- decisions ------------------------------------------------------------------------------------------------


@app.command()
def approve(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="the version to approve (v3, or canary), or an agent run waiting on one")],
    by: ByOption = None,
    reason: Annotated[str, typer.Option("--reason", help="why, kept with the approval")] = "",
    baselines: Annotated[
        bool, typer.Option("--baselines/--no-baselines", help="also move up the baseline samples the approval request proposes (default)")
    ] = True,
) -> None:
    """Approve a version's current eval report and promote it to champion.

    When an agent run waits for this decision, the run is resumed and promotes in its promotion node;
    the baseline samples its request proposes move up a tier with it (--no-baselines: they stay)."""
    c = context(ctx)
    who = _who(by)
    if _answer_waiting_run(ctx, version, "approved", who, reason, confirm_baselines=baselines):
        return
    target = _version_id(ctx, version)
    decision = approvals.record_approval(c.store, target, "approved", who, "terminal", reason=reason)
    typer.echo(f"approved {target} (report {decision.report_hash[:12]}) by {decision.approver}")
    try:
        done = approvals.promote(c.store, c.settings, target, actor=who)
    except PolicyViolation as exc:
        raise PolicyViolation(f"the approval is recorded, but {target} was not promoted: {exc}") from None
    _print_promotion(done)


def _answer_waiting_run(
    ctx: typer.Context, name: str, decision: DecisionKind, who: str, reason: str, *, confirm_baselines: bool = True
) -> bool:
    """If an agent run waits for a decision on `name` (a run id, a version or an alias), record the
    decision and resume the run to its promotion or rejection; False when no run waits on it."""
    from flywheel.agent.runner import decide, waiting_run
    from flywheel.errors import InfrastructureError

    c = context(ctx)
    run = waiting_run(c, name)
    if run is None:
        return False
    version = (run.pending or {}).get("version", name)
    typer.echo(f"run {run.id} waits on {version}: recording the decision and resuming it")
    outcome = decide(c, run.id, decision, who, reason, "terminal", confirm_baselines=confirm_baselines)
    if outcome.state == "failed":
        raise InfrastructureError(outcome.error or f"run {run.id} failed after the decision")
    result = outcome.outcome or {}
    if result.get("error"):
        raise PolicyViolation(f"{version} was not changed: {result['error']}")
    typer.echo(outcome.message or f"run {run.id} is {outcome.state}")
    return True


@app.command()
def promote(ctx: typer.Context, version: Annotated[str, typer.Argument(help="an approved version")], by: ByOption = None) -> None:
    """Promote a version that a person already approved (e.g. on Slack) to champion."""
    c = context(ctx)
    _print_promotion(approvals.promote(c.store, c.settings, _version_id(ctx, version), actor=_who(by)))


def _print_promotion(done: approvals.Promotion) -> None:
    if done.replayed:
        typer.echo(f"{done.version} is already the champion; nothing changed")
    else:
        typer.echo(f"promoted {done.version} to champion" + (f"; previous is {done.previous}" if done.previous else ""))
    typer.echo(f"next: flywheel keys create NAME and flywheel serve (a running gateway serves {done.version} without a restart)")


@app.command()
def reject(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="the version to reject, or an agent run waiting on one")],
    reason: Annotated[str, typer.Option("--reason", help="why (required)")] = "",
    by: ByOption = None,
) -> None:
    """Reject a version: it never serves, and its dataset's failures stay problem samples.

    When an agent run waits for this decision, the run is resumed and records the rejection itself."""
    if not reason.strip():
        raise UserInputError("reject needs --reason TEXT")
    if _answer_waiting_run(ctx, version, "rejected", _who(by), reason):
        return
    c = context(ctx)
    target = _version_id(ctx, version)
    result = approvals.reject(c.store, target, _who(by), reason)
    typer.echo(f"rejected {target} by {result.approval.approver}: {reason}")
    if result.returned_to_pool:
        typer.echo(f"{len(result.returned_to_pool)} problem samples stay in the pool for the next cycle")
    elif result.pool_note:
        typer.echo(f"no samples returned to the pool: {result.pool_note}")


@app.command()
def rollback(
    ctx: typer.Context, reason: Annotated[str, typer.Option("--reason", help="why, kept with the event")] = "", by: ByOption = None
) -> None:
    """Return the champion to the previous version."""
    done = approvals.rollback(context(ctx).store, actor=_who(by), reason=reason or "manual rollback")
    typer.echo(f"rolled back {done.rolled_back}; champion is {done.champion}")
    if done.reverted_samples:
        typer.echo(f"{len(done.reverted_samples)} samples that graduated with {done.rolled_back} went back to their tier")


# --- canary ----------------------------------------------------------------------------------------------------


@canary_app.command("start")
def canary_start(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="a candidate that passed its gate")],
    share: Annotated[float | None, typer.Option("--share", help="share of users it serves (default canary.share)")] = None,
    by: ByOption = None,
) -> None:
    """Start serving a candidate to a share of users."""
    c = context(ctx)
    target = _version_id(ctx, version)
    switch = canary.start_canary(c.store, target, share, actor=_who(by))
    effective = registry.current_routing(c.store).share
    typer.echo(f"canary {target} already at {effective:.0%}" if switch.replayed else f"canary {target} started at {effective:.0%} of users")
    typer.echo(f"next: flywheel canary status (it compares {target} with the champion), then flywheel approve {target}")


@canary_app.command("status")
def canary_status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Compare the canary with the champion now; roll it back if it harms. Recorded every time."""
    c = context(ctx)
    status = canary.observe_canary(c.store, c.settings)
    if as_json:
        echo_json(status.model_dump(mode="json"))
        return
    console = _out()
    if status.state == "none":
        console.print(status.reason)
        return
    console.print(
        f"canary {status.version} at {status.share:.0%} vs champion {status.champion} since {status.started_at:%Y-%m-%d %H:%M}: [bold]{status.state}[/]"
    )
    table = Table(title_justify="left")
    for column in ("rate", status.champion or "champion", status.version or "canary"):
        table.add_column(column, justify="right" if column != "rate" else "left")
    champ, cand = status.champion_stats, status.canary_stats
    if champ is not None and cand is not None:
        table.add_row("requests", str(champ.requests), str(cand.requests))
        table.add_row("failure rate", f"{champ.failure_rate.rate:.1%}", f"{cand.failure_rate.rate:.1%}")
        for problem_type in sorted(set(champ.problem_rates) | set(cand.problem_rates)):
            before, after = champ.problem_rates.get(problem_type), cand.problem_rates.get(problem_type)
            table.add_row(problem_type, f"{before.rate if before else 0:.1%}", f"{after.rate if after else 0:.1%}")
    console.print(table)
    console.print(status.reason)
    if status.state in ("collecting", "healthy"):
        console.print(f"next: flywheel approve {status.version} (or flywheel reject {status.version} --reason TEXT)", highlight=False)


@canary_app.command("stop")
def canary_stop(
    ctx: typer.Context, reason: Annotated[str, typer.Option("--reason", help="why, kept with the event")] = "", by: ByOption = None
) -> None:
    """Stop the canary; the version goes back to candidate."""
    switch = canary.stop_canary(context(ctx).store, actor=_who(by), reason=reason)
    typer.echo(f"canary {switch.from_version} stopped")


# --- samples ---------------------------------------------------------------------------------------------------


@app.command()
def graduate(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="the promoted version (the champion)")],
    results: Annotated[Path | None, typer.Option("--results", help="JSON {failure_id: fixed} (default: the version's eval report)")] = None,
    by: ByOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Move samples by how the promoted version does on them: fixed problems become candidate baselines."""
    c = context(ctx)
    target = registry.resolve(c.store, version)
    fixed = graduation.outcomes_from_report(_load_results(results) if results else verified_report(target)[0])
    result = graduation.graduate(c.store, c.settings, target.id, fixed=fixed, actor=_who(by))
    if as_json:
        echo_json(result.model_dump(mode="json"))
        return
    typer.echo(
        f"{target.id}: {len(result.graduated)} graduated to candidate_baseline, {len(result.down_weighted)} still failing "
        f"(down-weighted), {len(result.regressed)} baselines regressed to problem, {len(result.skipped)} skipped"
    )
    for failure_id, why in sorted(result.skipped.items()):
        typer.echo(f"  skipped {failure_id}: {why}")


def _load_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"--results {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--results {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"--results {path}: expected a JSON object {{failure_id: true|false}} or an eval report")
    return data


@baseline_app.command("confirm")
def baseline_confirm(
    ctx: typer.Context,
    failure_ids: Annotated[list[str], typer.Argument(help="failure ids to confirm")],
    by: ByOption = None,
    reason: Annotated[str, typer.Option("--reason", help="why, kept with each move")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Confirm graduated samples: candidate -> secondary baseline, secondary -> core baseline."""
    moves = graduation.confirm_baseline(context(ctx).store, failure_ids, actor=_who(by), reason=reason)
    if as_json:
        echo_json([m.model_dump(mode="json") for m in moves])
        return
    for move in moves:
        typer.echo(f"{move.failure_id}: {move.from_tier} -> {move.to_tier}")
    untouched = len(set(failure_ids)) - len(moves)
    if untouched:
        typer.echo(f"{untouched} already core baseline")
