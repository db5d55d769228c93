"""The champions so far, version after version: task success and each problem rate on the fixed test set.

Read from the store, not kept on the side: every champion switch is an alias event, and every promoted
version's eval report holds its own numbers (candidate side) and its predecessor's (champion side), so
the first champion's numbers come from the first promoted version's report. A candidate under review
can be appended as the last point, which is how an eval report shows where this cycle would take the
line (flywheel.evals.report).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup
from pydantic import BaseModel

from flywheel.evals.charts import line_chart
from flywheel.store import versions as version_store
from flywheel.store.db import Store

CHAMPION = "champion"


class HistoryPoint(BaseModel):
    version: str
    task_success: float
    problem_rates: dict[str, float]
    candidate: bool = False  # under review, not (yet) a champion


def champion_history(store: Store) -> list[HistoryPoint]:
    """Each version that became champion, in the order it did, with its numbers on the fixed test set
    (versions with no eval report on a test set are left out)."""
    with store.engine.connect() as conn:
        order = version_store.holders(conn, CHAMPION)
        versions = {v.id: v for v in version_store.all_versions(conn)}
    points: dict[str, HistoryPoint] = {}
    for version_id in order:
        version = versions.get(version_id)
        report = _report(version.eval_report_path if version else None)
        if report is None:
            continue
        before = _test_point(report, "champion", (report.get("champion") or {}).get("version"))
        if before is not None and before.version not in points:
            points[before.version] = before
        after = _test_point(report, "candidate", version_id)
        if after is not None:
            points.pop(version_id, None)  # a version promoted again (after a rollback) moves to the end
            points[version_id] = after
    return list(points.values())


def with_candidate(history: Sequence[HistoryPoint], report: Mapping[str, Any]) -> list[HistoryPoint]:
    """The history plus the report's candidate as the last point (its champion too, when the history is
    empty: the first cycle)."""
    out = list(history)
    if not out:
        first = _test_point(report, "champion", (report.get("champion") or {}).get("version"))
        out = [first] if first is not None else []
    candidate = _test_point(report, "candidate", (report.get("candidate") or {}).get("version"))
    if candidate is not None:
        out = [p for p in out if p.version != candidate.version] + [candidate.model_copy(update={"candidate": True})]
    return out


def history_chart(points: Sequence[HistoryPoint], max_types: int = 6) -> Markup | None:
    """Task success and the problem rates (the `max_types` that were ever highest) per version; None with
    fewer than two points, where a line says nothing."""
    if len(points) < 2:
        return None
    peak: dict[str, float] = {}
    for point in points:
        for name, rate in point.problem_rates.items():
            peak[name] = max(peak.get(name, 0.0), rate)
    shown = [name for name, top in sorted(peak.items(), key=lambda kv: -kv[1]) if top > 0][:max_types]
    series = {"task success": [(float(i), p.task_success * 100) for i, p in enumerate(points)]}
    for name in shown:
        series[name] = [(float(i), p.problem_rates.get(name, 0.0) * 100) for i, p in enumerate(points)]
    names = ", ".join(f"{i} = {p.version}{' (candidate)' if p.candidate else ''}" for i, p in enumerate(points))
    return Markup(line_chart(series, "Fixed test set, champion after champion (%)", x_label=f"version: {names}", y_label="%"))


def _report(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a moved or unreadable report leaves a gap, not an error in someone else's report
    return document if isinstance(document, dict) else None


def _test_point(report: Mapping[str, Any], side: str, version: str | None) -> HistoryPoint | None:
    test = (report.get(f"{side}_metrics") or {}).get("test") or {}
    if not version or not test or not test.get("size"):
        return None
    return HistoryPoint(
        version=version,
        task_success=float(test["task_success"]["rate"]),
        problem_rates={name: float(rate["rate"]) for name, rate in (test.get("problem_rates") or {}).items()},
    )
