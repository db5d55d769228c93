"""Corrections: a better answer for every judged failure, verified before anything may train on it.

Two correctors, chosen by whether an LLM endpoint is configured:

* offline, the knowledge-base corrector (flywheel.correct.kb): the approved response for the
  failure's intent (a human label's intent wins over the logged one), with the policies for that
  intent cited. Where the KB has none (or there is no KB), the best verified reply the project knows
  for that intent: answers people wrote in labels, the usual stable production reply, earlier verified
  corrections (flywheel.data.replies; generator "reply:<source>"). It never invents: nothing verified
  for the intent makes the failure `uncorrectable`, with the reason stored.
* with an endpoint, the LLM corrector (flywheel.correct.llm, prompts/corrector.md): the conversation
  (as untrusted data), the verdict, knowledge-base sections and similar failures already corrected
  and verified, retrieved from the index. Calls run through the shared bounded runner
  (llm.max_in_flight at once).

A human label that carries an answer is used as the correction itself (generator "label:<name>").

Every correction is verified (flywheel.correct.verify) and stored either way (flywheel.correct.cases):
failed ones stay with their reasons (status `corrected`), passed ones make the failure `verified` and
go into the "corrections" collection so that later corrections can retrieve them as examples.
"""

from __future__ import annotations

from flywheel.context import Context
from flywheel.correct.cases import Case, CorrectSummary, cases_for, index_corrections, load_cases, save_attempt
from flywheel.correct.kb import KB_GENERATOR, kb_attempts
from flywheel.correct.llm import correct_with_llm
from flywheel.correct.verify import Verifier
from flywheel.records import FailureStatus
from flywheel.store import failures as failure_repo


def correct_failures(ctx: Context, failure_ids: list[str] | None = None) -> CorrectSummary:
    """Write and verify a correction for every `judged` failure (or the given ids).

    Offline: the knowledge-base corrector and the rule verifier. With `llm.base_url`: the LLM corrector
    and the rule + LLM verifier, concurrently through the shared runner.
    """
    settings = ctx.settings
    cases, skipped = load_cases(ctx.store, failure_ids)
    if settings.llm.enabled:
        summary = correct_with_llm(ctx, cases)
    else:
        summary = CorrectSummary(corrector=KB_GENERATOR)
        verifier = Verifier(settings)
        verified: list[tuple[Case, str]] = []
        # ctx.index opens Chroma on first use: not at all when there is nothing to correct
        for case, attempt in zip(cases, kb_attempts(ctx.index, settings, cases, store=ctx.store) if cases else []):
            verification = verifier.verify_rules(case, attempt.answer) if attempt.answer is not None else None
            outcome = save_attempt(ctx.store, case, attempt, verification)
            summary.outcomes.append(outcome)
            if outcome.status == "verified":
                verified.append((case, attempt.answer or ""))
        summary.indexed = index_corrections(ctx.index, verified) if verified else 0
    summary.outcomes.extend(skipped)
    summary.considered = len(cases)
    for outcome in summary.outcomes:
        if outcome.status in ("verified", "corrected", "uncorrectable", "skipped"):
            setattr(summary, outcome.status, getattr(summary, outcome.status) + 1)
        elif outcome.status == "error":
            summary.errors += 1
    return summary


def reindex_verified(ctx: Context) -> int:
    """Rebuild the "corrections" collection from the store: every verified failure's newest verified
    correction. For an index that was lost or moved; `correct_failures` keeps it current otherwise."""
    items: list[tuple[Case, str]] = []
    with ctx.store.engine.connect() as conn:
        cases, _ = cases_for(conn, failure_repo.get_failures(conn, status=FailureStatus.VERIFIED))
        for case in cases:
            correction = failure_repo.latest_correction(conn, case.failure.id, verified_only=True)
            if correction is not None:
                items.append((case, correction.answer))
    return index_corrections(ctx.index, items)


__all__ = ["correct_failures", "reindex_verified"]
