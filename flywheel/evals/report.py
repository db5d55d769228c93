"""The eval report: report.json (every number) and report.html (the same, for a person to look at).

The report hash is the sha256 of the report.json bytes; a human approval binds to it, so report.json
holds nothing that changes between two runs over the same models and data (no timestamps, no
absolute run times): evaluating the same candidate twice gives the same hash and the same folder.
The HTML adds the generation time and may change freely; it is not part of the hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from pydantic import BaseModel, ConfigDict

from flywheel.errors import UserInputError
from flywheel.evals.charts import BarPair, Change, diverging_bars, esc, grouped_bars, line_chart
from flywheel.evals.gate import BASELINE, PROBLEM, SET_LABELS, TEST, GateResult
from flywheel.evals.metrics import NO_INTENT, ItemOutcome, SetMetrics, points
from flywheel.settings import Settings

REPORT_SCHEMA = "flywheel.eval_report/1"
SET_ORDER = (TEST, BASELINE, PROBLEM)
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
        data = [{"step": r.get("step"), **{f"{split}_{k}": v for k, v in r.items() if k != "step"}}
                for split, records in data.items() for r in records]
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
) -> dict[str, Any]:
    """Everything report.json holds, as plain JSON values."""
    return {
        "schema": REPORT_SCHEMA,
        "candidate": candidate.model_dump(mode="json"),
        "champion": champion.model_dump(mode="json"),
        "targeted": gate.targeted,
        "sets": {
            name: {"size": after[name].size if name in after else 0, "source": (set_sources or {}).get(name, "")}
            for name in SET_ORDER
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
        "notes": list(notes),
    }


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
) -> EvalReport:
    """Write report.json and report.html under artifacts/reports/<candidate>-<short hash>/."""
    document = report_document(settings, candidate, champion, before, after, gate, curve, set_sources, notes)
    payload = (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    report_hash = hashlib.sha256(payload).hexdigest()
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
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def report_hash_of(path_json: Path | str) -> str:
    """The hash an approval must carry for this report (recomputed from the file, never trusted)."""
    return hashlib.sha256(Path(path_json).read_bytes()).hexdigest()


# --- the HTML page -------------------------------------------------------------------------------------------


def render_html(document: Mapping[str, Any], report_hash: str) -> str:
    """The report page from the report document. Every string from the document is escaped."""
    before = {k: SetMetrics.model_validate(v) for k, v in document["champion_metrics"].items()}
    after = {k: SetMetrics.model_validate(v) for k, v in document["candidate_metrics"].items()}
    gate = GateResult.model_validate(document["gate"])
    candidate, champion = document["candidate"], document["champion"]
    targeted = set(document["targeted"])
    sections = [
        _gate_box(gate),
        _summary_cards(before, after),
        _problem_charts(before, after, targeted),
        _intent_chart(before, after, document["settings"]["gate"]["min_intent_samples"]),
        _curve_chart(document.get("training_curve")),
        _numbers_table(before, after, targeted),
        _intent_table(before, after),
        _changed_items(before, after),
        _settings_block(document),
    ]
    template = Template(resources.files("flywheel.evals").joinpath("report.html").read_text(encoding="utf-8"))
    return template.substitute(
        title=esc(f"flywheel eval: {candidate['name']} vs {champion['name']}"),
        candidate=esc(_describe(candidate)),
        champion=esc(_describe(champion)),
        report_hash=esc(report_hash),
        generated=esc(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        body="\n".join(s for s in sections if s),
    )


def _describe(ref: Mapping[str, Any]) -> str:
    adapter = f" + adapter {ref['adapter_path']}" if ref.get("adapter_path") else " (base model)"
    weights = f" (weights sha256 {ref['adapter_sha256'][:12]})" if ref.get("adapter_sha256") else ""
    return f"{ref['name']}: {ref['base_model']}{adapter}{weights}"


def _gate_box(gate: GateResult) -> str:
    failed = [c for c in gate.checks if not c.passed]
    passed = [c for c in gate.checks if c.passed]
    verdict = "PASSED" if gate.passed else "FAILED"
    headline = (f"all {len(gate.checks)} checks passed" if gate.passed
                else f"{len(failed)} of {len(gate.checks)} checks failed")
    items = "".join(f"<li>{esc(c.reason)}</li>" for c in failed)
    ok_items = "".join(f'<li class="{"skip" if c.skipped else ""}">{esc(c.reason)}</li>' for c in passed)
    targeted = ", ".join(gate.targeted) or "none"
    return (
        f'<section class="gate {"pass" if gate.passed else "fail"}"><div class="verdict">Gate {verdict}</div>'
        f'<p class="headline">{esc(headline)}; targeted problem types: {esc(targeted)}</p>'
        + (f'<h3>Failing checks</h3><ul class="reasons">{items}</ul>' if failed else "")
        + f'<details{" open" if gate.passed else ""}><summary>{len(passed)} passing checks</summary><ul class="reasons ok">{ok_items}</ul></details>'
        "</section>"
    )


def _summary_cards(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics]) -> str:
    cards = []
    for name in SET_ORDER:
        b, a = before.get(name), after.get(name)
        if b is None or a is None or a.empty:
            cards.append(f'<div class="card empty"><div class="label">{esc(SET_LABELS[name])}</div><div class="big">empty</div><div class="sub">not evaluated</div></div>')
            continue
        delta = a.task_success.rate - b.task_success.rate
        tone = "up" if delta > 0 else "down" if delta < 0 else "flat"
        cards.append(
            f'<div class="card"><div class="label">{esc(SET_LABELS[name])} &middot; {a.size} items</div>'
            f'<div class="big">{a.task_success.rate:.1%}</div>'
            f'<div class="sub">task success, champion {b.task_success.rate:.1%} '
            f'<span class="delta {tone}">{points(delta)} pts</span></div></div>'
        )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _problem_charts(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], targeted: set[str]) -> str:
    charts = []
    for name in (TEST, PROBLEM, BASELINE):
        b, a = before.get(name), after.get(name)
        if b is None or a is None or a.empty:
            continue
        rows = []
        for problem_type in dict.fromkeys([*b.problem_rates, *a.problem_rates]):
            rb, ra = b.problem_rates.get(problem_type), a.problem_rates.get(problem_type)
            rows.append(BarPair(
                label=problem_type,
                before=rb.rate if rb else 0.0,
                after=ra.rate if ra else 0.0,
                before_ci=(rb.low, rb.high) if rb else None,
                after_ci=(ra.low, ra.high) if ra else None,
                emphasis=problem_type in targeted,
                note="targeted" if problem_type in targeted else "",
            ))
        charts.append(grouped_bars(rows, f"Problem rate per type, {SET_LABELS[name]} ({a.size} items; lower is better)"))
    if not charts:
        return '<section><h2>Problem rates</h2><p class="muted">every set is empty: nothing was evaluated</p></section>'
    return "<section><h2>Problem rates, champion vs candidate</h2>" + "".join(f'<div class="chart">{c}</div>' for c in charts) + "</section>"


def _intent_chart(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], min_samples: int) -> str:
    name = next((n for n in (TEST, PROBLEM) if n in after and not after[n].empty), None)
    if name is None:
        return ""
    b, a = before[name], after[name]
    rows = []
    for intent, ra in a.per_intent.items():
        rb = b.per_intent.get(intent)
        if rb is None:
            continue
        rows.append(Change(label=intent, delta=ra.rate - rb.rate, detail=f"({rb.count}/{rb.n} -> {ra.count}/{ra.n})", muted=ra.n < min_samples))
    chart = diverging_bars(rows, f"Success change per intent, {SET_LABELS[name]} (grey: fewer than {min_samples} items, not gated)")
    return f'<section><h2>Per-intent success</h2><div class="chart">{chart}</div></section>'


def _curve_chart(curve: Mapping[str, Sequence[Sequence[float]]] | None) -> str:
    if not curve:
        return '<section><h2>Training curve</h2><p class="muted">no training curve was recorded for this candidate</p></section>'
    series = {name: [(float(x), float(y)) for x, y in points] for name, points in curve.items()}
    return f'<section><h2>Training curve</h2><div class="chart">{line_chart(series, "Loss by training step")}</div></section>'


def _rate_cell(rate: Any) -> str:
    if rate is None:
        return "<td>&ndash;</td>"
    return f'<td title="95% CI {rate.low:.1%}&ndash;{rate.high:.1%}">{rate.rate:.1%} <span class="muted">({rate.count}/{rate.n})</span></td>'


def _delta_cell(b: Any, a: Any, lower_is_better: bool) -> str:
    if a is None or b is None:
        return "<td>&ndash;</td>"
    delta = a.rate - b.rate
    good = delta < 0 if lower_is_better else delta > 0
    tone = "flat" if abs(delta) < 1e-12 else ("up" if good else "down")
    return f'<td class="delta {tone}">{points(delta)}</td>'


def _numbers_table(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], targeted: set[str]) -> str:
    rows = []
    for name in SET_ORDER:
        b, a = before.get(name), after.get(name)
        if b is None or a is None or a.empty:
            continue
        rows.append(f'<tr class="group"><th colspan="4">{esc(SET_LABELS[name])} &middot; {a.size} items</th></tr>')
        rows.append(f"<tr><td>task success</td>{_rate_cell(b.task_success)}{_rate_cell(a.task_success)}{_delta_cell(b.task_success, a.task_success, False)}</tr>")
        for problem_type in dict.fromkeys([*b.problem_rates, *a.problem_rates]):
            rb, ra = b.problem_rates.get(problem_type), a.problem_rates.get(problem_type)
            mark = ' <span class="tag">targeted</span>' if problem_type in targeted else ""
            rows.append(f"<tr><td>{esc(problem_type)}{mark}</td>{_rate_cell(rb)}{_rate_cell(ra)}{_delta_cell(rb, ra, True)}</tr>")
        sev_b = ", ".join(f"{esc(k)} {v}" for k, v in b.severity_counts.items())
        sev_a = ", ".join(f"{esc(k)} {v}" for k, v in a.severity_counts.items())
        rows.append(f'<tr><td>findings by severity</td><td>{sev_b}</td><td>{sev_a}</td><td></td></tr>')
        if a.generation_errors or b.generation_errors:
            rows.append(f"<tr><td>generation errors</td><td>{b.generation_errors}</td><td>{a.generation_errors}</td><td></td></tr>")
        if a.llm_unjudged or b.llm_unjudged:
            rows.append(f"<tr><td>answers the LLM judge gave no verdict on</td><td>{b.llm_unjudged}</td><td>{a.llm_unjudged}</td><td></td></tr>")
    if not rows:
        return ""
    return ('<section><h2>Numbers</h2><p class="muted">rates are shares of items; hover a cell for its 95% Wilson interval; '
            'change in points (green is better)</p><table><thead><tr><th>metric</th><th>champion</th><th>candidate</th>'
            '<th>change</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></section>")


def _intent_table(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics]) -> str:
    name = next((n for n in (TEST, PROBLEM) if n in after and not after[n].empty), None)
    if name is None:
        return ""
    b, a = before[name], after[name]
    order = sorted(a.per_intent, key=lambda i: (a.per_intent[i].rate - (b.per_intent[i].rate if i in b.per_intent else 0.0), i))
    rows = [f"<tr><td>{esc(i)}</td>{_rate_cell(b.per_intent.get(i))}{_rate_cell(a.per_intent[i])}{_delta_cell(b.per_intent.get(i), a.per_intent[i], False)}</tr>" for i in order]
    return (f'<section><details><summary>Success per intent, {esc(SET_LABELS[name])} ({len(rows)} intents; '
            f'"{esc(NO_INTENT)}" holds items without one)</summary><table><thead><tr><th>intent</th><th>champion</th>'
            '<th>candidate</th><th>change</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></details></section>")


def _findings_cell(outcome: ItemOutcome) -> str:
    """What the judge found, with each finding's check and detail in the tooltip."""
    if outcome.error:
        return f"<td>{esc(outcome.error)}</td>"
    shown = ", ".join(f"{f.problem_type} ({f.severity})" for f in outcome.findings) or "none"
    details = "; ".join(f"{f.check}: {f.detail}" for f in outcome.findings)
    return f'<td title="{esc(details)}">{esc(shown)}</td>' if details else f"<td>{esc(shown)}</td>"


