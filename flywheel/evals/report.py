"""The eval report: report.json (every number) and report.html (the same, for a person to look at).

The report hash is the sha256 of the report.json bytes; a human approval binds to it, so what it covers
holds nothing that changes between two runs over the same models and data (no timestamps): evaluating
the same candidate twice gives the same hash and the same folder. Two blocks measure the run itself and
do change: `timing` (first-token latency and tokens/s, flywheel.evals.timing) and `cost` (seconds,
labels, LLM calls, flywheel.evals.cost). The hash leaves them out: it is the sha256 of the canonical
report.json bytes without those two keys (`hashed_bytes`), which are the file's own bytes for a report
written without them. An approval binds to what was measured of the candidate, not to how long it took.
The HTML adds the generation time and may change freely; it is not part of the hash. It is report.html
rendered with Jinja2, autoescape on: the page's markup lives in the template, this module only chooses
what goes in it.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup
from pydantic import BaseModel, ConfigDict

from flywheel.errors import UserInputError
from flywheel.evals.charts import BarPair, Change, diverging_bars, grouped_bars, line_chart
from flywheel.evals.cost import Cost
from flywheel.evals.gate import BASELINE, PROBLEM, SET_LABELS, TEST, GateResult
from flywheel.evals.history import HistoryPoint, history_chart, with_candidate
from flywheel.evals.metrics import NO_INTENT, ItemOutcome, SetMetrics, points
from flywheel.evals.timing import GenerationTiming
from flywheel.settings import Settings

REPORT_SCHEMA = "flywheel.eval_report/1"
SET_ORDER = (TEST, BASELINE, PROBLEM)
# report.json keys the report hash leaves out: measurements of the run, and the champions so far (read
# from the store for context; they are not this candidate's results)
RUN_MEASUREMENTS = ("cost", "timing", "history")
RAREST_INTENTS = 10  # the report's table of the intents with the fewest test items
Curve = dict[str, list[tuple[float, float]]]  # series name -> (step, value) points


class ModelRef(BaseModel):
    """A model to evaluate: a registered version or a base folder plus an optional adapter folder."""

    model_config = ConfigDict(extra="forbid")

    name: str  # the version id, or a label for an unregistered adapter
    base_model: str
    adapter_path: str | None = None
    adapter_sha256: str | None = None  # recorded by the registry: the report names the exact weights
    version: str | None = None  # registry id when the model came from the registry


class EvalReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path_json: Path
    path_html: Path
    report_hash: str
    gate: GateResult
    candidate: ModelRef
    champion: ModelRef
    targeted: list[str]
    before: dict[str, SetMetrics]  # champion
    after: dict[str, SetMetrics]  # candidate
    cost: Cost | None = None
    timing: dict[str, dict[str, GenerationTiming]] | None = None  # role -> set (and "all") -> timing

    def key_metrics(self) -> dict[str, Any]:
        """Headline numbers for the registry: task success and targeted problem rates on the primary set
        (the fixed test set, else the problem set, else the baseline set), and per-set numbers."""
        out: dict[str, Any] = {"gate_passed": self.gate.passed, "targeted": self.targeted, "sets": {}}
        primary = next((n for n in SET_ORDER if n in self.after and not self.after[n].empty), None)
        if primary is not None:
            metrics = self.after[primary]
            out["primary_set"] = primary
            out["task_success"] = metrics.task_success.rate
            out["targeted_problem_rates"] = {t: metrics.problem_rates[t].rate for t in self.targeted if t in metrics.problem_rates}
        for name, metrics in self.after.items():
            if not metrics.empty:
                out["sets"][name] = {
                    "size": metrics.size,
                    "task_success": metrics.task_success.rate,
                    "champion_task_success": self.before[name].task_success.rate,
                    "problem_rates": {t: r.rate for t, r in metrics.problem_rates.items()},
                }
        return out


# --- training curves ------------------------------------------------------------------------------------


def load_curve(path: Path | str) -> Curve:
    """Read a training curve: a list of log records with a step (TRL/transformers `log_history`),
    a dict holding such a list under log_history/points/history/curve, or a dict of series name ->
    [[step, value], ...]. Loss-like series are kept (learning rate and counters are not curves
    anyone approves on)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"training curve {path}: {exc}") from None
    if isinstance(data, dict):
        for key in ("log_history", "points", "history", "curve"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if isinstance(data, dict) and data and all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in data.values()):
        # flywheel's own curve.json: {"train": [log records], "eval": [log records]}; name each series by its split
        data = [
            {"step": r.get("step"), **{f"{split}_{k}": v for k, v in r.items() if k != "step"}}
            for split, records in data.items()
            for r in records
        ]
    series: Curve = {}
    if isinstance(data, list):
        for record in data:
            if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
                continue
            for key, value in record.items():
                if "loss" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, []).append((float(record["step"]), float(value)))
    elif isinstance(data, dict):
        for key, values in data.items():
            if isinstance(values, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):
                try:
                    series[key] = [(float(x), float(y)) for x, y in values]
                except (TypeError, ValueError):
                    raise UserInputError(f"training curve {path}: series {key!r} holds non-numbers") from None
    if not series:
        raise UserInputError(f"training curve {path}: no loss values with a step found")
    return {name: sorted(points) for name, points in series.items()}


