"""`flywheel train` and `flywheel jobs` (list, show, logs, resume, cancel).

The commands parse flags and print; launching, watching and resuming go through flywheel.trainer.launcher,
the same functions the agent's tools call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli import app, context, echo_json, err_console, out_console
from flywheel.errors import UserInputError

jobs_app = typer.Typer(no_args_is_help=False, help="Training jobs: list, show, logs, resume, cancel, manifest.")
app.add_typer(jobs_app, name="jobs")

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
WaitFlag = Annotated[bool, typer.Option("--wait/--no-wait", help="stream progress until the job ends")]


def _out() -> Console:
    return out_console(soft_wrap=True)


def _summary(record: Any) -> str:
    progress = record.progress or {}
    parts = [f"job {record.id}", str(record.status)]
    if progress.get("total"):
        parts.append(f"step {progress.get('step', 0)}/{progress['total']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eval_loss") is not None:
        parts.append(f"eval_loss {progress['eval_loss']:.4f}")
    return "  ".join(parts)


def _candidate(c: Any, record: Any) -> str | None:
    """The version registered for a succeeded job's adapter (None while the job has not succeeded).

    The worker registers it as the job ends (flywheel.trainer.worker), so a job nobody waits on is
    registered too. Asking again here goes through the agent's register_candidate, which is idempotent
    (the same weights give the same version), and covers a worker stopped between its verdict and its
    registration."""
    from flywheel.tools.jobs import register_candidate
    from flywheel.trainer.jobs import JobStatus

    if record.status != JobStatus.SUCCEEDED:
        return None
    return register_candidate(c, record.id).version


def _with_version(record: Any, version: str | None) -> dict[str, Any]:
    return {**record.model_dump(mode="json"), "version": version}


def _print_next(version: str) -> None:
    _out().print(f"registered {version} (candidate); next: flywheel eval --candidate {version}")


def _first_champion(c: Any, base_model: str, as_json: bool) -> None:
    """With no champion yet, the base model becomes v1, the champion, before anything trains: the candidate
    is then v2 and `flywheel eval --candidate v2` has a champion to compare it with."""
    from flywheel.release import registry

    version, registered = registry.first_champion(
        c.store, base_model, actor="flywheel train", notes="base model, registered by flywheel train"
    )
    if registered:
        # stderr under --json, so that stdout stays one JSON document
        (err_console if as_json else _out()).print(
            f"registered the base model {base_model} as {version.id}, the champion", soft_wrap=True, highlight=False
        )


def _follow(ctx: typer.Context, job_id: str, as_json: bool, extra: dict[str, Any] | None = None) -> Any:
    """Wait for the job with a progress bar on stderr (so --json output stays clean)."""
    from flywheel.trainer import launcher

    c = context(ctx)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task(f"{job_id} queued", total=None, losses="")

        def show(record: Any) -> None:
            progress = record.progress or {}
            losses = " ".join(f"{k} {progress[k]:.4f}" for k in ("loss", "eval_loss") if progress.get(k) is not None)
            bar.update(
                task,
                description=f"{job_id} {record.status}",
                total=progress.get("total") or None,
                completed=progress.get("step", 0),
                losses=losses,
            )

        record = launcher.wait(c, job_id, on_progress=show)
    version = _candidate(c, record)
    if as_json:
        echo_json({**_with_version(record, version), **(extra or {})})
    else:
        result = record.result or {}
        _out().print(f"job {record.id} succeeded: adapter {result.get('adapter_path')} (sha256 {result.get('adapter_sha256')})")
        if version:
            _print_next(version)
    return record


def _print_auto(choice: Any, spec: Any) -> None:
    """The snapshot's profile, each value the rules chose and why, and what trainer.sizing added."""
    out, p = _out(), choice.profile
    out.print(f"profile of {p.dataset_dir}", highlight=False)
    out.print(f"  method {p.method}, {p.rows:,} train rows, {p.heldout_rows:,} held out", highlight=False)
    out.print(
        f"  tokens per row ({p.token_counter}): p50 {p.tokens_p50}, p95 {p.tokens_p95}, max {p.tokens_max}; "
        f"{p.over_max_length:.1%} over max_length",
        highlight=False,
    )
    out.print(
        f"  intents {p.intents}: max share {p.intent_max_share:.1%}, min {p.intent_min_share:.1%}, "
        f"max/min {p.intent_ratio:g}, Gini {p.intent_gini:.2f}",
        highlight=False,
    )
    tiers = ", ".join(f"{name} {n}" for name, n in p.tiers.items())
    out.print(f"  new problem rows {p.new_share:.1%} ({tiers})", highlight=False)
    out.print("choice (flywheel.trainer.auto; docs/learning.md):", highlight=False)
    for c in choice.choices:
        out.print(f"  {c.parameter} = {c.value:g}: {c.reason}", highlight=False)
    for note in spec.notes:
        if not note.startswith("auto "):
            out.print(f"  then trainer.sizing: {note}", highlight=False)
    hyper = spec.hyper
    out.print(
        f"trains with lora_r {hyper.lora_r}, lora_alpha {hyper.lora_alpha}, learning_rate {hyper.learning_rate:g}, "
        f"epochs {hyper.epochs:g}, batch_size {hyper.batch_size} x grad_accum {hyper.grad_accum}  (job {spec.job_id()})",
        highlight=False,
    )


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="a dataset snapshot folder, a dataset id, or latest")],
    method: Annotated[str | None, typer.Option(help="sft | dpo | kto (default: the snapshot's kind, then train.method)")] = None,
    base: Annotated[Path | None, typer.Option(help="base model folder (default: train.base_model)")] = None,
    auto: Annotated[
        bool,
        typer.Option("--auto", help="profile the snapshot and pick rank, learning rate, epochs and batch size (flywheel.trainer.auto)"),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would train (with --auto: the profile and choice); train nothing")
    ] = False,
    wait: WaitFlag = True,
    restart: Annotated[bool, typer.Option("--restart", help="if this job failed or was killed, start it again from scratch")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a LoRA adapter on a dataset snapshot; the same snapshot and settings train once."""
    from flywheel.inference.folders import resolve_base_model
    from flywheel.tools.jobs import champion_adapter
    from flywheel.trainer import auto as autosft
    from flywheel.trainer import launcher
    from flywheel.trainer.recipes import METHODS, build_spec

    if method is not None and method not in METHODS:
        raise UserInputError(f"--method {method!r} is not one of: {', '.join(METHODS)}")
    c = context(ctx)
    folder = launcher.resolve_dataset(c, dataset)
    hyper, choice = c.settings.train, None
    if auto:
        base_ref = base or hyper.base_model
        if not base_ref:
            raise UserInputError("no base model: pass --base PATH or set train.base_model in flywheel.toml")
        counter = autosft.tokenizer_counter(resolve_base_model(base_ref))
        choice = autosft.choose(autosft.profile(folder, hyper, method, counter), hyper)
        hyper = choice.apply(hyper)
    # --base names another base model: the champion's adapter was trained over its own
    spec = build_spec(hyper, folder, method=method, base_model=base, init_adapter=None if base else champion_adapter(c))
    if choice is not None:
        spec = spec.model_copy(update={"notes": [*choice.notes(), *spec.notes]})
    extra = {"auto": choice.model_dump(mode="json")} if choice is not None else {}
    if dry_run:
        if as_json:
            echo_json({**extra, "job_id": spec.job_id(), "spec": spec.model_dump(mode="json")})
        elif choice is not None:
            _print_auto(choice, spec)
        else:
            _out().print(f"would train job {spec.job_id()}: {spec.hyper.model_dump_json()}", highlight=False)
        return
    if choice is not None and not as_json:
        _print_auto(choice, spec)
    _first_champion(c, spec.base_model, as_json)
    record = launcher.launch(c, spec)
    if restart and record.status in ("failed", "killed"):
        record = launcher.resume(c, record.id, restart=True)
    elif record.status in ("failed", "killed"):
        raise launcher.failure(record)
    if not wait or record.ended:
        version = _candidate(c, record)
        if as_json:
            echo_json({**_with_version(record, version), **extra})
            return
        _out().print(_summary(record))
        if record.ended and record.result:
            _out().print(f"adapter {record.result.get('adapter_path')} (sha256 {record.result.get('adapter_sha256')})")
        if version:
            _print_next(version)
        elif not record.ended:
            _out().print(f"the job registers its candidate version when it succeeds: see `flywheel jobs show {record.id}`")
        return
    _follow(ctx, record.id, as_json, extra)


@jobs_app.callback(invoke_without_command=True)
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="queued | running | succeeded | failed | killed")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    _list(ctx, status, limit, as_json)


@jobs_app.command("list")
def jobs_list_cmd(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="queued | running | succeeded | failed | killed")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first."""
    _list(ctx, status, limit, as_json)


def _list(ctx: typer.Context, status: str | None, limit: int, as_json: bool) -> None:
    from flywheel.trainer import launcher
    from flywheel.trainer.jobs import JobStatus, list_jobs

    if status is not None and status not in [s.value for s in JobStatus]:
        raise UserInputError(f"--status {status!r} is not one of: {', '.join(s.value for s in JobStatus)}")
    c = context(ctx)
    # Refresh the active ones first, so a dead worker shows as killed rather than running forever.
    for record in list_jobs(c.store, statuses=["queued", "running"], limit=limit):
        launcher.status(c, record.id)
    records = list_jobs(c.store, statuses=[status] if status else None, limit=limit)
    if as_json:
        echo_json([r.model_dump(mode="json") for r in records])
        return
    table = Table("id", "kind", "status", "progress", "loss", "attempts", "created")
    for r in records:
        progress = r.progress or {}
        step = f"{progress.get('step', 0)}/{progress['total']}" if progress.get("total") else ""
        loss = f"{progress['loss']:.4f}" if progress.get("loss") is not None else ""
        table.add_row(r.id, r.kind, str(r.status), step, loss, str(r.attempts), r.created_at.strftime("%Y-%m-%d %H:%M"))
    _out().print(table)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job id")], as_json: JsonFlag = False) -> None:
    """Everything known about one job."""
    from flywheel.trainer import launcher

    c = context(ctx)
    record = launcher.status(c, job_id)
    if as_json:
        echo_json(record.model_dump(mode="json"))
        return
    out = _out()
    out.print(_summary(record))
    spec = record.spec
    out.print(f"method {spec.get('method')}  base {spec.get('base_model')}")
    out.print(f"dataset {spec.get('dataset_id') or '-'} at {spec.get('dataset_dir')} (sha256 {str(spec.get('dataset_hash'))[:16]})")
    out.print(f"attempts {record.attempts}  pid {record.pid or '-'}  folder {record.work_dir}")
    out.print(f"log {record.log_path}")
    if record.error:
        out.print(f"error: {record.error}")
    if record.result:
        out.print(f"adapter {record.result.get('adapter_path')} (sha256 {record.result.get('adapter_sha256')})")
        out.print(
            f"steps {record.result.get('steps')}  train_loss {record.result.get('train_loss')}  best_eval_loss {record.result.get('best_eval_loss')}"
        )
    version = _candidate(c, record)
    if version:
        _print_next(version)


@jobs_app.command("logs")
def jobs_logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="the job id")],
    tail: Annotated[int, typer.Option(min=1, help="how many last lines")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends")] = False,
) -> None:
    """Print the end of a job's log."""
    from flywheel.trainer import launcher

    c = context(ctx)
    record = launcher.status(c, job_id)
    launcher.refresh_log(c, record)  # a Ray job's output lives on the cluster
    text = launcher.log_tail(record, tail)
    if text:
        typer.echo(text)
    if not follow:
        return
    path = Path(record.log_path)
    offset = path.stat().st_size if path.exists() else 0
    while True:
        record = launcher.status(c, job_id)
        if record.ended:
            launcher.refresh_log(c, record)
        if path.exists() and path.stat().st_size > offset:
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            typer.echo(chunk.decode("utf-8", errors="replace"), nl=False)
        if record.ended:
            return
        time.sleep(1.0)


