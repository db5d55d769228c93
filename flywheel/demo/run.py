"""`flywheel demo`: the whole loop on real data, offline, in minutes.

1. Set up the world (demo.setup): a project folder, the production model (v1, the champion) trained on
   a skewed sample of the pack's train split, the fixed test set from test.csv, the knowledge base.
2. Production traffic: the rest of the train split answered by v1, with simulated signals, logged to a
   JSONL file and ingested like any team's logs.
3. One improvement cycle, run by the supervisor graph with the heuristic policy: triage, label (active
   learning under the labelling budget), judge, correct, verify, build a balanced snapshot with replay,
   train a LoRA adapter, evaluate against the champion, canary, ask for approval, promote, graduate.
4. Before and after on the untouched test set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

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


def prepare(options: DemoOptions, say: Say) -> tuple[Context, DemoPack, DemoSize, dict[str, str], list[Any], dict[str, float]]:
    """Everything before the cycle: returns the context, the pack, the size, the truth per interaction
    (the labels a person would give), the rows kept for canary traffic, and timings."""
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
    canary_rows = traffic[size.traffic : size.traffic + size.canary_traffic]
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
    return ctx, pack, size, truth, canary_rows, timings


def _clear_state(workdir: Path) -> None:
    """A fresh store, index and artifacts; the production model and its cache stay."""
    import shutil

    for name in (".flywheel", "logs", "test_set.jsonl"):
        target = workdir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


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
    """Prepare the world, then run one cycle through the supervisor graph with the heuristic policy.

    The simulated labeller and canary users reach the graph's tools as `ctx.labeller` and
    `ctx.canary_traffic`; everything else is the same run `flywheel run` starts. `ask` answers the
    approval at the terminal; with `options.yes` the person running the demo approves."""
    from flywheel.agent.runner import start_run

    ctx, pack, size, truth, canary_rows, timings = prepare(options, say)
    try:
        champion_before = champion_version(ctx)
        # Without a knowledge base, the simulated person writes the answers flywheel cannot find itself
        # (the pack's reply per intent, what the production model was taught).
        written = approved_replies(pack) if pack.kb_file is None else None
        ctx.labeller = TruthLabeller(ctx, truth, written)
        ctx.canary_traffic = CanaryTraffic(ctx, pack, canary_rows, options.workdir.resolve(), options.seed, truth)
        if options.strategy:
            ctx.settings.selection.strategy = options.strategy  # type: ignore[assignment]  # the CLI's text; selection.select refuses an unknown name (UserInputError)
        started = time.monotonic()
        outcome = start_run(ctx, "demo", policy="heuristic", yes=options.yes, ask=None if options.yes else ask, on_event=on_event)
        timings["cycle"] = time.monotonic() - started
        candidate = outcome.cycle.get("candidate")
        version = resolve(ctx.store, candidate) if candidate else None
        report_path = Path(version.eval_report_path) if version is not None and version.eval_report_path else None
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path else None
        promoted = candidate if (outcome.outcome or {}).get("promoted") else None
        state = _state(outcome, promoted)
        after_role = "candidate" if state in ("promoted", "waiting_approval") else "champion"
        pending = outcome.pending
        return DemoResult(
            before=side(report, "champion", champion_before),
            after=side(report, after_role, candidate if after_role == "candidate" else champion_before),
            candidate=side(report, "candidate", candidate),
            paired=paired_tests(report) if report is not None else {},
            promoted=promoted,
            report=str(report_path.with_name("report.html")) if report_path else None,
            state=state,
            how_to_approve=(f"flywheel -C {ctx.settings.project_dir} approve {pending.version}" if pending is not None else None),
            timings={k: round(v, 1) for k, v in timings.items()},
            steps={"run": outcome.run_id, "message": outcome.message, "cycle": outcome.cycle},
        )
    finally:
        ctx.close()


def paired_tests(report: dict[str, Any], set_name: str = "test") -> dict[str, Paired]:
    """McNemar's test between champion and candidate on one set of the eval report, item by item:
    "task_success" (no finding at all) and each problem type (no finding of that type)."""
    champion = {o["id"]: o for o in report["champion_metrics"][set_name]["outcomes"]}
    candidate = {o["id"]: o for o in report["candidate_metrics"][set_name]["outcomes"]}
    ids = sorted(set(champion) & set(candidate))
    types = sorted(report["champion_metrics"][set_name]["problem_rates"])

    def paired(problem_type: str | None) -> Paired:
        return mcnemar([outcome_passed(champion[i], problem_type) for i in ids], [outcome_passed(candidate[i], problem_type) for i in ids])

    return {"task_success": paired(None), **{name: paired(name) for name in types}}


def _state(outcome: Any, promoted: str | None) -> str:
    if promoted:
        return "promoted"
    if outcome.state == "waiting_approval":
        return "waiting_approval"
    cycle = outcome.cycle or {}
    if cycle.get("canary_state") == "rolled_back":
        return "canary_rolled_back"
    if cycle.get("gate_passed") is False:
        return "gate_failed"
    if (outcome.outcome or {}).get("decision") == "rejected":
        return "rejected"
    return outcome.state


def champion_version(ctx: Context) -> str:
    return resolve(ctx.store, "champion").id
