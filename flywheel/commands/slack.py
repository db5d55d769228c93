"""`flywheel slack test`: post one message to slack.channel, to check the Slack app's setup before an
approval depends on it (docs/slack.md). A refused token or channel exits 2 with what to fix; Slack out
of reach exits 4."""

from __future__ import annotations

import typer

from flywheel.cli import app, context

slack_app = typer.Typer(no_args_is_help=True, help="Slack approvals: check the app's setup (docs/slack.md).")
app.add_typer(slack_app, name="slack")


@slack_app.command("test")
def slack_test(ctx: typer.Context) -> None:
    """Post one test message to slack.channel with SLACK_BOT_TOKEN; print the result in one line."""
    from flywheel.agent.slack import SlackTokens, send_test_message

    typer.echo(send_test_message(context(ctx).settings, SlackTokens.from_env()))
