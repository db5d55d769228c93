"""`flywheel demo`: the whole loop on real data, offline, in minutes.

1. Set up the world (demo.setup): a project folder, the production model (v1, the champion) trained on
   a skewed sample of the pack's train split, the fixed test set from test.csv, the knowledge base.
2. Production traffic: the rest of the train split answered by v1, with simulated signals, logged to a
   JSONL file and ingested like any team's logs.
3. Improvement cycles (`--cycles N`, default 1), each run by the supervisor graph with the heuristic
   policy: triage, label (active learning under the labelling budget), judge, correct, verify, build a
   balanced snapshot with replay, train a LoRA adapter, evaluate against the champion, canary, ask for
   approval, promote, graduate. Before every cycle after the first, the champion of the moment serves
   a new slice of the traffic; its failures are what the next cycle learns from.
4. Before and after on the untouched test set, and one record per cycle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flywheel.agent.cycles import MAX_CYCLES, CycleRecord
from flywheel.context import Context
from flywheel.data.ingest import ingest_files
from flywheel.data.kb import add_files
from flywheel.demo.cycle import CanaryTraffic, TruthLabeller
from flywheel.demo.pack import DemoPack, approved_replies, load_pack
from flywheel.demo.setup import FULL, QUICK, DemoSize, build_production_model, serve_traffic, write_project, write_test_set
from flywheel.errors import UserInputError
from flywheel.evals.metrics import Paired, mcnemar, outcome_passed
from flywheel.inference.local_model import LocalModel
from flywheel.release.registry import register_base, resolve

Say = Callable[[str], None]


class DemoOptions(BaseModel):
    data: Path | None = None
    workdir: Path = Path("flywheel-demo")
    quick: bool = False
    yes: bool = False  # approve at the approval step without asking
    interactive: bool = False  # a person is at the terminal to answer the approval prompt
    seed: int = 0
    strategy: str | None = None  # selection strategy (default: settings)
    synthesis: bool = False  # the cycle generates samples (flywheel.synthesis) before it builds the dataset
    test_rows: int | None = None  # rows of test.csv in the fixed test set; None: the size's own, 0: all of them
    fresh: bool = True  # start from an empty store (the production model is reused when unchanged)
    cycles: int = Field(1, ge=1, le=MAX_CYCLES)  # improvement cycles, each on new traffic served by the champion of the moment


class Side(BaseModel):
    version: str | None
    task_success: float | None
    problem_rates: dict[str, float]


class DemoResult(BaseModel):
    before: Side  # the champion before the cycle
    after: Side  # the champion after it (the candidate when promoted or waiting for approval)
    candidate: Side  # the cycle's candidate, whatever became of it
    # champion vs candidate on the same fixed test items (McNemar's exact test): task success and, per
    # problem type, "free of that problem"
    paired: dict[str, Paired] = {}
    promoted: str | None
    report: str | None
    state: str  # promoted | waiting_approval | rejected | gate_failed | canary_rolled_back
    how_to_approve: str | None = None
    timings: dict[str, float] = {}
    steps: dict[str, Any] = {}
    cycles: list[CycleRecord] = []  # one per cycle run (flywheel.agent.cycles)
    stop_reason: str = ""


def prepare(options: DemoOptions, say: Say) -> tuple[Context, DemoPack, DemoSize, dict[str, str], list[Any], dict[str, float]]:
    """Everything before the first cycle: returns the context, the pack, the size, the truth per
    interaction (the labels a person would give), the traffic rows (the first cycle's production
    slice already served by the production model and ingested), and timings."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    pack = load_pack(options.data)
    size = QUICK if options.quick else FULL
    if options.test_rows is not None:
        size = size.model_copy(update={"test": options.test_rows})
    workdir = options.workdir.resolve()
    if options.fresh:
        _clear_state(workdir)
    settings = write_project(workdir, pack, size, options.seed, options.synthesis)
    ctx = Context(settings=settings)
    _require_empty_server_store(ctx)
    test_rows = pack.test if not size.test else pack.test[:: max(1, len(pack.test) // size.test)][: size.test]
    write_test_set(Path(settings.eval.test_set), test_rows)
    repeats = f" ({pack.train_repeats_dropped} repeating a test row left out)" if pack.train_repeats_dropped else ""
    say(
        f"data: {pack.name}: {len(pack.intents)} intents, {len(pack.train)} train rows{repeats}, fixed test set {len(test_rows)} rows from test.csv"
    )

    model_dir, traffic, _info = build_production_model(workdir, pack, size, options.seed, say)
    champion = register_base(ctx.store, str(model_dir), notes="production model before flywheel")
    timings["production_model"] = time.monotonic() - started

    rows = traffic[: size.traffic]
    if len(rows) < 100:
        raise UserInputError(f"{pack.folder}: only {len(rows)} train rows left for traffic; the demo needs at least 100")
    log = workdir / "logs" / "production.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    say(f"traffic: {len(rows)} requests answered by {champion.id}")
    t = time.monotonic()
    truth = serve_traffic(LocalModel(model_dir), rows, pack, settings, log, version=champion.id, seed=options.seed)
    ingested = ingest_files(ctx.store, settings, [log])
    timings["traffic"] = time.monotonic() - t
    say(f"ingest: {ingested.files[0].stored} interactions stored, {ingested.files[0].quarantined} quarantined")

    if pack.kb_file is not None:
        kb = add_files(ctx.index, [pack.kb_file])
        say(f"knowledge base: {kb.added + kb.updated + kb.unchanged} entries from {pack.kb_file.name}")
    else:
        # No made-up knowledge base: corrections come from what people label and what production
        # already answers well (flywheel.data.replies), as on a team's own data.
        say("knowledge base: none in this pack; corrections come from the labels and stable production replies")
    return ctx, pack, size, truth, traffic, timings


def _clear_state(workdir: Path) -> None:
    """A fresh store, index and artifacts; the production model and its cache stay."""
    import shutil

    for name in (".flywheel", "logs", "test_set.jsonl"):
        target = workdir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _require_empty_server_store(ctx: Context) -> None:
    """The demo clears its own SQLite store, but never a database server's: on PostgreSQL
    (FLYWHEEL_STORE__URL) it runs only on a database that holds no interactions yet."""
    if not ctx.settings.is_postgres:
        return
    from sqlalchemy.engine import make_url

    from flywheel.store.interactions import count

    held = count(ctx.store)
    if held:
        where = make_url(ctx.settings.store_url).render_as_string(hide_password=True)
        ctx.close()
        raise UserInputError(
            f"the demo starts from an empty store, and {where} already holds {held} interactions: give it an empty database"
        )


def side(report: dict[str, Any] | None, role: str, version: str | None) -> Side:
    """Task success and problem rates of one model on the fixed test set, from the eval report."""
    if report is None:
        return Side(version=version, task_success=None, problem_rates={})
    metrics = report[f"{role}_metrics"]["test"]
    return Side(
        version=version,
        task_success=metrics["task_success"]["rate"],
        problem_rates={name: rate["rate"] for name, rate in metrics["problem_rates"].items()},
    )


def run_demo(options: DemoOptions, say: Say = print, on_event: Callable[[Any], None] | None = None, ask: Any = None) -> DemoResult:
    """Prepare the world, then run `options.cycles` cycles through the supervisor graph with the heuristic
    policy (flywheel.agent.cycles). Before every cycle after the first, the champion of the moment
    serves a new slice of the traffic, whose failures the next cycle learns from.

    The simulated labeller and canary users reach the graph's tools as `ctx.labeller` and
    `ctx.canary_traffic`; everything else is the same run `flywheel run` starts. `ask` answers the
    approval at the terminal; with `options.yes` the person running the demo approves."""
    from flywheel.agent.cycles import run_cycles

    ctx, pack, size, truth, traffic, timings = prepare(options, say)
    windows = traffic_windows(traffic, size, options.cycles)
    try:
        # Without a knowledge base, the simulated person writes the answers flywheel cannot find itself
        # (the pack's reply per intent, what the production model was taught).
        written = approved_replies(pack) if pack.kb_file is None else None
        ctx.labeller = TruthLabeller(ctx, truth, written)
        canary = CanaryTraffic(ctx, pack, windows[0][1], options.workdir.resolve(), options.seed, truth)
        ctx.canary_traffic = canary
        if options.strategy:
            ctx.settings.selection.strategy = options.strategy  # type: ignore[assignment]  # the CLI's text; selection.select refuses an unknown name (UserInputError)

        def next_traffic(number: int, champion: str) -> None:
            rows, canary.rows = windows[number - 1]
            t = time.monotonic()
            served = serve_champion(ctx, pack, rows, options.workdir.resolve(), number, options.seed, truth)
            timings[f"traffic_{number}"] = time.monotonic() - t
            say(f"cycle {number}: {len(rows)} requests answered by {champion}; {served} interactions stored")

        def announce(record: CycleRecord) -> None:
            shown = "-" if record.task_success is None else f"{record.task_success:.1%}"
            say(
                f"cycle {record.cycle}: {record.state}; champion {record.champion}, task success {shown}; "
                f"tiers {record.tiers}; {record.labels} labels, {record.wall_s:.0f}s"
            )

        started = time.monotonic()
        done = run_cycles(
            ctx,
            trigger="demo",
            policy="heuristic",
            max_cycles=options.cycles,
            until_stable=False,
            yes=options.yes,
            ask=None if options.yes else ask,
            on_event=on_event,
            before_cycle=next_traffic,
            on_cycle=announce,
        )
        timings["cycles"] = time.monotonic() - started
        return _result(ctx, done.cycles, done.stop_reason, timings)
    finally:
        ctx.close()


def traffic_windows(traffic: list[Any], size: DemoSize, cycles: int) -> list[tuple[list[Any], list[Any]]]:
    """(production rows, canary rows) per cycle: consecutive slices of the traffic rows, wrapping around
    when the pack has fewer than the cycles need. A row served again is a new interaction (its id names
    the version that answered it), as a customer asking the same thing again would be."""
    per_cycle = size.traffic + size.canary_traffic
    if len(traffic) < per_cycle or cycles == 1:
        return [(traffic[: size.traffic], traffic[size.traffic : per_cycle])] * cycles
    windows = []
    for k in range(cycles):
        start = (k * per_cycle) % len(traffic)
        rows = (traffic[start:] + traffic[:start])[:per_cycle]
        windows.append((rows[: size.traffic], rows[size.traffic :]))
    return windows


def serve_champion(ctx: Context, pack: DemoPack, rows: list[Any], workdir: Path, number: int, seed: int, truth: dict[str, str]) -> int:
    """The champion of the moment answers `rows` (its adapter loaded, checked against its sha256); the
    log is ingested like any production log. Returns the interactions stored."""
    champion = resolve(ctx.store, "champion")
    model = LocalModel(champion.base_model)
    if champion.adapter_path:
        model.load_adapter(champion.id, champion.adapter_path, expected_sha256=champion.adapter_sha256)
    log = workdir / "logs" / f"production-cycle-{number}.jsonl"
    log.unlink(missing_ok=True)
    start = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(days=2 * (number - 1))
    adapter = champion.id if champion.adapter_path else None
    truth.update(
        serve_traffic(model, rows, pack, ctx.settings, log, version=champion.id, seed=seed + 10 * number, adapter=adapter, start=start)
    )
    return ingest_files(ctx.store, ctx.settings, [log]).stored


def _result(ctx: Context, cycles: list[CycleRecord], stop_reason: str, timings: dict[str, float]) -> DemoResult:
    """Before: the champion the first cycle started from; after: the champion the last cycle left (its
    candidate when that waits for approval)."""
    first, last = cycles[0], cycles[-1]
    first_report, last_report = _read(first.report), _read(last.report)
    after_role = "candidate" if last.state in ("promoted", "waiting_approval") else "champion"
    before = side(first_report, "champion", first.champion_before)
    after = side(last_report, after_role, last.candidate if after_role == "candidate" else last.champion)
    if last_report is None:
        after = Side(version=last.champion, task_success=last.task_success, problem_rates=last.problem_rates)
    paired: dict[str, Paired] = {}
    if first_report is not None and last_report is not None:
        paired = paired_tests(first_report["champion_metrics"], last_report[f"{after_role}_metrics"])
    promoted = next((c.candidate for c in reversed(cycles) if c.state == "promoted"), None)
    return DemoResult(
        before=before,
        after=after,
        candidate=side(last_report, "candidate", last.candidate),
        paired=paired,
        promoted=promoted,
        report=str(Path(last.report).with_name("report.html")) if last.report else None,
        state=last.state,
        how_to_approve=(f"flywheel -C {ctx.settings.project_dir} approve {last.candidate}" if last.state == "waiting_approval" else None),
        timings={k: round(v, 1) for k, v in timings.items()},
        steps={"run": last.run_id, "message": last.message},
        cycles=cycles,
        stop_reason=stop_reason,
    )


def _read(path: str | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def paired_tests(before: dict[str, Any], after: dict[str, Any], set_name: str = "test") -> dict[str, Paired]:
    """McNemar's test between two models on one set, item by item, from two reports' metrics (the
    `*_metrics` blocks): "task_success" (no finding at all) and each problem type (no finding of that
    type). The first cycle's champion and the last cycle's model answered the same fixed test items."""
    first = {o["id"]: o for o in before[set_name]["outcomes"]}
    second = {o["id"]: o for o in after[set_name]["outcomes"]}
    ids = sorted(set(first) & set(second))
    types = sorted(before[set_name]["problem_rates"])

    def paired(problem_type: str | None) -> Paired:
        return mcnemar([outcome_passed(first[i], problem_type) for i in ids], [outcome_passed(second[i], problem_type) for i in ids])

    return {"task_success": paired(None), **{name: paired(name) for name in types}}


def champion_version(ctx: Context) -> str:
    return resolve(ctx.store, "champion").id
