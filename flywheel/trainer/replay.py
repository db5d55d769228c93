"""Replay rows: rows a snapshot mixes in besides the store's corrections, and where production ones come from.

A `ReplayRow` is a conversation ending with the answer to train on, with its tier; the caller supplies
them (`flywheel dataset build --extra`) or they come from stable production traffic, for when the
baseline tiers are still thin. A new deployment has no baseline samples yet, but it has thousands of
answers nobody complained about (flywheel.data.stable says which). Mixing some of them into a snapshot
keeps a fine-tune from forgetting what already works. They enter as `candidate_baseline` rows, the
lowest replay tier. flywheel.trainer.dataset builds the snapshot from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, ValidationError, model_validator

from flywheel.context import Context
from flywheel.data.stable import stable_answers
from flywheel.records import Message, Record, SampleTier, Severity

PRODUCTION_REPLAY_PREFIX = "replay-"  # ids of the rows stable_production_rows offers


class ReplayRow(Record):
    """A row supplied by the caller (e.g. a stable production sample) to mix in as replay.

    `messages` is the conversation ending with the assistant answer to train on; `rejected` is a worse
    answer to the same prompt, needed only for DPO snapshots.
    """

    messages: list[Message] = Field(min_length=2)
    tier: SampleTier
    intent: str | None = None
    problem_type: str | None = None
    severity: Severity | None = None
    weight: float = Field(1.0, ge=0)
    rejected: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _ends_with_answer(self) -> ReplayRow:
        last = self.messages[-1]
        if last.role != "assistant" or not (last.content or "").strip():
            raise ValueError("the last message must be the assistant answer to train on, with text")
        if not any(m.role == "user" for m in self.messages[:-1]):
            raise ValueError("no user message before the answer")
        return self


def parse_replay_rows(items: Sequence[ReplayRow | dict[str, Any]], where: Sequence[str] | None = None) -> tuple[list[ReplayRow], list[str]]:
    """Validate caller rows; a bad one becomes `"<where>: what is wrong"` and the rest are kept."""
    good: list[ReplayRow] = []
    errors: list[str] = []
    for index, item in enumerate(items):
        place = where[index] if where else f"extra_rows[{index}]"
        try:
            good.append(item if isinstance(item, ReplayRow) else ReplayRow.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            errors.append(f"{place}: {key + ': ' if key else ''}{err['msg']}")
    return good, errors


def stable_production_rows(ctx: Context, limit: int, *, version: str | None = None) -> list[ReplayRow]:
    """Up to `limit` replay rows from stable interactions (of `version` if given)."""
    rows: list[ReplayRow] = []
    for item in stable_answers(ctx.store, ctx.settings, limit, version=version):
        answer = item.last_assistant()
        assert answer is not None  # stable_answers keeps only interactions with an answer
        rows.append(
            ReplayRow(
                messages=item.prompt_messages() + [answer],
                tier=SampleTier.CANDIDATE,
                intent=item.intent,
                id=f"{PRODUCTION_REPLAY_PREFIX}{item.id}",
            )
        )
    return rows
