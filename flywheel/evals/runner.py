"""Evaluation: three test sets, one answer per item from each model, the triage judge on every answer.

The sets:
  test      the fixed test set (settings.eval.test_set, JSONL), never trained on;
  baseline  graduated samples (every baseline tier: candidate, secondary and core) with their verified
            corrections: what earlier cycles fixed and must stay fixed (the gate refuses a candidate
            that breaks a core one);
  problem   this cycle's verified failures (tier problem): what the candidate was trained to fix.

`evaluate_model` is model-agnostic: it takes a function from conversations to answers, so tests can
pass a scripted function and the CLI passes one built from `LocalModel`. `run_eval` evaluates the
candidate and the champion on all three sets, applies the gate and writes the report.

Besides the judge's findings, each set gets ROUGE-L/BLEU against the items' reference answers (where
any), compliance hits per policy pattern, and, outside the hashed report, generation timing (first-token
latency, tokens/s) and the evaluation's cost (flywheel.evals.timing, flywheel.evals.cost).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from flywheel.context import Context
from flywheel.errors import InfrastructureError, UserInputError
from flywheel.evals.cost import Cost, training_cost
from flywheel.evals.gate import BASELINE, PROBLEM, TEST, evaluate_gate
from flywheel.evals.generate import Answer, GenerateFn, ModelLoader, model_loader
from flywheel.evals.history import champion_history
from flywheel.evals.judge import judge_answer
from flywheel.evals.metrics import ItemOutcome, SetMetrics, compute_metrics
from flywheel.evals.report import Curve, EvalReport, ModelRef, find_curve, load_curve, write_report
from flywheel.evals.rule_judge import RuleJudge
from flywheel.evals.text_metrics import reference_scores
from flywheel.evals.timing import GenerationTiming, Stopwatch, total
from flywheel.jsonl import json_objects
from flywheel.records import Failure, FailureStatus, Finding, Interaction, Message, Reference, SampleTier, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store


class EvalItem(BaseModel):
    """One prompt to answer and what a right answer must satisfy."""

    model_config = ConfigDict(extra="forbid")

    id: str
    messages: list[Message]  # the prompt conversation, ending before the answer
    reference: Reference
    intent: str | None = None
    problem_type: str | None = None  # for problem-set items: what the judge found in production
    tier: str | None = None  # for baseline items: the sample's tier (the gate protects core ones)


# --- the three sets ----------------------------------------------------------------------------------------


class _TestRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    messages: list[Message]
    reference: Reference


def load_test_set(path: Path | str) -> list[EvalItem]:
    """Read the fixed test set. A bad row stops the load with `file:line: what is wrong`: a test set
    with rows silently missing would measure something else than the one the champion was measured on."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"test set {path}: no such file")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for line in json_objects(path):
        where = line.where
        if line.error:
            raise UserInputError(f"{where}: {line.error}")
        try:
            row = _TestRow.model_validate(line.value)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(row)"
            raise UserInputError(f"{where}: {key}: {err['msg']}") from None
        if not any(m.role == "user" for m in row.messages):
            raise UserInputError(f"{where}: messages hold no user message to answer")
        if row.messages[-1].role == "assistant":
            raise UserInputError(f"{where}: messages end with an assistant turn; put the expected answer in reference.answer")
        item_id = row.id or f"{path.name}:{line.number}"
        if item_id in seen:
            raise UserInputError(f"{where}: id {item_id!r} appears twice")
        seen.add(item_id)
        reference = row.reference if row.reference.source else row.reference.model_copy(update={"source": "test_set"})
        items.append(EvalItem(id=item_id, messages=row.messages, reference=reference, intent=reference.intent))
    return items


BASELINE_TIERS = (SampleTier.CORE, SampleTier.SECONDARY, SampleTier.CANDIDATE)


def baseline_set(store: Store) -> list[EvalItem]:
    """Graduated samples that must stay fixed: every baseline tier, with their verified corrections.
    Candidate baselines are in it too: their outcome here is what lets them climb a tier (and what a
    regression of last cycle's fixes looks like)."""
    return _failure_items(store, tiers=list(BASELINE_TIERS), status=None)


def problem_set(store: Store) -> list[EvalItem]:
    """This cycle's verified failures (tier problem): what the candidate was trained to fix."""
    return _failure_items(store, tiers=[SampleTier.PROBLEM], status=FailureStatus.VERIFIED)