@jobs_app.command("resume")
def jobs_resume(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="the job id")],
    restart: Annotated[bool, typer.Option("--restart", help="start from scratch instead of the last checkpoint")] = False,
    wait: WaitFlag = True,
    as_json: JsonFlag = False,
) -> None:
    """Start a failed or killed job again, from its last checkpoint (or from scratch with --restart)."""
    from flywheel.trainer import launcher

    c = context(ctx)
    record = launcher.resume(c, job_id, restart=restart)
    if wait and not record.ended:
        _follow(ctx, record.id, as_json)
    elif as_json:
        echo_json(record.model_dump(mode="json"))
    else:
        _out().print(_summary(record))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job id")], as_json: JsonFlag = False) -> None:
    """Stop a queued or running job (it can be resumed later)."""
    from flywheel.trainer import launcher

    record = launcher.cancel(context(ctx), job_id)
    if as_json:
        echo_json(record.model_dump(mode="json"))
    else:
        _out().print(_summary(record))


@jobs_app.command("manifest")
def jobs_manifest(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="the job id")],
    kind: Annotated[str, typer.Option(help="job (a Kubernetes batch/v1 Job) | rayjob (a KubeRay RayJob)")] = "job",
    image: Annotated[str | None, typer.Option(help="the container image (default: ray.image)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to this file instead of stdout")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Render a Kubernetes manifest that runs this job's worker (for kubectl apply; docs/ray.md)."""
    from flywheel.trainer.jobs import get_job
    from flywheel.trainer.manifest import render

    if kind not in ("job", "rayjob"):
        raise UserInputError(f"--kind {kind!r} is not one of: job, rayjob")
    c = context(ctx)
    text = render(c.settings, get_job(c.store, job_id), "rayjob" if kind == "rayjob" else "job", image or "", "json" if as_json else "yaml")
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    _out().print(f"wrote the {kind} manifest of job {job_id} to {output}", highlight=False)
