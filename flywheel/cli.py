"""The `flywheel` command line. One funnel: every FlywheelError becomes one line on stderr and the
error type's exit status; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click as _click
import typer
from rich.console import Console

from flywheel.context import Context
from flywheel.errors import FlywheelError, UserInputError
from flywheel.settings import CONFIG_FILE, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="flywheel: an autonomous training manager for LLM agents in production.")
err_console = Console(stderr=True)

# Rich cuts output that is not a terminal to 80 columns, which truncates ids and intent names in tables
# a person pipes to a file or grep. Piped output gets $COLUMNS when set, else this: tables still take only
# the width their content needs.
PIPED_WIDTH = 1000


def out_console(*, stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A command's console, built per call so that a redirected stdout (tests, pipes) is the one written
    to; full width when piped (PIPED_WIDTH)."""
    import os
    import sys

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS") or PIPED_WIDTH)
    return Console(stderr=stderr, highlight=False, soft_wrap=soft_wrap, width=width)


# typer 0.29 vendors click as typer._click; older typers use click itself. Catch both kinds.
try:
    from typer._click.exceptions import ClickException as _TyperClickException

    _CLICK_ERRORS: tuple[type[_click.ClickException | _TyperClickException], ...] = (_click.ClickException, _TyperClickException)
except ImportError:  # pragma: no cover - depends on the installed typer
    _CLICK_ERRORS = (_click.ClickException,)

# Command modules, each adding its commands to `app`. Imported lazily by main() so that `--help` stays fast
# and a module's heavy imports (torch, chromadb) load only when one of its commands runs.
COMMAND_MODULES = [
    "flywheel.commands.project",
    "flywheel.commands.ingest",
    "flywheel.commands.triage",
    "flywheel.commands.failures",
    "flywheel.commands.synthesize",
    "flywheel.commands.dataset",
    "flywheel.commands.train",
    "flywheel.commands.evaluate",
    "flywheel.commands.release",
    "flywheel.commands.agent",
    "flywheel.commands.daemon",
    "flywheel.commands.slack",
    "flywheel.commands.serve",
    "flywheel.commands.console",
    "flywheel.commands.demo",
]


@app.callback()
def _root(
    ctx: typer.Context,
    project: Annotated[
        Path | None, typer.Option("--project", "-C", help="project folder holding flywheel.toml (default: current folder)")
    ] = None,
) -> None:
    # Settings load on first use so that `flywheel init` works in an empty folder with a broken env.
    ctx.obj = _LazyContext(project)
    # Close the store and the index when the command ends. Left open, a command run in-process (tests,
    # scripts calling main()) leaves a SQLite engine behind, and garbage collection later closes its
    # connection at an arbitrary moment: the last close checkpoints and removes the WAL files while
    # other processes (a training worker, the gateway) still use them.
    ctx.call_on_close(ctx.obj.close)


class _LazyContext:
    def __init__(self, project: Path | None):
        self.project = project
        self._ctx: Context | None = None

    def get(self) -> Context:
        if self._ctx is None:
            folder = _require_project(self.project)
            self._ctx = Context(settings=load_settings(folder))
        return self._ctx

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()


def _require_project(project: Path | None) -> Path:
    """The project folder, refused without a flywheel.toml: opening the store would create `.flywheel/`
    in whatever folder the command ran in. Every command but `init` and `demo` (which make their own
    folder) comes through here, after its arguments parsed, so `--help` works anywhere."""
    folder = (project or Path(os.environ.get("FLYWHEEL_PROJECT_DIR") or ".")).resolve()
    elsewhere = os.environ.get("FLYWHEEL_CONFIG")  # settings read from a file outside the folder
    if not (folder / CONFIG_FILE).is_file() and not (elsewhere and Path(elsewhere).is_file()):
        raise UserInputError(f"not a flywheel project: run flywheel init (no {CONFIG_FILE} in {folder})")
    return folder


def context(ctx: typer.Context) -> Context:
    """The handles for a command: `context(ctx).store`, `.index`, `.settings`."""
    return ctx.find_root().obj.get()


def echo_json(obj: Any) -> None:
    """What every command's --json prints: one indented JSON document on stdout."""
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def project_dir(ctx: typer.Context) -> Path:
    return (ctx.find_root().obj.project or Path(os.environ.get("FLYWHEEL_PROJECT_DIR") or ".")).resolve()


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module, not an absent module
                raise


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chroma
    _register()
    try:
        result = app(args=argv, standalone_mode=False, prog_name="flywheel")
    except FlywheelError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except _CLICK_ERRORS as exc:  # usage errors arrive here in non-standalone mode
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    # `python -m flywheel.cli`: run through the imported module, so that the command modules register on
    # the same `app` object as this entry point (under __main__ they would see a second copy).
    from flywheel.cli import main as _main

    sys.exit(_main())
