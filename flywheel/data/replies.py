"""The best verified reply per intent, from what the project knows without a knowledge base.

A label that names the right intent but gives no answer still needs a training target. The offline
corrector (flywheel.correct) asks the knowledge base first; where it has no approved response for
the intent (or there is no knowledge base at all), it asks the `ReplyBook`, which looks, in order, at:

1. `label`       answers people wrote in labels for that intent that passed verification;
2. `production`  the usual reply of stable production answers logged for that intent
                 (flywheel.data.stable): the reply most of them give, when at least
                 `correct.reply_min_support` of them give exactly it. Free-text replies written for one
                 conversation rarely repeat, so they never become another conversation's target.
3. `correction`  other verified corrections for that intent (earlier KB or LLM corrections).

The reply is adapted to the failure: when it is a JSON object with an "intent" field (the project's
structured output convention, also what the rule judge reads), that field is set to the labelled
intent. The source and the rows it came from are recorded on the correction (generator
"reply:<source>", context ids), so a training row can always be traced to what it was built from.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flywheel.data.labels import latest_labels
from flywheel.data.stable import stable_answers
from flywheel.records import Record
from flywheel.settings import Settings
from flywheel.store import failures as failure_repo
from flywheel.store.db import Store

SOURCES = ("label", "production", "correction")
# Enough stable answers per intent to find the usual reply, without reading a whole large store.
STABLE_PER_INTENT = 200


class Reply(Record):
    text: str
    source: str  # one of SOURCES
    support: int  # how many rows give exactly this reply
    context_ids: list[str] = []  # "interaction/<id>" or "correction/<failure id>", a few of them


@dataclass
class ReplyBook:
    replies: dict[str, Reply] = field(default_factory=dict)
    # why an intent has no reply, for the uncorrectable reason
    missing: dict[str, str] = field(default_factory=dict)

    def for_intent(self, intent: str) -> Reply | None:
        return self.replies.get(intent)

    def why_missing(self, intent: str) -> str:
        return self.missing.get(
            intent, f"no approved response for intent {intent!r} in the knowledge base, and no verified reply for it elsewhere"
        )


def build_reply_book(store: Store, settings: Settings, intents: Iterable[str]) -> ReplyBook:
    """The best reply of each of `intents` (see the module's docstring for the order)."""
    wanted = sorted({i for i in intents if i})
    book = ReplyBook()
    if not wanted:
        return book
    by_label, by_other = _verified_corrections(store, wanted)
    usual, counts = _usual_production_replies(store, settings, wanted)
    for intent in wanted:
        if by_label.get(intent):
            book.replies[intent] = _most_common(by_label[intent], "label")
        elif intent in usual:
            book.replies[intent] = usual[intent]
        elif by_other.get(intent):
            book.replies[intent] = _most_common(by_other[intent], "correction")
        else:
            seen = counts.get(intent, 0)
            book.missing[intent] = (
                f"no approved response for intent {intent!r} in the knowledge base, and no verified reply for it elsewhere: no verified correction, "
                + (
                    f"and its {seen} stable production answer(s) do not agree on one reply (at least {settings.correct.reply_min_support} must)"
                    if seen
                    else "no stable production answer"
                )
                + "; give the answer in the label or add it to the knowledge base"
            )
    return book


def adapt(reply: str, intent: str) -> str:
    """The reply for `intent`: a JSON object's "intent" field is set to it; any other text is kept."""
    try:
        data = json.loads(reply)
    except ValueError:
        return reply
    if isinstance(data, dict) and "intent" in data and data["intent"] != intent:
        data["intent"] = intent
        return json.dumps(data, ensure_ascii=False)
    return reply


# --- the sources --------------------------------------------------------------------------------------------


def _verified_corrections(
    store: Store, intents: Sequence[str]
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
    """Verified correction answers per intent: (written in a person's label, every other generator),
    each a list of (answer, failure id). A failure's intent is its newest label's, else its own."""
    wanted = set(intents)
    by_label: dict[str, list[tuple[str, str]]] = {}
    by_other: dict[str, list[tuple[str, str]]] = {}
    with store.engine.connect() as conn:
        rows = failure_repo.verified_answers(conn)
        labels = latest_labels(conn, sorted({r.failure_id for r in rows}))
    for row in rows:
        label = labels.get(row.failure_id)
        intent = (label.intent if label is not None else None) or row.intent
        if intent not in wanted or not row.answer.strip():
            continue
        target = by_label if row.generator.startswith("label:") else by_other
        if row.generator.startswith("reply:"):
            continue  # built by this book: counting it again would make a reply vote for itself
        target.setdefault(intent, []).append((row.answer, row.failure_id))
    return by_label, by_other


def _usual_production_replies(store: Store, settings: Settings, intents: Sequence[str]) -> tuple[dict[str, Reply], dict[str, int]]:
    """The reply most stable answers of each intent give, if enough give exactly it; and how many
    stable answers each intent has."""
    answers: dict[str, list[tuple[str, str]]] = {}
    for item in stable_answers(store, settings, STABLE_PER_INTENT * len(intents), intents=intents):
        answer = item.last_assistant()
        if item.intent and answer is not None and answer.content and not answer.tool_calls:
            answers.setdefault(item.intent, []).append((answer.content.strip(), f"interaction/{item.id}"))
    usual: dict[str, Reply] = {}
    for intent, given in answers.items():
        reply = _most_common(given, "production", refs_are_ids=True)
        if reply.support >= settings.correct.reply_min_support:
            usual[intent] = reply
    return usual, {intent: len(given) for intent, given in answers.items()}


def _most_common(items: Sequence[tuple[str, str]], source: str, refs_are_ids: bool = False) -> Reply:
    """The text given most often (ties: the one seen first), with up to three of the rows giving it."""
    counts = Counter(text for text, _ in items)  # insertion-ordered: max() keeps the first of equals
    text, support = max(counts.items(), key=lambda kv: kv[1])
    refs = [ref if refs_are_ids else f"correction/{ref}" for t, ref in items if t == text][:3]
    return Reply(text=text, source=source, support=support, context_ids=refs)
