"""Tool: generate, score and keep training samples (flywheel.synthesis, as `flywheel synthesize`)."""

from __future__ import annotations

from flywheel.context import Context
from flywheel.records import Record
from flywheel.synthesis import stage
from flywheel.tools.base import ToolContext, ToolSpec, report_progress


class SynthesisResult(Record):
    generated: int
    kept: int
    new: int  # stored for the first time
    intents_short: int  # intents with fewer verified samples than synthesis.min_verified
    by_generator: dict[str, dict[str, object]]  # generated, kept, dropped per filter
    bad_inputs: int  # malformed templates, broken KB triples, LLM replies off schema: reported and skipped
    dry_run: bool
    seconds: float


def synthesize_samples(ctx: ToolContext, generators: list[str] | None = None, dry_run: bool = False) -> SynthesisResult:
    """Generate new training samples from verified ones, the knowledge base and captured traffic; score each and keep only the good ones for the next dataset.

    Args:
        generators: run only these (template, augment, mining, knowledge, toolcalls, llm); default: the configured ones.
        dry_run: score and count, store nothing.
    """
    report_progress(ctx, "generating and scoring training samples")
    summary = stage.synthesize(ctx, generators, dry_run=dry_run)
    return SynthesisResult(
        generated=summary.generated,
        kept=summary.kept,
        new=summary.new,
        intents_short=len(summary.wants),
        by_generator={name: c.model_dump(exclude={"seconds"}) for name, c in summary.generators.items()},
        bad_inputs=summary.problem_count,
        dry_run=dry_run,
        seconds=summary.seconds,
    )


def shortfall(ctx: Context) -> dict[str, int]:
    """Intents and problem types with fewer verified samples than synthesis.min_verified, and by how
    many: what the heuristic policy reads to decide whether synthesis is worth a step."""
    return stage.shortfall(ctx)


SPECS = [ToolSpec(synthesize_samples, mutates=True, facts=lambda r: {"synthesized": r.kept, "synthesis_seconds": r.seconds})]
