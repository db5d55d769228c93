"""`flywheel init`: a project folder with flywheel.toml and the state folder, and optionally the base
model registered as v1, the first champion."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli import app, err_console, project_dir
from flywheel.errors import UserInputError
from flywheel.settings import CONFIG_FILE, STATE_DIR, Settings, load_settings

# The template's commented `base_model` line under [train], which `--base` replaces.
_BASE_LINE = re.compile(r"^# base_model = .*$", re.MULTILINE)


@app.command()
def init(
    ctx: typer.Context,
    force: bool = typer.Option(False, help="overwrite an existing flywheel.toml"),
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="base model: a folder, or a Hugging Face id (org/name) in the local cache; set as train.base_model and registered as v1, the champion",
        ),
    ] = None,
) -> None:
    """Create flywheel.toml and the .flywheel state folder here (or in --project)."""
    base_path = _check_base(base) if base is not None else None  # before anything is written
    folder = project_dir(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CONFIG_FILE
    if target.exists() and not force:
        err_console.print(f"{target} exists; keeping it (use --force to overwrite)")
    else:
        template = resources.files("flywheel").joinpath("defaults/flywheel.toml").read_text(encoding="utf-8")
        target.write_text(_with_base(template, base_path) if base_path is not None else template, encoding="utf-8")
        typer.echo(f"wrote {target}")
    settings = load_settings(folder)  # proves the file parses
    settings.state_path.mkdir(parents=True, exist_ok=True)
    gitignore = folder / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(f"{STATE_DIR}/\n", encoding="utf-8")
    typer.echo(f"state folder {settings.state_path}")
    if base_path is not None:
        typer.echo(_register_base(settings, target, base_path))
    typer.echo("next: flywheel ingest LOGS.jsonl (the line format is in docs/ingest.md)")


def _check_base(base: str) -> Path:
    """The base model folder, absolute as `flywheel train` makes it (so both name the same version). A hub
    id becomes its cached snapshot folder: flywheel.toml and the registry record that folder, which pins the
    revision, so training and serving later use the weights v1 was registered with."""
    from flywheel.inference.folders import resolve_base_model

    try:
        return resolve_base_model(base).resolve()
    except UserInputError as exc:
        raise UserInputError(f"--base {exc}") from None


def _origin(base_path: Path) -> str:
    """' (Hugging Face org/name at revision <commit>)' for a cached snapshot, else ''."""
    from flywheel.inference.folders import hub_origin

    origin = hub_origin(base_path)
    return f" (Hugging Face {origin[0]} at revision {origin[1]})" if origin else ""


def _with_base(template: str, base_path: Path) -> str:
    # json.dumps writes a valid TOML basic string (quotes and backslashes escaped).
    line = f"base_model = {json.dumps(str(base_path))}   # registered as v1, the first champion, by flywheel init{_origin(base_path)}"
    text, count = _BASE_LINE.subn(lambda _m: line, template, count=1)
    if count != 1:
        raise RuntimeError("defaults/flywheel.toml has no '# base_model = ' line under [train]")
    return text


def _register_base(settings: Settings, target: Path, base_path: Path) -> str:
    from flywheel.context import Context
    from flywheel.release import registry

    configured = settings.train.base_model
    if not configured or Path(configured).expanduser().resolve() != base_path:
        # A kept flywheel.toml is not rewritten: training would use another base than the champion.
        now = f"sets train.base_model to {configured!r}" if configured else "does not set train.base_model"
        raise UserInputError(f"{target} {now}; put base_model = {json.dumps(str(base_path))} under [train] or run init --force")
    c = Context(settings=settings)
    try:
        notes = f"base model, registered by flywheel init{_origin(base_path)}"
        version, registered = registry.first_champion(c.store, str(base_path), actor="flywheel init", notes=notes)
    finally:
        c.close()
    if registered:
        return f"registered {base_path}{_origin(base_path)} as {version.id}, the champion"
    return f"the champion is already {version.id} ({version.base_model}); nothing registered"
