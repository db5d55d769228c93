"""The knowledge-base corrector: the offline one, which never invents.

For each failure, the approved response for its intent (a human label's intent wins over the logged
one), with the policies written for that intent cited; for a safety problem with none, the nearest
general policy. Where the KB has no approved response for the intent (or there is no KB), the best
verified reply the project knows for it: answers people wrote in labels, the usual stable production
reply, earlier verified corrections (flywheel.data.replies; generator "reply:<source>"). Nothing
verified for the intent: no answer, and the reason why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flywheel.correct.cases import Attempt, Case, label_attempt
from flywheel.data.replies import ReplyBook, adapt, build_reply_book
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.vectors import KB

if TYPE_CHECKING:
    import numpy as np

    from flywheel.store.vectors import Hit, VectorIndex

KB_GENERATOR = "kb"
REPLY_GENERATOR = "reply"  # "reply:<source>": the best verified reply for the intent (flywheel.data.replies)


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


def nearest_by_intent(index: VectorIndex, intents: Sequence[str], vectors: np.ndarray, kind: str, k: int) -> list[list[Hit]]:
    """For each row, the `k` KB entries of `kind` written for that row's intent nearest to its vector.
    One Chroma query per distinct intent, over vectors embedded once by the caller (kb.search embeds
    per call, which costs a model forward pass per failure)."""
    out: list[list[Hit]] = [[] for _ in intents]
    rows_of: dict[str, list[int]] = {}
    for row, intent in enumerate(intents):
        rows_of.setdefault(intent, []).append(row)
    for intent, rows in rows_of.items():
        where = {"$and": [{"kind": kind}, {"intent": intent}]}
        for row, hits in zip(rows, index.query_embeddings(KB, vectors[rows], k=k, where=where)):
            out[row] = hits
    return out


def _compose(approved: Hit, policies: Sequence[Hit], settings: Settings) -> Attempt:
    text = approved.text.strip()
    context = [f"kb/{approved.id}"]
    if not is_full_answer(text, settings):
        for policy in policies:
            title = policy.metadata.get("title") or "policy"
            text += f"\n\nPlease note our policy ({title}): {_first_sentence(policy.text)}"
            context.append(f"kb/{policy.id}")
    return Attempt(answer=text, generator=KB_GENERATOR, context_ids=context)


def kb_attempts(
    index: VectorIndex, settings: Settings, cases: Sequence[Case], policies_per_answer: int = 2, store: Store | None = None
) -> list[Attempt]:
    """The KB corrector for many cases: for each, the approved response for its intent with the policies
    written for that intent cited; for a safety problem (over-promise, policy boundary) with none, the
    nearest general policy (one with no intent). Where the KB has no approved response for the intent,
    and `store` is given, the best verified reply the project knows for it (flywheel.data.replies).
    Never invents: nothing verified for the intent, no answer."""
    attempts: list[Attempt | None] = [label_attempt(case) for case in cases]
    for row, case in enumerate(cases):
        if attempts[row] is None and not case.intent:
            attempts[row] = Attempt(
                reason="the failure has no intent and no label names one, so no approved response can be looked up", generator=KB_GENERATOR
            )
    todo = [row for row, attempt in enumerate(attempts) if attempt is None]
    if todo:
        intents = [cases[row].intent or "" for row in todo]
        vectors = index.embedder.embed([cases[row].request or cases[row].intent or "" for row in todo])
        approved = nearest_by_intent(index, intents, vectors, "approved_response", 1)
        policies = nearest_by_intent(index, intents, vectors, "policy", policies_per_answer)
        safety = [
            n
            for n, row in enumerate(todo)
            if not policies[n] and approved[n] and settings.taxonomy.categories.get(cases[row].verdict.problem_type or "") == "safety"
        ]
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
                attempts[row] = Attempt(
                    reason=f"no approved response for intent {intents[n]!r} in the knowledge base", generator=KB_GENERATOR
                )
    return [a for a in attempts if a is not None]


def _from_reply_book(book: ReplyBook, intent: str) -> Attempt:
    reply = book.for_intent(intent)
    if reply is None:
        return Attempt(reason=book.why_missing(intent), generator=KB_GENERATOR)
    return Attempt(answer=adapt(reply.text, intent), generator=f"{REPLY_GENERATOR}:{reply.source}", context_ids=reply.context_ids)


def kb_attempt(index: VectorIndex, settings: Settings, case: Case) -> Attempt:
    """`kb_attempts` for one case."""
    return kb_attempts(index, settings, [case])[0]


__all__ = ["KB_GENERATOR", "REPLY_GENERATOR", "is_full_answer", "kb_attempt", "kb_attempts", "nearest_by_intent"]