def find_curve(candidate: ModelRef) -> Path | None:
    """The curve.json a training run left next to (or in) the candidate's adapter folder, if any."""
    if not candidate.adapter_path:
        return None
    adapter = Path(candidate.adapter_path)
    for place in (adapter / "curve.json", adapter.parent / "curve.json"):
        if place.is_file():
            return place
    return None


# --- writing -------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "candidate"


def rarest_intents(metrics: SetMetrics | None, limit: int = RAREST_INTENTS) -> list[str]:
    """The intents with the fewest items in a set (ties by name), items without an intent left out:
    where a model's skill is thinnest and a regression hides in the average."""
    if metrics is None:
        return []
    named = [(rate.n, intent) for intent, rate in metrics.per_intent.items() if intent != NO_INTENT]
    return [intent for _, intent in sorted(named)[:limit]]


def report_document(
    settings: Settings,
    candidate: ModelRef,
    champion: ModelRef,
    before: Mapping[str, SetMetrics],
    after: Mapping[str, SetMetrics],
    gate: GateResult,
    curve: Curve | None = None,
    set_sources: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    cost: Cost | None = None,
    timing: Mapping[str, Mapping[str, GenerationTiming]] | None = None,
    history: Sequence[HistoryPoint] = (),
) -> dict[str, Any]:
    """Everything report.json holds, as plain JSON values."""
    document: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "candidate": candidate.model_dump(mode="json"),
        "champion": champion.model_dump(mode="json"),
        "targeted": gate.targeted,
        "sets": {
            name: {"size": after[name].size if name in after else 0, "source": (set_sources or {}).get(name, "")} for name in SET_ORDER
        },
        "champion_metrics": {name: m.model_dump(mode="json") for name, m in before.items()},
        "candidate_metrics": {name: m.model_dump(mode="json") for name, m in after.items()},
        "gate": gate.model_dump(mode="json"),
        "settings": {
            "gate": settings.gate.model_dump(mode="json"),
            "eval": settings.eval.model_dump(mode="json"),
            "taxonomy": settings.taxonomy.model_dump(mode="json"),
            "policies": settings.policies.model_dump(mode="json"),
            "judge": "rule+llm" if settings.llm.enabled else "rule",
        },
        "training_curve": {name: [list(p) for p in points] for name, points in curve.items()} if curve else None,
        "rarest_intents": rarest_intents(before.get(TEST)),
        "notes": list(notes),
    }
    if cost is not None:
        document["cost"] = cost.model_dump(mode="json")
    if timing is not None:
        document["timing"] = {role: {k: t.model_dump(mode="json") for k, t in sets.items()} for role, sets in timing.items()}
    if history:
        document["history"] = [point.model_dump(mode="json") for point in history]
    return document


