"""`flywheel dataset` (build, list, show) and `flywheel select` (active learning under a labelling budget).

The commands parse flags and print; building is flywheel.trainer.dataset, picking is
flywheel.trainer.selection: the same functions the agent's tools call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flywheel.cli import app, context, echo_json, err_console, out_console
from flywheel.errors import NotFoundError, UserInputError
from flywheel.jsonl import json_objects

dataset_app = typer.Typer(no_args_is_help=True, help="Build, list and show versioned dataset snapshots.")
app.add_typer(dataset_app, name="dataset")

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]


def _out() -> Console:
    return out_console(soft_wrap=False)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(objects, their "file:line" places, errors for lines that are not JSON objects)."""
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    items: list[dict[str, Any]] = []
    places: list[str] = []
    errors: list[str] = []
    for line in json_objects(path):
        if line.value is None:  # not a JSON object: line.error says why
            errors.append(f"{line.where}: {line.error}")
            continue
        items.append(line.value)
        places.append(line.where)
    return items, places, errors


# --- dataset build / list / show ----------------------------------------------------------------------------


@dataset_app.command("build")
def dataset_build(
    ctx: typer.Context,
    kind: Annotated[str, typer.Option(help="sft (answers) or dpo (corrected vs original answer)")] = "sft",
    replay: Annotated[
        Path | None,
        typer.Option(
            help='JSONL of replay rows to mix in, each {"messages": [... ending with the answer], "tier": "core_baseline", "intent": ...}'
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a balanced snapshot from verified corrections (the same state gives the same snapshot)."""
    from flywheel.trainer.dataset import KINDS, build_snapshot
    from flywheel.trainer.replay import parse_replay_rows

    if kind not in KINDS:
        raise UserInputError(f"--kind {kind!r} is not one of: {', '.join(KINDS)}")
    extra: list[Any] = []
    errors: list[str] = []
    if replay is not None:
        items, places, errors = _read_jsonl(replay)
        extra, bad = parse_replay_rows(items, where=places)
        errors += bad
    snapshot = build_snapshot(context(ctx), kind, extra_rows=extra, extra_errors=errors)
    if as_json:
        echo_json(snapshot.model_dump(mode="json"))
    else:
        _print_snapshot(snapshot.manifest, snapshot.path)
        _out().print("next: flywheel train --dataset latest", highlight=False)
    for problem in errors:
        err_console.print(f"rejected {problem}", highlight=False, soft_wrap=True)
    if errors:
        raise UserInputError(f"{len(errors)} line(s) of {replay} were rejected; the snapshot was built from the others")


@dataset_app.command("list")
def dataset_list(
    ctx: typer.Context, kind: Annotated[str | None, typer.Option(help="only sft or dpo snapshots")] = None, as_json: JsonFlag = False
) -> None:
    """Recorded snapshots, newest first."""
    from flywheel.trainer.dataset import KINDS, list_snapshots

    if kind is not None and kind not in KINDS:
        raise UserInputError(f"--kind {kind!r} is not one of: {', '.join(KINDS)}")
    snapshots = list_snapshots(context(ctx).store, kind)
    if as_json:
        echo_json(
            [
                {
                    **s.model_dump(mode="json", exclude={"manifest"}),
                    "train_rows": _rows(s.manifest, "train"),
                    "heldout_rows": _rows(s.manifest, "heldout"),
                }
                for s in snapshots
            ]
        )
        return
    table = Table(title=f"{len(snapshots)} dataset snapshot(s)", title_justify="left")
    for name in ("id", "kind", "created", "train", "heldout", "problem share", "warnings"):
        table.add_column(name, no_wrap=name == "id")
    for s in snapshots:
        train = s.manifest.get("composition", {}).get("train", {})
        table.add_row(
            s.id,
            s.kind,
            f"{s.created_at:%Y-%m-%d %H:%M}" if s.created_at else "-",
            str(_rows(s.manifest, "train")),
            str(_rows(s.manifest, "heldout")),
            f"{train.get('problem_share', 0):.0%}",
            str(len(s.manifest.get("warnings", []))),
        )
    _out().print(table)


def _rows(manifest: dict[str, Any], split: str) -> int:
    return int(manifest.get("files", {}).get(split, {}).get("rows", 0))


@dataset_app.command("show")
def dataset_show(
    ctx: typer.Context,
    snapshot_id: Annotated[str, typer.Argument(help="a snapshot id from `flywheel dataset list`")],
    as_json: JsonFlag = False,
) -> None:
    """A snapshot's manifest: composition, the counts before and after each balancing step, checks, warnings."""
    from flywheel.trainer.dataset import get_snapshot

    snapshot = get_snapshot(context(ctx).store, snapshot_id)
    if as_json:
        echo_json(snapshot.model_dump(mode="json"))
        return
    _print_snapshot(snapshot.manifest, snapshot.path)


def _print_snapshot(manifest: dict[str, Any], path: str) -> None:
    out = _out()
    out.print(f"[bold]{manifest['id']}[/] ({manifest['kind']})  {path}")
    out.print(f"content sha256 {manifest['content_hash']}")
    steps = Table(title="balancing steps", title_justify="left")
    for name in ("step", "before", "after", "detail"):
        steps.add_column(name)
    for step in manifest.get("steps", []):
        detail = {
            k: v for k, v in step.items() if k not in ("step", "before", "after") and not k.startswith("by_") and not k.endswith("_by_type")
        }
        steps.add_row(step["step"], str(step["before"]), str(step["after"]), json.dumps(detail, default=str)[:120])
    out.print(steps)
    comp = manifest.get("composition", {})
    for split in ("train", "heldout"):
        part = comp.get(split, {})
        table = Table(
            title=f"{split}: {part.get('rows', 0)} rows ({part.get('unique', 0)} unique), problem share {part.get('problem_share', 0):.0%}",
            title_justify="left",
        )
        table.add_column("by")
        table.add_column("counts")
        for key in ("by_intent", "by_problem_type", "by_tier", "by_category", "by_origin"):
            table.add_row(key[3:], ", ".join(f"{k} {v}" for k, v in part.get(key, {}).items()))
        out.print(table)
    sources = Table(title="rows by source", title_justify="left")
    for name in ("source", "offered", "train", "heldout", "dropped"):
        sources.add_column(name)
    for origin, entry in manifest.get("by_source", {}).items():
        dropped = ", ".join(f"{step} {n}" for step, n in entry.get("dropped", {}).items()) or "-"
        sources.add_row(origin, str(entry["offered"]), str(entry["train"]), str(entry["heldout"]), dropped)
    out.print(sources)
    labels = manifest.get("labels")
    if labels and (labels.get("labelled") or labels.get("confirmed_fine")):
        out.print(
            f"labels: {labels['used']} of {labels['labelled']} labelled failures became rows; "
            f"{labels['fine_used']} of {labels['confirmed_fine']} answers people confirmed are positive rows",
            highlight=False,
        )
        for reason, n in labels.get("left_out", {}).items():
            out.print(f"  left out: {n} {reason}", highlight=False, markup=False)
    checks = manifest.get("checks", {})
    for name, check in checks.items():
        out.print(f"{'ok ' if check.get('held') else '[red]NOT[/]'} {name}: {json.dumps({k: v for k, v in check.items() if k != 'held'})}")
    for warning in manifest.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


# --- select -------------------------------------------------------------------------------------------------


@app.command("select")
def select_command(
    ctx: typer.Context,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="random, least_confidence, margin, entropy, kcenter, kmeans, expected_change or hybrid (default: selection.strategy)"
        ),
    ] = None,
    budget: Annotated[
        int | None, typer.Option(min=1, help="how many to pick now (default: selection.round_size, within the labelling budget left)")
    ] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(help="JSONL of candidates {id, embedding, top1?, top2?, entropy?, mean_logprob?} instead of the store's failures"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="production model for token probabilities: a registered version/alias, a base model folder or a cached hub id ORG/NAME (default: champion, else train.base_model)"
        ),
    ] = None,
    round_index: Annotated[
        int | None, typer.Option(min=0, help="hybrid: which round this is (default: labels given so far // round size)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many store failures are considered, highest risk first")] = 20_000,
    as_json: JsonFlag = False,
) -> None:
    """Pick which failures people should label next, under the labelling budget."""
    from flywheel.trainer.candidates import candidates_from_store, needs_model
    from flywheel.trainer.selection import STRATEGIES, Candidates, select

    c = context(ctx)
    sel = c.settings.selection
    name = strategy or sel.strategy
    if name not in STRATEGIES:
        raise UserInputError(f"--strategy {name!r} is not one of: {', '.join(STRATEGIES)}")
    info: dict[str, dict[str, Any]] = {}
    labelled: list[str] = []
    if candidates is not None:
        items, _, errors = _read_jsonl(candidates)
        if errors:
            raise UserInputError(errors[0])
        pool = Candidates.from_rows(items, where=str(candidates))
        spent, remaining = 0, None
        index = round_index or 0
    else:
        from flywheel.data.labels import labels_spent

        spent = labels_spent(c.store, c.settings)
        remaining = max(0, sel.labelling_budget - spent)
        index = round_index if round_index is not None else spent // sel.round_size
        production = _production_model(c, model) if needs_model(name, index, sel.hybrid_step) else None
        pool, labelled, info = candidates_from_store(c, model=production, with_hidden=name == "expected_change", limit=limit)
    want = budget or sel.round_size
    if remaining is not None:
        if remaining == 0:
            raise UserInputError(f"the labelling budget is spent ({spent} of selection.labelling_budget {sel.labelling_budget})")
        if budget is not None and budget > remaining:
            raise UserInputError(f"--budget {budget} exceeds the labelling budget left ({remaining} of {sel.labelling_budget})")
        want = min(want, remaining)
    ids = select(pool, name, want, round_index=index, already_selected=labelled, seed=sel.seed + index, hybrid_step=sel.hybrid_step)
    result: dict[str, Any] = {
        "strategy": name,
        "round_index": index,
        "picked": len(ids),
        "candidates": len(pool),
        "budget_left_after": None if remaining is None else remaining - len(ids),
        "selected": [{"id": i, **info.get(i, {})} for i in ids],
    }
    if as_json:
        echo_json(result)
        return
    table = Table(title=f"{len(ids)} of {len(pool)} candidate(s) to label ({name}, round {index})", title_justify="left")
    for col in ("id", "intent", "text"):
        table.add_column(col, no_wrap=col == "id")
    for row in result["selected"]:
        table.add_row(row["id"], str(row.get("intent") or "-"), str(row.get("text", ""))[:80])
    _out().print(table)
    _out().print(
        "next: flywheel label FAILURE_ID --intent INTENT (or --fine, or --file labels.jsonl), then flywheel judge", highlight=False
    )


def _production_model(c: Any, ref: str | None) -> Any:
    """The model whose token probabilities rank uncertainty: a folder, a Hugging Face hub id in the local
    cache, a registered version or alias, the champion, or the configured base model."""
    from flywheel.inference.folders import is_hub_id
    from flywheel.inference.local_model import LocalModel

    if ref and (Path(ref).is_dir() or is_hub_id(ref)):
        return LocalModel(ref)  # an id not in the cache is refused there, in one line saying how to get it
    from flywheel.release.registry import resolve

    try:
        version = resolve(c.store, ref or "champion")
        loaded = LocalModel(version.base_model)
        if version.adapter_path:  # the adapter the registry recorded, checked against its recorded hash
            loaded.load_adapter(version.id, version.adapter_path, expected_sha256=version.adapter_sha256)
            loaded.set_adapter(version.id)
        return loaded
    except NotFoundError:
        if ref:
            raise
    if c.settings.train.base_model:
        return LocalModel(c.settings.train.base_model)
    raise UserInputError(
        "this strategy needs the production model's token probabilities: pass --model (a version, a folder or a cached hub id), set train.base_model, or use --candidates"
    )