def _failure_items(store: Store, tiers: Sequence[SampleTier], status: FailureStatus | None) -> list[EvalItem]:
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo

    with store.engine.connect() as conn:
        rows: list[Failure] = failure_repo.failures_in_tiers(conn, tiers, status)
        if not rows:
            return []
        interactions = interaction_repo.get_many(conn, [f.interaction_id for f in rows])
        labelled = latest_labels(conn, [f.id for f in rows])
        items: list[EvalItem] = []
        for failure in rows:
            correction = failure_repo.latest_correction(conn, failure.id, verified_only=True)
            if correction is None:
                continue  # graduated without a verified answer: nothing to compare against
            verdict = failure_repo.latest_verdict(conn, failure.id)
            interaction = interactions[failure.interaction_id]
            label = labelled.get(failure.id)
            intent = (label.intent if label else None) or failure.intent or interaction.intent
            items.append(
                EvalItem(
                    id=failure.id,
                    messages=interaction.prompt_messages(),
                    reference=Reference(intent=intent, answer=correction.answer, source="correction"),
                    intent=intent,
                    problem_type=verdict.problem_type if verdict else None,
                    tier=str(failure.tier) if failure.tier in BASELINE_TIERS else None,
                )
            )
    return items


# --- running a model over a set ----------------------------------------------------------------------------


def _as_message(answer: Answer) -> Message | None:
    if answer is None:
        return None
    if isinstance(answer, Message):
        return answer
    if isinstance(answer, str):
        return Message(role="assistant", content=answer)
    text = getattr(answer, "text", None)
    if not isinstance(text, str):
        raise TypeError(f"a generate function returned {type(answer).__name__}; expected str, Message or an object with .text")
    tool_calls = getattr(answer, "tool_calls", None) or None
    return Message(role="assistant", content=text, tool_calls=tool_calls)


def evaluate_model(
    generate_fn: GenerateFn,
    items: Sequence[EvalItem],
    judge: RuleJudge,
    settings: Settings,
    name: str = TEST,
    stopwatch: Stopwatch | None = None,
) -> SetMetrics:
    """Answer every item with `generate_fn` and judge each answer; success means no finding.

    The rule judge (the one triage uses) checks every answer. With an LLM endpoint configured, the LLM
    judge is asked about every answer the rules did not settle, combined as triage combines them.
    Conversations go to `generate_fn` in chunks of `eval.batch_size` so that a long set keeps memory
    flat. A chunk that raises means the model is broken: that stops the run (InfrastructureError).
    `stopwatch`, when given, adds up how long the calls of `generate_fn` took (and nothing else)."""
    outcomes: list[ItemOutcome] = []
    answered: list[tuple[int, EvalItem, Message]] = []  # what the LLM judge may look at
    # a distributed generate function takes bigger chunks and spreads each over its tasks (evals.generate)
    chunk = getattr(generate_fn, "chunk_size", None) or settings.eval.batch_size
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        conversations = [[m.model_dump(exclude_none=True) for m in item.messages] for item in batch]
        try:
            started = time.perf_counter()
            answers = list(generate_fn(conversations))
            elapsed = time.perf_counter() - started
        except Exception as exc:  # any failure inside the model is infrastructure
            raise InfrastructureError(f"generation failed on the {name} set at item {batch[0].id}: {exc}") from exc
        if len(answers) != len(batch):
            raise InfrastructureError(f"the model returned {len(answers)} answers for {len(batch)} prompts on the {name} set")
        if stopwatch is not None:
            stopwatch.add(len(batch), elapsed, answers, getattr(generate_fn, "first_token_s", None))
        for item, answer in zip(batch, answers):
            message = _as_message(answer)
            if message is None:
                outcomes.append(ItemOutcome(id=item.id, intent=item.intent, tier=item.tier, error="no answer generated"))
                continue
            _failed, findings = judge_answer(settings, item.messages, message, item.reference, rule_judge=judge)
            outcomes.append(ItemOutcome(id=item.id, intent=item.intent, tier=item.tier, answer=message.content or "", findings=findings))
            answered.append((len(outcomes) - 1, item, message))
    judge_name, unjudged = "rule", 0
    if settings.llm.enabled and answered:
        judge_name = f"rule+llm:{settings.llm.judge_model}"
        unjudged = _add_llm_findings(settings, judge, answered, outcomes, name)
    metrics = compute_metrics(name, outcomes, settings.taxonomy.problem_types, [p.name for p in settings.policies.forbidden_phrases])
    # an item with no answer scores 0 against its reference: it said nothing of it
    scores = reference_scores([(o.answer, i.reference.answer) for i, o in zip(items, outcomes) if i.reference.answer])
    return metrics.model_copy(update={"judge": judge_name, "llm_unjudged": unjudged, "reference_scores": scores})


