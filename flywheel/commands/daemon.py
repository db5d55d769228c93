"""`flywheel daemon`: scheduled autonomous cycles, online rounds and the Slack approval app in one
long-running process; `flywheel schedules`: the configured schedules and when each fires next, and the
online-round trigger with the verified samples that arrived since the last round.

The daemon logs to stderr and stops on SIGTERM or SIGINT (exit status 0). A cycle still running after
daemon.shutdown_grace_s is left to its checkpoint (`flywheel resume RUN` continues it) and the process
exits without waiting for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from flywheel.cli import app, context

SlackOption = Annotated[str | None, typer.Option("--slack", help="socket | http | off (default: slack.mode)")]
PortOption = Annotated[
    int | None,
    typer.Option("--port", min=0, max=65535, help="HTTP mode: the port Slack posts to (default: slack.http_port; 0: any free port)"),
]


def _log_to_stderr() -> None:
    # flywheel's own lines at INFO; APScheduler's (a firing skipped or missed) at WARNING, same format
    for name, level in (("flywheel", logging.INFO), ("apscheduler", logging.WARNING)):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_flywheel_daemon", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler._flywheel_daemon = True  # type: ignore[attr-defined]  # our marker on a stdlib handler, read back by getattr above
            logger.addHandler(handler)
        logger.setLevel(level)


@app.command("daemon")
def daemon_command(ctx: typer.Context, slack: SlackOption = None, port: PortOption = None) -> None:
    """Run scheduled improvement cycles (daemon.schedules), online rounds (daemon.round_min_verified) and the Slack approval app until stopped."""
    from flywheel.agent.schedule import Daemon

    _log_to_stderr()
    c = context(ctx)
    daemon = Daemon(c, slack_mode=slack, port=port)
    left = daemon.serve_until_signalled()
    if not left:
        typer.echo("daemon stopped", err=True)
        return
    for run_id in left:
        typer.echo(f"run {run_id} was still running; it is left to its checkpoint: flywheel resume {run_id}", err=True)
    typer.echo("daemon stopped", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    c.close()
    # The cycle's thread cannot be interrupted and the interpreter would wait for it at exit.
    os._exit(0)


@app.command("schedules")
def schedules_command(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The configured schedules (daemon.schedules) and when each fires next; the online-round trigger
    (daemon.round_min_verified) and how many new verified samples it has seen."""
    from flywheel.agent.rounds import describe, round_status
    from flywheel.agent.schedule import JOB_PREFIX, check_schedules

    c = context(ctx)
    settings = c.settings
    rows: list[dict[str, Any]] = []
    for item, trigger in check_schedules(settings):
        upcoming = trigger.get_next_fire_time(None, datetime.now(trigger.timezone))
        rows.append(
            {
                "id": item.id,
                "kind": "cron",
                "job_id": JOB_PREFIX + item.id,
                "cron": item.cron,
                "timezone": settings.daemon.timezone,
                "next_run": upcoming.isoformat() if upcoming else None,
            }
        )
    rounds = round_status(c) if settings.daemon.round_min_verified > 0 else None  # off: no store to open
    if rounds is not None:
        last = rounds.last_round
        rows.append(
            {
                "id": "online-rounds",
                "kind": "round",
                "min_verified": rounds.min_verified,
                "poll_s": rounds.poll_s,
                "new_verified": rounds.new,
                "verified": rounds.verified,
                "due": rounds.enough,
                "waiting_for": rounds.waits_for if rounds.enough else None,
                "last_round": last.run_id if last else None,
                "last_round_at": last.started_at.isoformat() if last else None,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no schedules configured (add [[daemon.schedules]] with id and cron to flywheel.toml, or set daemon.round_min_verified)")
        return
    for row in rows:
        if row["kind"] == "cron":
            typer.echo(f"{row['id']}: {row['cron']} ({row['timezone']}), next run {row['next_run']}")
    if rounds is not None:
        typer.echo(describe(rounds))