def _changed_items(before: Mapping[str, SetMetrics], after: Mapping[str, SetMetrics], limit: int = 12) -> str:
    """Items whose verdict flipped: the quickest way to see what the numbers mean."""
    worse, better = [], []
    for name in SET_ORDER:
        if name not in before or name not in after:
            continue
        champion = {o.id: o for o in before[name].outcomes}
        for outcome in after[name].outcomes:
            old = champion.get(outcome.id)
            if old is None or old.success == outcome.success:
                continue
            (better if outcome.success else worse).append((name, old, outcome))
    if not worse and not better:
        return ""

    def table(rows: list[tuple[str, ItemOutcome, ItemOutcome]], caption: str) -> str:
        if not rows:
            return ""
        body = "".join(
            f'<tr><td>{esc(s)}</td><td class="mono wrap">{esc(new.id)}</td><td class="wrap">{esc(new.intent or NO_INTENT)}</td>'
            f'{_findings_cell(old)}{_findings_cell(new)}'
            f'<td class="answer">{esc(new.answer[:400])}</td></tr>'
            for s, old, new in rows[:limit]
        )
        more = f'<p class="muted">and {len(rows) - limit} more in report.json</p>' if len(rows) > limit else ""
        return (f"<h3>{esc(caption)} ({len(rows)})</h3><table><thead><tr><th>set</th><th>item</th><th>intent</th>"
                "<th>champion found</th><th>candidate found</th><th>candidate answer</th></tr></thead>"
                f"<tbody>{body}</tbody></table>{more}")

    return ("<section><h2>Items that changed</h2>" + table(worse, "Got worse") + table(better, "Got better") + "</section>")


def _settings_block(document: Mapping[str, Any]) -> str:
    sets = "".join(
        f"<li>{esc(SET_LABELS[name])}: {info['size']} items{' from ' + esc(info['source']) if info['source'] else ''}</li>"
        for name, info in document["sets"].items()
    )
    judges = sorted({m.get("judge", "rule") for m in document["candidate_metrics"].values() if m.get("size")})
    sets += f"<li>answers judged by: {esc(', '.join(judges) or 'nothing (every set is empty)')}</li>"
    notes = "".join(f"<li>{esc(n)}</li>" for n in document.get("notes", []))
    settings_json = json.dumps(document["settings"], indent=2, sort_keys=True)
    return (
        f'<section><h2>Sets and settings</h2><ul>{sets}</ul>'
        + (f'<h3>Notes</h3><ul>{notes}</ul>' if notes else "")
        + f'<details><summary>settings used</summary><pre>{esc(settings_json)}</pre></details></section>'
    )