def _canonical(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def hashed_bytes(document: Mapping[str, Any]) -> bytes:
    """What the report hash covers: the canonical JSON of the document without the run measurements."""
    return _canonical({k: v for k, v in document.items() if k not in RUN_MEASUREMENTS})


def write_report(
    settings: Settings,
    candidate: ModelRef,
    champion: ModelRef,
    before: Mapping[str, SetMetrics],
    after: Mapping[str, SetMetrics],
    gate: GateResult,
    curve: Curve | None = None,
    set_sources: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    cost: Cost | None = None,
    timing: Mapping[str, Mapping[str, GenerationTiming]] | None = None,
    history: Sequence[HistoryPoint] = (),
) -> EvalReport:
    """Write report.json and report.html under artifacts/reports/<candidate>-<short hash>/. `history`: the
    champions so far (flywheel.evals.history), drawn with this candidate as the last point."""
    document = report_document(settings, candidate, champion, before, after, gate, curve, set_sources, notes, cost, timing, history)
    payload = _canonical(document)
    report_hash = hashlib.sha256(hashed_bytes(document)).hexdigest()
    folder = settings.artifacts_path / "reports" / f"{_safe_name(candidate.name)}-{report_hash[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    path_json, path_html = folder / "report.json", folder / "report.html"
    _write_atomic(path_json, payload)
    _write_atomic(path_html, render_html(document, report_hash).encode("utf-8"))
    return EvalReport(
        path_json=path_json,
        path_html=path_html,
        report_hash=report_hash,
        gate=gate,
        candidate=candidate,
        champion=champion,
        targeted=gate.targeted,
        before=dict(before),
        after=dict(after),
        cost=cost,
        timing={role: dict(sets) for role, sets in timing.items()} if timing is not None else None,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def report_hash_of(path_json: Path | str) -> str:
    """The hash an approval must carry for this report (recomputed from the file, never trusted): the
    sha256 of the file's bytes, or, when it holds run measurements, of `hashed_bytes` of its document."""
    raw = Path(path_json).read_bytes()
    try:
        document = json.loads(raw)
    except ValueError:
        return hashlib.sha256(raw).hexdigest()  # not JSON: hashed as it is, and matches nothing recorded
    if isinstance(document, dict) and any(key in document for key in RUN_MEASUREMENTS):
        return hashlib.sha256(hashed_bytes(document)).hexdigest()
    return hashlib.sha256(raw).hexdigest()


# --- the HTML page -------------------------------------------------------------------------------------------


def render_html(document: Mapping[str, Any], report_hash: str) -> str:
    """The report page from the report document. Every string from the document is escaped (Jinja2's
    autoescape); the SVG charts are built, and their text escaped, by flywheel.evals.charts."""
    before = {k: SetMetrics.model_validate(v) for k, v in document["champion_metrics"].items()}
    after = {k: SetMetrics.model_validate(v) for k, v in document["candidate_metrics"].items()}
    gate = GateResult.model_validate(document["gate"])
    candidate, champion = document["candidate"], document["champion"]
    targeted = set(document["targeted"])
    evaluated = [name for name in SET_ORDER if name in before and name in after and not after[name].empty]
    worse, better = _changed_items(before, after)
    return _template().render(
        title=f"flywheel eval: {candidate['name']} vs {champion['name']}",
        candidate=_describe(candidate),
        champion=_describe(champion),
        report_hash=report_hash,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        gate=gate,
        cards=[(SET_LABELS[name], before.get(name), after.get(name)) for name in SET_ORDER],
        problem_charts=_problem_charts(before, after, targeted),
        intent_chart=_intent_chart(before, after, document["settings"]["gate"]["min_intent_samples"]),
        curve_chart=_curve_chart(document.get("training_curve")),
        history_chart=_history_chart(document),
        targeted=targeted,
        numbers=[(SET_LABELS[name], before[name], after[name], _problem_types(before[name], after[name])) for name in evaluated],
        intents=_intent_order(before, after),
        rarest=_rarest_rows(before, after, gate),
        speed=_speed_rows(document.get("timing")),
        cost=document.get("cost"),
        no_intent=NO_INTENT,
        worse=worse,
        better=better,
        changed_limit=12,
        sets=[(SET_LABELS[name], info) for name, info in document["sets"].items()],
        judges=sorted({m.get("judge", "rule") for m in document["candidate_metrics"].values() if m.get("size")}),
        notes=list(document.get("notes", [])),
        settings_json=json.dumps(document["settings"], indent=2, sort_keys=True),
    )


def _escape(value: Any) -> Any:
    """Jinja2's `finalize`: autoescape with html.escape's entity forms (&#x27;, &quot;), the ones the
    report and its charts have always used. Markup (the charts) passes as it is."""
    return value if hasattr(value, "__html__") else Markup(html.escape(str(value), quote=True))


def _seconds(value: float | None) -> str:
    if value is None:
        return "\u2013"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:,.1f} s"


def _number(value: float | None, digits: int = 1) -> str:
    return "\u2013" if value is None else f"{value:,.{digits}f}"


def _tone(delta: float, lower_is_better: bool) -> str:
    good = delta < 0 if lower_is_better else delta > 0
    return "flat" if abs(delta) < 1e-12 else ("up" if good else "down")


@functools.cache
def _template() -> Any:
    from jinja2 import Environment, StrictUndefined

    env = Environment(
        autoescape=True, finalize=_escape, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.filters.update(pct=lambda share: f"{share:.1%}", points=points, secs=_seconds, num=_number)
    env.globals["tone"] = _tone
    return env.from_string(resources.files("flywheel.evals").joinpath("report.html").read_text(encoding="utf-8"))


def _describe(ref: Mapping[str, Any]) -> str:
    adapter = f" + adapter {ref['adapter_path']}" if ref.get("adapter_path") else " (base model)"
    weights = f" (weights sha256 {ref['adapter_sha256'][:12]})" if ref.get("adapter_sha256") else ""
    return f"{ref['name']}: {ref['base_model']}{adapter}{weights}"


def _problem_types(b: SetMetrics, a: SetMetrics) -> list[str]:
    return list(dict.fromkeys([*b.problem_rates, *a.problem_rates]))


def _problem_charts(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], targeted: set[str]) -> list[Markup]:
    charts = []
    for name in (TEST, PROBLEM, BASELINE):
        b, a = before.get(name), after.get(name)
        if b is None or a is None or a.empty:
            continue
        rows = []
        for problem_type in _problem_types(b, a):
            rb, ra = b.problem_rates.get(problem_type), a.problem_rates.get(problem_type)
            rows.append(
                BarPair(
                    label=problem_type,
                    before=rb.rate if rb else 0.0,
                    after=ra.rate if ra else 0.0,
                    before_ci=(rb.low, rb.high) if rb else None,
                    after_ci=(ra.low, ra.high) if ra else None,
                    emphasis=problem_type in targeted,
                    note="targeted" if problem_type in targeted else "",
                )
            )
        charts.append(Markup(grouped_bars(rows, f"Problem rate per type, {SET_LABELS[name]} ({a.size} items; lower is better)")))
    return charts


def _intent_chart(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], min_samples: int) -> Markup | None:
    name = next((n for n in (TEST, PROBLEM) if n in after and not after[n].empty), None)
    if name is None:
        return None
    b, a = before[name], after[name]
    rows = []
    for intent, ra in a.per_intent.items():
        rb = b.per_intent.get(intent)
        if rb is None:
            continue
        rows.append(
            Change(label=intent, delta=ra.rate - rb.rate, detail=f"({rb.count}/{rb.n} -> {ra.count}/{ra.n})", muted=ra.n < min_samples)
        )
    return Markup(diverging_bars(rows, f"Success change per intent, {SET_LABELS[name]} (grey: fewer than {min_samples} items, not gated)"))


