"""Gateway commands: `flywheel serve` and `flywheel keys create|list|revoke`.

    flywheel keys create support-bot                 # prints the key once; only its sha256 is stored
    flywheel serve                                   # built-in backend on 127.0.0.1:8080 (serve.* settings)
    flywheel serve --backend proxy --upstream http://127.0.0.1:8000/v1 --port 9000

The gateway itself lives in flywheel.serve; this module parses flags, builds the backend and runs uvicorn.
The proxy's upstream API key, when the upstream needs one, comes from FLYWHEEL_UPSTREAM_API_KEY.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from flywheel.cli import app, context
from flywheel.context import Context
from flywheel.errors import NotFoundError, UserInputError
from flywheel.serve import keys as api_keys
from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.console.auth import ConsoleUser
    from flywheel.serve.keys import ApiKey

keys_app = typer.Typer(no_args_is_help=True, help="API keys for the gateway: one per client, shown once.")
app.add_typer(keys_app, name="keys")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@keys_app.command("create")
def keys_create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the client this key is for, e.g. support-bot")]) -> None:
    """Create a key and print it. It is shown only now: the store keeps its sha256."""
    key = api_keys.create_key(context(ctx).store, name)
    typer.echo(key)
    typer.echo(f"key for {name!r} created; store it now, it is not shown again", err=True)
    typer.echo("next: flywheel serve, then call it with this key (docs/serving.md)", err=True)


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List keys by name (never the keys themselves)."""
    print_named(api_keys.list_keys(context(ctx).store), as_json, empty="no API keys (flywheel keys create NAME)")


def print_named(rows: Sequence[ApiKey | ConsoleUser], as_json: bool, empty: str) -> None:
    """API keys or console users, by name, state and age (never the secret): JSON, or a line each."""
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    if not rows:
        typer.echo(empty)
        return
    for row in rows:
        typer.echo(f"{row.name}\t{'revoked' if row.revoked else 'active'}\t{row.created_at:%Y-%m-%d %H:%M}")


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Revoke a key: a running gateway refuses it within serve.keys_refresh_s."""
    api_keys.revoke_key(context(ctx).store, name)
    typer.echo(f"revoked {name}")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="address to listen on (default serve.host: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="port (default serve.port: 8080)")] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="builtin (transformers + PEFT here) or proxy (an OpenAI-compatible upstream)")
    ] = None,
    upstream: Annotated[str | None, typer.Option("--upstream", help="proxy: the upstream's URL, e.g. http://127.0.0.1:8000/v1")] = None,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="builtin: the base model folder (default: serve.base_model, train.base_model, the champion's)"),
    ] = None,
    no_capture: Annotated[bool, typer.Option("--no-capture", help="do not store interactions (feedback is still recorded)")] = False,
    access_log: Annotated[bool, typer.Option("--access-log", help="log every request")] = False,
) -> None:
    """Serve the champion and canary over an OpenAI-compatible API, capturing every interaction."""
    base = context(ctx).settings
    update: dict[str, object] = {}
    for key, value in (("host", host), ("port", port), ("backend", backend), ("upstream_url", upstream), ("base_model", base_model)):
        if value is not None:
            update[key] = value
    if no_capture:
        update["capture"] = False
    if backend is not None and backend not in ("builtin", "proxy"):
        raise UserInputError(f"--backend {backend!r}: expected builtin or proxy")
    settings: Settings = base.model_copy(update={"serve": base.serve.model_copy(update=update)})
    cfg = settings.serve

    from flywheel.serve.app import create_app
    from flywheel.serve.server import serve_forever

    _log_to_stderr()
    gateway_ctx = Context(settings=settings)
    try:
        engine = _backend(gateway_ctx)
        if cfg.host not in LOOPBACK_HOSTS:
            typer.echo(f"note: listening on {cfg.host}, reachable from other machines; every route still needs an API key", err=True)
        typer.echo(f"flywheel gateway ({engine.kind}) on http://{cfg.host}:{cfg.port}/v1", err=True)
        serve_forever(create_app(gateway_ctx, engine), cfg.host, cfg.port, access_log=access_log)
    finally:
        gateway_ctx.close()


def _backend(ctx: Context):
    from flywheel.serve.backends import BuiltinBackend, ProxyBackend

    cfg = ctx.settings.serve
    if cfg.backend == "proxy":
        if not cfg.upstream_url:
            raise UserInputError("the proxy backend needs an upstream: --upstream http://host:port/v1 (or serve.upstream_url)")
        return ProxyBackend(
            cfg.upstream_url,
            api_key=os.environ.get("FLYWHEEL_UPSTREAM_API_KEY") or None,
            base_model_name=cfg.upstream_model,
            timeout_s=cfg.upstream_timeout_s,
            max_connections=cfg.upstream_max_connections,
            adapter_path_map=cfg.adapter_path_map,
        )
    from flywheel.inference.local_model import LocalModel
    from flywheel.release import registry

    path = cfg.base_model or ctx.settings.train.base_model
    if not path:
        try:
            path = registry.resolve(ctx.store, "champion").base_model
        except NotFoundError:
            raise UserInputError(
                "the built-in backend needs a base model: --base-model FOLDER (or serve.base_model), or a champion in the registry"
            ) from None
    return BuiltinBackend(LocalModel(path), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)


def _log_to_stderr() -> None:
    logger = logging.getLogger("flywheel.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     flywheel: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
