"""`flywheel console` (the web console) and `flywheel console users add|list|revoke`.

    flywheel console users add alice        # prints alice's login token once; only its sha256 is stored
    flywheel console                        # http://127.0.0.1:8090 (console.host / console.port)
    flywheel console --host 0.0.0.0 --port 9000

The console itself is flywheel.console; this module parses flags and runs uvicorn. docs/console.md has
the security model and the reverse-proxy setup.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flywheel.cli import app, context
from flywheel.commands.serve import print_named
from flywheel.console import auth

console_app = typer.Typer(no_args_is_help=False, help="The web console: approvals, labelling, failures, versions.")
users_app = typer.Typer(no_args_is_help=True, help="Console users: one token each, shown once.")
console_app.add_typer(users_app, name="users")
app.add_typer(console_app, name="console")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@console_app.callback(invoke_without_command=True)
def console(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="address to listen on (default console.host: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="port (default console.port: 8090)")] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="log every request")] = False,
) -> None:
    """Serve the web console (loopback by default)."""
    if ctx.invoked_subcommand is not None:
        return
    from flywheel.console.app import build_app
    from flywheel.serve.server import serve_forever

    c = context(ctx)
    cfg = c.settings.console
    host, port = host or cfg.host, port or cfg.port
    if not auth.list_users(c.store) and not cfg.trusted_header:
        typer.echo("note: no console users yet; add one with `flywheel console users add NAME` (it prints the login token)", err=True)
    if host not in LOOPBACK_HOSTS:
        typer.echo(f"note: listening on {host}, reachable from other machines; put it behind HTTPS (docs/console.md)", err=True)
    typer.echo(f"flywheel console on http://{host}:{port}/", err=True)
    serve_forever(build_app(c), host, port, access_log=access_log)


@users_app.command("add")
def users_add(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the person's name, e.g. alice")]) -> None:
    """Add a console user and print their login token. It is shown only now: the store keeps its sha256."""
    c = context(ctx)
    token = auth.create_user(c.store, name)
    typer.echo(token)
    typer.echo(f"console user {name!r} added; give them this token now, it is not shown again", err=True)
    if name.strip() not in c.settings.approvals.approvers:
        typer.echo(f"note: {name.strip()} is not in approvals.approvers: they can look and label, not approve or roll back", err=True)


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List console users by name (never their tokens)."""
    print_named(auth.list_users(context(ctx).store), as_json, empty="no console users (flywheel console users add NAME)")


@users_app.command("revoke")
def users_revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the user's name")]) -> None:
    """Revoke a console user: their sessions stop working with their next request."""
    auth.revoke_user(context(ctx).store, name)
    typer.echo(f"revoked {name}")
