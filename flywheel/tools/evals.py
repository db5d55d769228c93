"""Tools: evaluate a candidate against the champion and read eval reports; list model versions.

`run_evaluation` does what `flywheel eval --candidate VERSION` does (flywheel.evals.runner.run_eval,
then the report is recorded on the version with runner.record_on_version, so an approval can bind
to its hash). It takes no gate options: the targeted problem types are this cycle's (the problem set's) and
the thresholds are the settings'; nothing the model says can loosen the gate.

A test or an embedding application may set a model loader (flywheel.evals.runner's ModelLoader) as
`ctx.eval_model_loader`; by default the real models are loaded. Reports are read back, checked against
their recorded hash and summarised by flywheel.release.evaluation.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel.errors import ToolInputError
from flywheel.release import registry
from flywheel.release.evaluation import EvalSummary, champion_ref, ref_from_version, summarize_report, verified_report
from flywheel.tools.base import ToolContext, ToolSpec, report_progress


def run_evaluation(ctx: ToolContext, version: str) -> EvalSummary:
    """Evaluate a candidate version against the champion on the fixed test set, the baseline samples and this cycle's problems; apply the promotion gate and record the report on the version.

    Args:
        version: the candidate version id (e.g. v3), from register_candidate.
    """
    from flywheel.evals.runner import record_on_version, run_eval

    target = registry.resolve(ctx.store, version)
    if target.adapter_path is None:
        raise ToolInputError(f"{target.id} is a base model without an adapter; evaluate a trained candidate")
    candidate = ref_from_version(target)
    champion = champion_ref(ctx.store, candidate)
    report = run_eval(
        ctx,
        candidate,
        champion,
        progress=lambda message: report_progress(ctx, message, version=target.id),
        load_model=ctx.eval_model_loader,
    )
    record_on_version(ctx.store, report)
    document = json.loads(report.path_json.read_text(encoding="utf-8"))
    return summarize_report(target.id, report.report_hash, report.path_json, document)


def read_eval_report(ctx: ToolContext, version: str) -> EvalSummary:
    """A version's recorded eval report: did it pass the gate, why or why not, and the rates before and after.

    Args:
        version: a version id (v3) or alias (champion, canary).
    """
    target = registry.resolve(ctx.store, version)
    document, path = verified_report(target)
    return summarize_report(target.id, target.eval_report_hash or "", path, document)


def list_models(ctx: ToolContext) -> list[registry.VersionRow]:
    """Every model version, newest first, with its aliases, status, gate result and approval."""
    return registry.list_versions(ctx.store)[:20]


def _eval_facts(summary: EvalSummary) -> dict[str, Any]:
    return {"candidate": summary.version, "report_hash": summary.report_hash, "gate_passed": summary.gate_passed}


SPECS = [ToolSpec(run_evaluation, mutates=True, facts=_eval_facts), ToolSpec(read_eval_report), ToolSpec(list_models)]
