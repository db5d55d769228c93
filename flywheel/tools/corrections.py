"""Tool: write and verify corrections for judged failures (flywheel.correct, as `flywheel correct`)."""

from __future__ import annotations

from flywheel.correct.cases import CorrectOutcome
from flywheel.correct.stage import correct_failures
from flywheel.records import Record
from flywheel.tools.base import ToolContext, ToolSpec, report_progress

SHOWN_OUTCOMES = 20  # per-failure outcomes shown to the model; the counts cover all of them


class CorrectionsResult(Record):
    corrector: str
    considered: int
    verified: int
    corrected: int  # written but failed verification
    uncorrectable: int
    skipped: int
    errors: int  # endpoint failures: those failures stay judged for the next run
    outcomes: list[CorrectOutcome] = []


def generate_corrections(ctx: ToolContext, failure_ids: list[str] | None = None) -> CorrectionsResult:
    """Write a better answer for every judged failure (or exactly the given ones) and verify it; only verified corrections are trained on.

    Args:
        failure_ids: correct exactly these failures instead of every judged one.
    """
    report_progress(ctx, "writing and verifying corrections")
    summary = correct_failures(ctx, failure_ids=failure_ids)
    return CorrectionsResult(
        corrector=summary.corrector,
        considered=summary.considered,
        verified=summary.verified,
        corrected=summary.corrected,
        uncorrectable=summary.uncorrectable,
        skipped=summary.skipped,
        errors=summary.errors,
        outcomes=summary.outcomes[:SHOWN_OUTCOMES],
    )


SPECS = [ToolSpec(generate_corrections, mutates=True)]