def _add_llm_findings(
    settings: Settings, rules: RuleJudge, answered: list[tuple[int, EvalItem, Message]], outcomes: list[ItemOutcome], set_name: str
) -> int:
    """Ask the LLM judge about each answer the rules did not settle (no high/critical finding, not
    equal to the reference answer) and add what it finds as `llm` findings. The LLM can add a problem,
    never remove or soften a rule finding (`judge.combine`). Returns how many answers stayed unjudged
    (no valid verdict after the re-asks: their rule findings stand).

    Endpoint trouble raises InfrastructureError: champion and candidate must be judged the same way,
    and a comparison over partly judged sets would be wrong in an unknown direction."""
    import openai

    from flywheel.evals.judge import SEVERITY_RANK, JudgeCase, LLMJudge, LLMOutcome, combine, worst
    from flywheel.llm import Limits, async_chat_model, run_bounded, run_sync

    cases: dict[int, JudgeCase] = {}
    for index, item, message in answered:
        findings = outcomes[index].findings
        top = worst(findings)
        if (top is not None and SEVERITY_RANK[top.severity] >= SEVERITY_RANK["high"]) or (
            top is None and rules.confirms(message, item.reference)
        ):
            continue
        interaction = Interaction(
            id=f"eval:{item.id}",
            timestamp=utcnow(),
            model_version="eval",
            intent=item.intent,
            messages=[*item.messages, message],
            source="eval",
        )
        cases[index] = JudgeCase(failure_id=item.id, interaction=interaction, findings=findings, reference=item.reference, answer=message)
    if not cases:
        return 0

    async def ask() -> list[Any]:
        async with async_chat_model(settings, settings.llm.judge_model) as model:
            llm = LLMJudge(settings, model)
            limits = Limits.from_settings(settings, timeout_s=settings.llm.timeout_s * (settings.judge.llm_retries + 1) + 5.0)
            return await run_bounded(list(cases.values()), llm.ajudge, limits)

    results = run_sync(ask)
    refused = (openai.BadRequestError, openai.UnprocessableEntityError)  # this one request, not the endpoint
    broken = [r for r in results if not r.ok and not isinstance(r.exception, refused)]
    if broken:
        first = broken[0]
        if not (first.transient or isinstance(first.exception, openai.APIError)):
            raise first.exception or RuntimeError(first.error)  # a bug, not the endpoint: keep the traceback
        raise InfrastructureError(
            f"the LLM judge at {settings.llm.base_url} failed on {len(broken)} of {len(results)} answers in the {set_name} set "
            f"({first.error}); the evaluation stops rather than compare partly judged sets"
        )
    judge_name = f"rule+llm:{settings.llm.judge_model}"
    unjudged = 0
    for index, result in zip(cases, results):
        outcome: LLMOutcome = (
            result.value if result.ok else LLMOutcome(verdict=None, reason=f"the endpoint refused the request: {result.error}")
        )
        verdict = combine(cases[index], outcome, settings, judge_name)
        if verdict.status == "unjudged":
            unjudged += 1
            continue
        findings = outcomes[index].findings
        if (
            verdict.is_failure
            and verdict.problem_type
            and verdict.severity
            and not any((f.problem_type, f.severity) == (verdict.problem_type, verdict.severity) for f in findings)
        ):
            findings.append(
                Finding(problem_type=verdict.problem_type, severity=verdict.severity, check="llm", detail=verdict.rationale[:200])
            )
    return unjudged


def build_judge(settings: Settings) -> RuleJudge:
    """The same rule judge triage uses; answers are judged by the same checks as production traffic."""
    return RuleJudge(settings)


# --- champion against candidate ----------------------------------------------------------------------------


def test_set_path(settings: Settings) -> Path | None:
    """The configured fixed test set (relative paths are relative to the project), or None."""
    if not settings.eval.test_set:
        return None
    path = Path(settings.eval.test_set)
    return path if path.is_absolute() else settings.project_dir / path


def load_sets(ctx: Context) -> dict[str, list[EvalItem]]:
    """The three sets; an unconfigured test set or an empty store gives an empty set, not an error."""
    path = test_set_path(ctx.settings)
    test = load_test_set(path) if path is not None else []
    return {TEST: test, BASELINE: baseline_set(ctx.store), PROBLEM: problem_set(ctx.store)}


def _set_sources(settings: Settings) -> dict[str, str]:
    """Where each set came from; the test set with its content hash, so the report names the exact file."""
    from flywheel.store.vectors import sha256_file

    path = test_set_path(settings)
    test = f"{settings.eval.test_set} (sha256 {sha256_file(path)[:16]})" if path is not None else ""
    return {TEST: test, BASELINE: "store: core, secondary and candidate baseline tiers", PROBLEM: "store: verified problem-tier failures"}