def _history_chart(document: Mapping[str, Any]) -> Markup | None:
    """The champions so far and this candidate; drawn once there were two champions (before that the
    problem-rate charts above say the same)."""
    history = [HistoryPoint.model_validate(p) for p in document.get("history") or []]
    return history_chart(with_candidate(history, document)) if len(history) >= 2 else None


def _curve_chart(curve: Mapping[str, Sequence[Sequence[float]]] | None) -> Markup | None:
    if not curve:
        return None
    series = {name: [(float(x), float(y)) for x, y in points] for name, points in curve.items()}
    return Markup(line_chart(series, "Loss by training step"))


def _intent_order(
    before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics]
) -> tuple[str, SetMetrics, SetMetrics, list[str]] | None:
    """The per-intent table's set and its intents, the biggest drop in success first."""
    name = next((n for n in (TEST, PROBLEM) if n in after and not after[n].empty), None)
    if name is None:
        return None
    b, a = before[name], after[name]
    order = sorted(a.per_intent, key=lambda i: (a.per_intent[i].rate - (b.per_intent[i].rate if i in b.per_intent else 0.0), i))
    return SET_LABELS[name], b, a, order


def _rarest_rows(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], gate: GateResult) -> list[tuple[str, Any, Any, Any]]:
    """(intent, champion's rate, candidate's rate, the gate's intent check or None) for the rarest intents
    of the fixed test set."""
    b, a = before.get(TEST), after.get(TEST)
    if b is None or a is None or a.empty:
        return []
    checks = {c.subject: c for c in gate.checks if c.kind == "intent" and c.set == TEST and not c.skipped}
    return [(i, b.per_intent.get(i), a.per_intent.get(i), checks.get(i)) for i in rarest_intents(b)]


def _speed_rows(timing: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[str, Any, Any]]:
    """(set label, champion's timing, candidate's) for all sets together, then each evaluated set."""
    if not timing or "champion" not in timing or "candidate" not in timing:
        return []
    champion, candidate = timing["champion"], timing["candidate"]
    rows = [("all sets", champion.get("all"), candidate.get("all"))]
    rows += [(SET_LABELS[n], champion.get(n), candidate.get(n)) for n in SET_ORDER if (candidate.get(n) or {}).get("items")]
    return rows


Changed = list[tuple[str, ItemOutcome, ItemOutcome]]  # (set name, champion's outcome, candidate's)


def _changed_items(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics]) -> tuple[Changed, Changed]:
    """Items whose verdict flipped, (worse, better): the quickest way to see what the numbers mean."""
    worse: Changed = []
    better: Changed = []
    for name in SET_ORDER:
        if name not in before or name not in after:
            continue
        champion = {o.id: o for o in before[name].outcomes}
        for outcome in after[name].outcomes:
            old = champion.get(outcome.id)
            if old is None or old.success == outcome.success:
                continue
            (better if outcome.success else worse).append((name, old, outcome))
    return worse, better
