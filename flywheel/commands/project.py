"""`flywheel init`: a project folder with flywheel.toml and the state folder."""

from __future__ import annotations

from importlib import resources

import typer

from flywheel.cli import app, err_console, project_dir
from flywheel.settings import CONFIG_FILE, STATE_DIR, load_settings


@app.command()
def init(ctx: typer.Context, force: bool = typer.Option(False, help="overwrite an existing flywheel.toml")) -> None:
    """Create flywheel.toml and the .flywheel state folder here (or in --project)."""
    folder = project_dir(ctx)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CONFIG_FILE
    if target.exists() and not force:
        err_console.print(f"{target} exists; keeping it (use --force to overwrite)")
    else:
        target.write_text(resources.files("flywheel").joinpath("defaults/flywheel.toml").read_text(encoding="utf-8"), encoding="utf-8")
        typer.echo(f"wrote {target}")
    settings = load_settings(folder)  # proves the file parses
    settings.state_path.mkdir(parents=True, exist_ok=True)
    gitignore = folder / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(f"{STATE_DIR}/\n", encoding="utf-8")
    typer.echo(f"state folder {settings.state_path}")
