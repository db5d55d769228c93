"""Feedback on served answers: `POST /v1/feedback` -> the interaction's signals + a feedback_events row.

    {"interaction_id": "chatcmpl-...", "kind": "thumbs_down"}      (or "down": the log format's word)
    {"interaction_id": "chatcmpl-...", "kind": "qa_verdict", "value": "Reject"}
    {"interaction_id": "chatcmpl-...", "kind": "complaint", "value": "it promised me a refund"}

The interaction id is the completion id the gateway returned (also in the `x-flywheel-interaction-id`
header). Each kind sets the signal the capture rules (flywheel.data.triage) read (the mapping is
flywheel.store.feedback.signal_update, which the store's sweep applies too):

    thumbs_up / thumbs_down   signals.feedback = "up" / "down"; "up" / "down" are accepted as these kinds
    escalation                signals.escalated_to_human = value (default true)
    followup                  signals.followups += value (default 1)
    qa_verdict                signals.qa_verdict = value: Accept | Risk | Reject
    complaint                 signals.complaint = value (default "complaint"), PII-scrubbed as in ingest

Feedback travels through the capture writer (flywheel.serve.capture) like the interactions do, so a slow
store never slows the caller, and it may reach the store before its interaction does (the interaction
sat in a spill file or another gateway's queue): `insert_and_apply` then applies the early events when it
inserts the interaction, and the sweep (`flywheel.store.feedback.sweep`, run by triage and now and then by
the writer) applies any that a concurrent insert missed. Each event is applied exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection

from flywheel.data.pii import Scrubber
from flywheel.records import utcnow
from flywheel.serve.protocol import ApiError
from flywheel.store import feedback as feedback_repo
from flywheel.store.db import Store
from flywheel.store.interactions import insert_ignore

KINDS = ("thumbs_up", "thumbs_down", "escalation", "followup", "qa_verdict", "complaint")
# Logs say `"feedback": "up" | "down"` (docs/ingest.md), so clients built on that vocabulary send it here
# too. Both are accepted and stored as the canonical kind: feedback_events holds one vocabulary.
ALIASES = {"up": "thumbs_up", "down": "thumbs_down"}
QA_VERDICTS = ("Accept", "Risk", "Reject")
MAX_FOLLOWUPS_PER_EVENT = 100
SWEEP_S = 30.0  # how often a gateway's writer sweeps (Sweeper)

log = logging.getLogger("flywheel.serve")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    interaction_id: str = Field(min_length=1, max_length=200)
    kind: str
    value: Any = None


@dataclass(slots=True)
class FeedbackItem:
    """One validated feedback event on its way to the store."""

    interaction_id: str
    kind: str
    value: Any
    client: str | None
    created_at: datetime = field(default_factory=utcnow)


def normalise(request: FeedbackRequest, client: str | None, max_chars: int) -> FeedbackItem:
    """The event with its value checked and normalised, or a 400 naming what is wrong."""
    kind, value = ALIASES.get(request.kind, request.kind), request.value
    if kind not in KINDS:
        raise ApiError(
            400,
            f"Invalid value for 'kind': {request.kind[:50]!r} is not one of {', '.join((*KINDS, *ALIASES))}",
            param="kind",
            code="invalid_value",
        )
    if kind in ("thumbs_up", "thumbs_down"):
        if value is not None:
            raise ApiError(400, f"'{request.kind}' takes no value", param="value", code="invalid_value")
    elif kind == "escalation":
        if value is None:
            value = True
        if not isinstance(value, bool):
            raise ApiError(400, "'escalation' value must be true or false", param="value", code="invalid_value")
    elif kind == "followup":
        if value is None:
            value = 1
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_FOLLOWUPS_PER_EVENT:
            raise ApiError(
                400,
                f"'followup' value must be a whole number of follow-ups from 1 to {MAX_FOLLOWUPS_PER_EVENT}",
                param="value",
                code="invalid_value",
            )
    elif kind == "qa_verdict":
        verdict = value.strip().capitalize() if isinstance(value, str) else None
        if verdict not in QA_VERDICTS:
            raise ApiError(
                400, f"'qa_verdict' value must be one of {', '.join(QA_VERDICTS)}, got {value!r}"[:200], param="value", code="invalid_value"
            )
        value = verdict
    elif kind == "complaint":
        if value is None:
            value = "complaint"  # a bare flag: the capture rule needs a non-empty text
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise ApiError(400, "'complaint' value must be a non-empty text without NUL characters", param="value", code="invalid_value")
        if len(value) > max_chars:
            raise ApiError(
                400,
                f"'complaint' value is {len(value)} characters, over policies.max_message_chars ({max_chars})",
                param="value",
                code="invalid_value",
            )
        value = Scrubber().text(value)  # the complaint is stored: scrubbed like everything ingest stores
    return FeedbackItem(interaction_id=request.interaction_id, kind=kind, value=value, client=client)


def record(conn: Connection, items: Sequence[FeedbackItem]) -> int:
    """Store the events and apply each to its interaction, in order. Returns how many found their interaction
    (the others wait in feedback_events, unapplied, for whoever stores the interaction)."""
    return sum(feedback_repo.record_event(conn, item.interaction_id, item.kind, item.value, item.client, item.created_at) for item in items)


def insert_and_apply(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert interaction rows, then apply the waiting events of the ones this call inserted. Returns how many
    rows were new.

    Only of those: two gateways on one PostgreSQL may insert the same interaction at once (a spill replayed
    by both); the second insert waits for the first and then skips the row. Each event is claimed before it
    is applied (flywheel.store.feedback), so even a second claimant would apply nothing twice."""
    inserted: set[str] = set()
    count = insert_ignore(conn, rows, inserted)
    feedback_repo.apply_for_inserted(conn, sorted(inserted))
    return count


class Sweeper:
    """The capture writer's sweep (flywheel.store.feedback.sweep), run at most every `every_s`: it applies the
    events a concurrent insert by another gateway sharing the store missed. The first call runs it, so events
    another gateway left waiting are applied when this one starts."""

    def __init__(self, store: Store, every_s: float = SWEEP_S):
        self.store = store
        self.every_s = every_s
        self.applied = 0
        self._next = 0.0

    def maybe_run(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        try:
            self.applied += feedback_repo.sweep(self.store)
        except Exception as exc:  # a store failing here fails the writer's next write too: that one spills and backs off
            log.warning(
                "capture: applying waiting feedback failed (%s); trying again in %.0f s", str(exc).splitlines()[0][:200], self.every_s
            )
