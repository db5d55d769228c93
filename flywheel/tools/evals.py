"""Tools: evaluate a candidate against the champion and read eval reports; list model versions.

`run_evaluation` does what `flywheel eval --candidate VERSION` does (flywheel.evals.runner.run_eval,
then the report is recorded on the version with registry.attach_eval, so an approval can bind to its
hash). It takes no gate options: the targeted problem types are this cycle's (the problem set's) and
the thresholds are the settings'; nothing the model says can loosen the gate.

A test or an embedding application may put a model loader (flywheel.evals.runner's ModelLoader) in
`ctx.extras["eval_model_loader"]`; by default the real models are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel import registry
from flywheel.errors import PolicyViolation, ToolInputError
from flywheel.evals.report import SET_ORDER, report_hash_of
from flywheel.records import Record
from flywheel.tools.registry import ToolContext, ToolSpec, report_progress

MODEL_LOADER_KEY = "eval_model_loader"
SHOWN_REASONS = 8


class SetNumbers(Record):
    size: int
    task_success_before: float
    task_success_after: float
    problem_rates_before: dict[str, float] = {}
    problem_rates_after: dict[str, float] = {}


class EvalSummary(Record):
    version: str
    champion: str
    report_hash: str
    report_json: str
    report_html: str | None = None
    gate_passed: bool
    targeted: list[str] = []
    failed_checks: list[str] = []
    reasons: list[str] = []  # the first few sentences, failing ones first
    sets: dict[str, SetNumbers] = {}


def summarize_report(version: str, report_hash: str, path_json: Path | str, document: dict[str, Any]) -> EvalSummary:
    """The numbers a person (or the model) needs from report.json: gate, reasons, rates before and after."""
    gate = document.get("gate") or {}
    before, after = document.get("champion_metrics") or {}, document.get("candidate_metrics") or {}
    sets: dict[str, SetNumbers] = {}
    for name in SET_ORDER:
        b, a = before.get(name), after.get(name)
        if not b or not a or not a.get("size"):
            continue
        sets[name] = SetNumbers(
            size=a["size"],
            task_success_before=b["task_success"]["rate"],
            task_success_after=a["task_success"]["rate"],
            problem_rates_before={t: r["rate"] for t, r in (b.get("problem_rates") or {}).items() if r.get("count")},
            problem_rates_after={t: r["rate"] for t, r in (a.get("problem_rates") or {}).items() if r.get("count")},
        )
    html = Path(path_json).with_name("report.html")
    return EvalSummary(
        version=version,
        champion=str((document.get("champion") or {}).get("name") or ""),
        report_hash=report_hash,
        report_json=str(path_json),
        report_html=str(html) if html.is_file() else None,
        gate_passed=bool(gate.get("passed")),
        targeted=list(document.get("targeted") or []),
        failed_checks=[c["reason"] for c in gate.get("checks") or [] if not c.get("passed")][:SHOWN_REASONS],
        reasons=list(gate.get("reasons") or [])[:SHOWN_REASONS],
        sets=sets,
    )


def load_report(version: registry.ModelVersion) -> tuple[dict[str, Any], Path]:
    """A version's recorded eval report, after checking the file still hashes to the recorded hash."""
    if not version.eval_report_path or not version.eval_report_hash:
        raise ToolInputError(f"{version.id} has no eval report yet; run_evaluation first")
    path = Path(version.eval_report_path)
    if not path.is_file():
        raise ToolInputError(f"{version.id}: its eval report {path} is missing; run_evaluation again")
    if report_hash_of(path) != version.eval_report_hash:
        raise PolicyViolation(f"{version.id}: {path} no longer matches the recorded report hash")
    return json.loads(path.read_text(encoding="utf-8")), path


def run_evaluation(ctx: ToolContext, version: str) -> EvalSummary:
    """Evaluate a candidate version against the champion on the fixed test set, the baseline samples and this cycle's problems; apply the promotion gate and record the report on the version.

    Args:
        version: the candidate version id (e.g. v3), from register_candidate.
    """
    from flywheel.commands.evaluate import ref_from_version, resolve_champion
    from flywheel.evals.runner import run_eval

    target = registry.resolve(ctx.store, version)
    if target.adapter_path is None:
        raise ToolInputError(f"{target.id} is a base model without an adapter; evaluate a trained candidate")
    candidate = ref_from_version(target)
    champion = resolve_champion(ctx, None, candidate)
    report = run_eval(ctx, candidate, champion, progress=lambda message: report_progress(ctx, message, version=target.id),
                      load_model=ctx.extras.get(MODEL_LOADER_KEY))
    registry.attach_eval(ctx.store, target.id, report_path=str(report.path_json), report_hash=report.report_hash,
                         gate_passed=report.gate.passed, metrics=report.key_metrics())
    document = json.loads(report.path_json.read_text(encoding="utf-8"))
    return summarize_report(target.id, report.report_hash, report.path_json, document)


def read_eval_report(ctx: ToolContext, version: str) -> EvalSummary:
    """A version's recorded eval report: did it pass the gate, why or why not, and the rates before and after.

    Args:
        version: a version id (v3) or alias (champion, canary).
    """
    target = registry.resolve(ctx.store, version)
    document, path = load_report(target)
    return summarize_report(target.id, target.eval_report_hash or "", path, document)


def list_models(ctx: ToolContext) -> list[registry.VersionRow]:
    """Every model version, newest first, with its aliases, status, gate result and approval."""
    return registry.list_versions(ctx.store)[:20]


def _eval_facts(summary: EvalSummary) -> dict[str, Any]:
    return {"candidate": summary.version, "report_hash": summary.report_hash, "gate_passed": summary.gate_passed}


SPECS = [
    ToolSpec(run_evaluation, mutates=True, facts=_eval_facts),
    ToolSpec(read_eval_report),
    ToolSpec(list_models),
]
