"""What a release needs from evaluation: a registered version as the model to evaluate, the champion to
compare it against, and its recorded eval report read back (checked against the recorded hash) and
summarised for a person or the model.

`flywheel eval`, the agent's eval tools, `flywheel graduate` and the approval prompt all read reports
through `verified_report`: one check, one error, whichever way in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.errors import NotFoundError, PolicyViolation, UserInputError
from flywheel.evals.report import SET_ORDER, ModelRef, report_hash_of
from flywheel.records import Record
from flywheel.release import registry
from flywheel.release.records import ModelVersion
from flywheel.store.db import Store

SHOWN_REASONS = 8


def ref_from_version(version: ModelVersion) -> ModelRef:
    """A registered version as a ModelRef, after checking its adapter weights still hash as recorded."""
    registry.verify_adapter(version)
    return ModelRef(
        name=version.id,
        base_model=version.base_model,
        adapter_path=version.adapter_path,
        adapter_sha256=version.adapter_sha256,
        version=version.id,
    )


def champion_ref(store: Store, candidate: ModelRef) -> ModelRef:
    """What `candidate` is compared against by default: the registry's champion, or the candidate's own
    base model when there is no champion or the candidate is the champion."""
    try:
        champion = ref_from_version(registry.resolve(store, registry.CHAMPION))
    except NotFoundError:
        champion = None
    if champion is not None and champion.name != candidate.name:
        return champion
    return ModelRef(name="base", base_model=candidate.base_model)


def verified_report(version: ModelVersion) -> tuple[dict[str, Any], Path]:
    """A version's recorded eval report (the report.json document and its path), after checking the file
    still hashes to the hash recorded on the version, the one an approval binds to."""
    if not version.eval_report_path or not version.eval_report_hash:
        raise UserInputError(f"{version.id} has no eval report yet; evaluate it first")
    path = Path(version.eval_report_path)
    if not path.is_file():
        raise UserInputError(f"{version.id}: its eval report {path} is missing; evaluate it again")
    if report_hash_of(path) != version.eval_report_hash:
        raise PolicyViolation(f"{version.id}: {path} no longer matches the recorded report hash; it was changed after evaluation")
    return json.loads(path.read_text(encoding="utf-8")), path


# --- the summary --------------------------------------------------------------------------------------------


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