def default_targeted(sets: Mapping[str, Sequence[EvalItem]]) -> list[str]:
    """The problem types of this cycle's verified failures, most frequent first."""
    counts = Counter(item.problem_type for item in sets.get(PROBLEM, []) if item.problem_type)
    return [name for name, _ in counts.most_common()]


def evaluate_all(
    generate_fn: GenerateFn,
    sets: Mapping[str, Sequence[EvalItem]],
    judge: RuleJudge,
    settings: Settings,
    stopwatches: dict[str, Stopwatch] | None = None,
) -> dict[str, SetMetrics]:
    """Every set with one model; `stopwatches`, when given, is filled with one Stopwatch per set."""
    out: dict[str, SetMetrics] = {}
    for name, items in sets.items():
        watch = Stopwatch()
        out[name] = evaluate_model(generate_fn, items, judge, settings, name=name, stopwatch=watch)
        if stopwatches is not None:
            stopwatches[name] = watch
    return out


def check_targeted(targeted: Sequence[str], settings: Settings) -> list[str]:
    known = settings.taxonomy.problem_types
    unknown = [t for t in targeted if t not in known]
    if unknown:
        raise UserInputError(f"--targeted names {', '.join(unknown)}, not in the taxonomy ({', '.join(known)})")
    return list(dict.fromkeys(targeted))


def run_eval(
    ctx: Context,
    candidate: ModelRef,
    champion: ModelRef,
    targeted: Sequence[str] = (),
    curve_path: Path | str | None = None,
    judge: RuleJudge | None = None,
    load_model: ModelLoader | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate candidate and champion on the three sets, gate, and write report.json + report.html.

    `targeted` defaults to the problem types of this cycle's problem set. Each model is loaded, run on
    every set and freed before the next one loads. `load_model` turns a ModelRef into a generate
    function and its release (default: `evals.generate.model_loader`, local or on Ray); tests pass scripted models here. A curve
    named in `curve_path` must load; one found beside the adapter is charted when it loads and noted
    when it does not."""
    from flywheel.llm import usage

    settings = ctx.settings
    say = progress or (lambda _message: None)
    started, llm_before = time.perf_counter(), usage()
    sets = load_sets(ctx)
    targeted = check_targeted(list(targeted) or list(settings.gate.targeted) or default_targeted(sets), settings)
    curve, notes = _curve(candidate, curve_path)
    judge = judge or build_judge(settings)
    sizes = ", ".join(f"{name} {len(items)}" for name, items in sets.items())
    metrics: dict[str, dict[str, SetMetrics]] = {}
    timing: dict[str, dict[str, GenerationTiming]] = {}
    for role, ref in (("champion", champion), ("candidate", candidate)):
        say(f"evaluating the {role} {ref.name} on {sizes} items")
        generate, release = (load_model or model_loader(settings))(ref, settings)
        watches: dict[str, Stopwatch] = {}
        try:
            metrics[role] = evaluate_all(generate, sets, judge, settings, watches)
        finally:
            release()
        timing[role] = {"all": total(list(watches.values())), **{name: watch.result() for name, watch in watches.items()}}
    gate = evaluate_gate(metrics["champion"], metrics["candidate"], targeted, settings.gate)
    train_seconds, labels = training_cost(ctx.store, candidate.version)
    llm_after = usage()
    cost = Cost(
        eval_seconds=round(time.perf_counter() - started, 3),
        train_seconds=train_seconds,
        labels=labels,
        llm_calls=llm_after["calls"] - llm_before["calls"],
        llm_tokens=llm_after["tokens"] - llm_before["tokens"],
    )
    return write_report(
        settings,
        candidate=candidate,
        champion=champion,
        before=metrics["champion"],
        after=metrics["candidate"],
        gate=gate,
        curve=curve,
        set_sources=_set_sources(settings),
        notes=notes,
        cost=cost,
        timing=timing,
        history=champion_history(ctx.store),
    )


def record_on_version(store: Store, report: EvalReport) -> str | None:
    """Record the report (path, hash, gate result, key metrics) on the registered candidate version, so
    an approval can bind to its hash. Returns the version id, or None for an unregistered candidate."""
    if report.candidate.version is None:
        return None
    from flywheel.release import registry

    registry.attach_eval(
        store,
        report.candidate.version,
        report_path=str(report.path_json),
        report_hash=report.report_hash,
        gate_passed=report.gate.passed,
        metrics=report.key_metrics(),
    )
    return report.candidate.version


def _curve(candidate: ModelRef, curve_path: Path | str | None) -> tuple[Curve | None, list[str]]:
    if curve_path is not None:
        return load_curve(curve_path), []
    found = find_curve(candidate)
    if found is None:
        return None, []
    try:
        return load_curve(found), []
    except UserInputError as exc:
        return None, [f"training curve not charted: {exc}"]
