"""The records the correction stage shares, and their storage.

`Case` is one failure to correct with everything the correctors and the verifier read; `Attempt` is
what a corrector produced for it. Here too: loading the failures to correct (`load_cases`), a label's
answer used as the correction itself (`label_attempt`, generator "label:<name>"), saving an attempt in
its own transaction and adding verified corrections to the "corrections" collection, from which later
corrections retrieve examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from flywheel.data.labels import latest_labels
from flywheel.errors import NotFoundError
from flywheel.records import Correction, Failure, FailureStatus, Interaction, Message, Record, Reference, Verdict, Verification
from flywheel.store import failures as failure_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.vectors import CORRECTIONS

if TYPE_CHECKING:
    from flywheel.store.vectors import VectorIndex

# With explicit ids, failures that already have a correction attempt may be tried again.
RETRYABLE = (FailureStatus.JUDGED, FailureStatus.CORRECTED, FailureStatus.UNCORRECTABLE)


class CorrectOutcome(Record):
    failure_id: str
    status: str  # verified | corrected | uncorrectable | skipped | error
    generator: str = ""
    reasons: list[str] = []


class CorrectSummary(Record):
    """What `correct_failures` did. `errors` are endpoint failures: those failures stay `judged` and the
    next run tries them again."""

    corrector: str  # "kb" or "llm:<model>"
    prompt_version: str = ""
    considered: int = 0
    verified: int = 0
    corrected: int = 0  # written but failed verification, kept with reasons
    uncorrectable: int = 0
    skipped: int = 0
    errors: int = 0
    indexed: int = 0  # verified corrections added to the "corrections" collection
    outcomes: list[CorrectOutcome] = []


@dataclass
class Case:
    """One failure to correct with everything the correctors and the verifier read."""

    failure: Failure
    interaction: Interaction
    verdict: Verdict
    reference: Reference | None = None

    @property
    def intent(self) -> str | None:
        if self.reference is not None and self.reference.intent:
            return self.reference.intent
        return self.failure.intent or self.interaction.intent

    @property
    def request(self) -> str:
        return self.interaction.last_user_text()

    @property
    def original(self) -> Message | None:
        return self.interaction.last_assistant()


class Attempt(Record):
    """What a corrector produced for one case: an answer, or the reason it could not write one."""

    answer: str | None = None
    reason: str = ""
    generator: str
    prompt_version: str = ""
    context_ids: list[str] = []


# --- loading ------------------------------------------------------------------------------------------------


def load_cases(store: Store, failure_ids: Sequence[str] | None = None) -> tuple[list[Case], list[CorrectOutcome]]:
    """The failures to correct: every `judged` one, or the given ids (unknown ids: NotFoundError).
    Returns the cases and an outcome for each given id that cannot be corrected now."""
    skipped: list[CorrectOutcome] = []
    with store.engine.connect() as conn:
        if failure_ids is None:
            found = failure_repo.get_failures(conn, status=FailureStatus.JUDGED)
        else:
            wanted = list(dict.fromkeys(failure_ids))
            found = failure_repo.get_failures(conn, ids=wanted)
            missing = sorted(set(wanted) - {f.id for f in found})
            if missing:
                raise NotFoundError(f"no failure with id {', '.join(repr(m) for m in missing)}")
            for f in [f for f in found if f.status not in RETRYABLE]:
                skipped.append(
                    CorrectOutcome(failure_id=f.id, status="skipped", reasons=[f"status is {f.status}; only judged failures are corrected"])
                )
            found = [f for f in found if f.status in RETRYABLE]
        cases, no_verdict = cases_for(conn, found)
    return cases, skipped + no_verdict


def cases_for(conn: Connection, found: Sequence[Failure]) -> tuple[list[Case], list[CorrectOutcome]]:
    """A Case for each failure with a verdict naming a problem type; a `skipped` outcome for the rest."""
    interactions = interaction_repo.get_many(conn, [f.interaction_id for f in found])
    references = latest_labels(conn, [f.id for f in found])
    cases: list[Case] = []
    skipped: list[CorrectOutcome] = []
    for f in found:
        verdict = failure_repo.latest_verdict(conn, f.id)
        if verdict is None or not verdict.is_failure or not verdict.problem_type:
            skipped.append(CorrectOutcome(failure_id=f.id, status="skipped", reasons=["no verdict naming a problem type"]))
            continue
        cases.append(Case(failure=f, interaction=interactions[f.interaction_id], verdict=verdict, reference=references.get(f.id)))
    return cases, skipped


def label_attempt(case: Case) -> Attempt | None:
    """A label with an answer: a person already wrote the correction."""
    if case.reference is not None and case.reference.answer:
        return Attempt(answer=case.reference.answer, generator=case.reference.source or "label")
    return None


# --- saving -------------------------------------------------------------------------------------------------


def save_attempt(store: Store, case: Case, attempt: Attempt, verification: Verification | None) -> CorrectOutcome:
    """Store one attempt in its own transaction: a crash loses at most the one in flight."""
    with store.begin() as conn:
        if attempt.answer is None:
            failure_repo.save_uncorrectable(conn, case.failure.id, attempt.generator, attempt.reason, attempt.prompt_version)
            return CorrectOutcome(failure_id=case.failure.id, status="uncorrectable", generator=attempt.generator, reasons=[attempt.reason])
        assert verification is not None, "an answer is always verified before it is saved"
        correction = Correction(
            failure_id=case.failure.id,
            answer=attempt.answer,
            generator=attempt.generator,
            prompt_version=attempt.prompt_version,
            context_ids=attempt.context_ids,
            verification=verification,
        )
        failure_repo.save_correction(conn, correction)
    status = "verified" if verification.passed else "corrected"
    return CorrectOutcome(failure_id=case.failure.id, status=status, generator=attempt.generator, reasons=verification.reasons)


def correction_text(request: str, answer: str) -> str:
    """What the "corrections" collection embeds: the request (what similar failures share) and the answer."""
    return f"{request}\n{answer}"


def index_corrections(index: VectorIndex, items: Sequence[tuple[Case, str]]) -> int:
    """Add verified corrections to the "corrections" collection (upsert by failure id: idempotent)."""
    if not items:
        return 0
    index.upsert(
        CORRECTIONS,
        [case.failure.id for case, _ in items],
        [correction_text(case.request, answer) for case, answer in items],
        [{"failure_id": case.failure.id, "problem_type": case.verdict.problem_type, "intent": case.intent} for case, _ in items],
    )
    return len(items)


__all__ = [
    "RETRYABLE",
    "Attempt",
    "Case",
    "CorrectOutcome",
    "CorrectSummary",
    "cases_for",
    "correction_text",
    "index_corrections",
    "label_attempt",
    "load_cases",
    "save_attempt",
]
