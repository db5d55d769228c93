"""Corrections: a better answer for every judged failure, verified before anything may train on it.

Two correctors, chosen by whether an LLM endpoint is configured:

* offline, the knowledge-base corrector: the approved response for the failure's intent (a human
  label's intent wins over the logged one), with the policies for that intent cited. Where the KB has
  none (or there is no KB), the best verified reply the project knows for that intent: answers people
  wrote in labels, the usual stable production reply, earlier verified corrections
  (flywheel.data.replies; generator "reply:<source>"). It never invents: nothing verified for the
  intent makes the failure `uncorrectable`, with the reason stored.
* with an endpoint, the LLM corrector (prompts/corrector.md): the conversation (as untrusted data), the
  verdict, knowledge-base sections and similar failures already corrected and verified, retrieved from
  the index. Calls run through the shared bounded runner (llm.max_in_flight at once).

A human label that carries an answer is used as the correction itself (generator "label:<name>").

Every correction is verified (flywheel.data.verify) and stored either way: failed ones stay with their
reasons (status `corrected`), passed ones make the failure `verified` and go into the "corrections"
collection so that later corrections can retrieve them as examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from flywheel.context import Context
from flywheel.data.labels import latest_labels
from flywheel.data.replies import ReplyBook, adapt, build_reply_book
from flywheel.data.verify import Verifier
from flywheel.errors import NotFoundError
from flywheel.records import Correction, Failure, FailureStatus, Interaction, Message, Record, Reference, Verdict, Verification
from flywheel.settings import Settings
from flywheel.store import failures as failure_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.vectors import CORRECTIONS, KB

if TYPE_CHECKING:
    import numpy as np

    from flywheel.store.vectors import Hit, VectorIndex

KB_GENERATOR = "kb"
REPLY_GENERATOR = "reply"  # "reply:<source>": the best verified reply for the intent (flywheel.data.replies)
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
                skipped.append(CorrectOutcome(failure_id=f.id, status="skipped", reasons=[f"status is {f.status}; only judged failures are corrected"]))
            found = [f for f in found if f.status in RETRYABLE]
        cases, no_verdict = _cases(conn, found)
    return cases, skipped + no_verdict


def _cases(conn: Connection, found: Sequence[Failure]) -> tuple[list[Case], list[CorrectOutcome]]:
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


# --- the knowledge-base corrector ---------------------------------------------------------------------------


def label_attempt(case: Case) -> Attempt | None:
    """A label with an answer: a person already wrote the correction."""
    if case.reference is not None and case.reference.answer:
        return Attempt(answer=case.reference.answer, generator=case.reference.source or "label")
    return None


def is_full_answer(text: str, settings: Settings) -> bool:
    """An approved response that must go out exactly as written: a JSON answer (or any answer when an
    output schema is set), to which an appended citation would break the format."""
    if settings.policies.output_schema:
        return True
    try:
        return isinstance(json.loads(text), (dict, list))
    except ValueError:
        return False


def _first_sentence(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    sentence = re.split(r"(?<=[.!?])\s", flat, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def nearest_by_intent(index: "VectorIndex", intents: Sequence[str], vectors: "np.ndarray", kind: str, k: int) -> list[list["Hit"]]:
    """For each row, the `k` KB entries of `kind` written for that row's intent nearest to its vector.
    One Chroma query per distinct intent, over vectors embedded once by the caller (kb.search embeds
    per call, which costs a model forward pass per failure)."""
    out: list[list["Hit"]] = [[] for _ in intents]
    rows_of: dict[str, list[int]] = {}
    for row, intent in enumerate(intents):
        rows_of.setdefault(intent, []).append(row)
    for intent, rows in rows_of.items():
        where = {"$and": [{"kind": kind}, {"intent": intent}]}
        for row, hits in zip(rows, index.query_embeddings(KB, vectors[rows], k=k, where=where)):
            out[row] = hits
    return out


def _compose(approved: "Hit", policies: Sequence["Hit"], settings: Settings) -> Attempt:
    text = approved.text.strip()
    context = [f"kb/{approved.id}"]
    if not is_full_answer(text, settings):
        for policy in policies:
            title = policy.metadata.get("title") or "policy"
            text += f"\n\nPlease note our policy ({title}): {_first_sentence(policy.text)}"
            context.append(f"kb/{policy.id}")
    return Attempt(answer=text, generator=KB_GENERATOR, context_ids=context)


def kb_attempts(index: "VectorIndex", settings: Settings, cases: Sequence[Case], policies_per_answer: int = 2, store: Store | None = None) -> list[Attempt]:
    """The KB corrector for many cases: for each, the approved response for its intent with the policies
    written for that intent cited; for a safety problem (over-promise, policy boundary) with none, the
    nearest general policy (one with no intent). Where the KB has no approved response for the intent,
    and `store` is given, the best verified reply the project knows for it (flywheel.data.replies).
    Never invents: nothing verified for the intent, no answer."""
    attempts: list[Attempt | None] = [label_attempt(case) for case in cases]
    for row, case in enumerate(cases):
        if attempts[row] is None and not case.intent:
            attempts[row] = Attempt(reason="the failure has no intent and no label names one, so no approved response can be looked up", generator=KB_GENERATOR)
    todo = [row for row, attempt in enumerate(attempts) if attempt is None]
    if todo:
        intents = [cases[row].intent or "" for row in todo]
        vectors = index.embedder.embed([cases[row].request or cases[row].intent or "" for row in todo])
        approved = nearest_by_intent(index, intents, vectors, "approved_response", 1)
        policies = nearest_by_intent(index, intents, vectors, "policy", policies_per_answer)
        safety = [n for n, row in enumerate(todo) if not policies[n] and approved[n] and settings.taxonomy.categories.get(cases[row].verdict.problem_type or "") == "safety"]
        if safety:
            for n, hits in zip(safety, index.query_embeddings(KB, vectors[safety], k=5, where={"kind": "policy"})):
                policies[n] = [h for h in hits if not h.metadata.get("intent")][:1]
        unanswered = sorted({intents[n] for n in range(len(todo)) if not approved[n]})
        book = build_reply_book(store, settings, unanswered) if store is not None and unanswered else None
        for n, row in enumerate(todo):
            if approved[n]:
                attempts[row] = _compose(approved[n][0], policies[n], settings)
            elif book is not None:
                attempts[row] = _from_reply_book(book, intents[n])
            else:
                attempts[row] = Attempt(reason=f"no approved response for intent {intents[n]!r} in the knowledge base", generator=KB_GENERATOR)
    return [a for a in attempts if a is not None]


def _from_reply_book(book: ReplyBook, intent: str) -> Attempt:
    reply = book.for_intent(intent)
    if reply is None:
        return Attempt(reason=book.why_missing(intent), generator=KB_GENERATOR)
    return Attempt(answer=adapt(reply.text, intent), generator=f"{REPLY_GENERATOR}:{reply.source}", context_ids=reply.context_ids)


def kb_attempt(index: "VectorIndex", settings: Settings, case: Case) -> Attempt:
    """`kb_attempts` for one case."""
    return kb_attempts(index, settings, [case])[0]


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


def index_corrections(index: "VectorIndex", items: Sequence[tuple[Case, str]]) -> int:
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


def reindex_verified(ctx: Context) -> int:
    """Rebuild the "corrections" collection from the store: every verified failure's newest verified
    correction. For an index that was lost or moved; `correct_failures` keeps it current otherwise."""
    items: list[tuple[Case, str]] = []
    with ctx.store.engine.connect() as conn:
        cases, _ = _cases(conn, failure_repo.get_failures(conn, status=FailureStatus.VERIFIED))
        for case in cases:
            correction = failure_repo.latest_correction(conn, case.failure.id, verified_only=True)
            if correction is not None:
                items.append((case, correction.answer))
    return index_corrections(ctx.index, items)


# --- the stage ----------------------------------------------------------------------------------------------


def correct_failures(ctx: Context, failure_ids: list[str] | None = None) -> CorrectSummary:
    """Write and verify a correction for every `judged` failure (or the given ids).

    Offline: the knowledge-base corrector and the rule verifier. With `llm.base_url`: the LLM corrector
    and the rule + LLM verifier, concurrently through the shared runner.
    """
    settings = ctx.settings
    cases, skipped = load_cases(ctx.store, failure_ids)
    if settings.llm.enabled:
        from flywheel.data.llm_correct import correct_with_llm

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


__all__ = [
    "Attempt",
    "Case",
    "CorrectOutcome",
    "CorrectSummary",
    "correct_failures",
    "index_corrections",
    "kb_attempt",
    "kb_attempts",
    "nearest_by_intent",
    "load_cases",
    "reindex_verified",
]
