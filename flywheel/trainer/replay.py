"""Replay rows from stable production traffic, for when the baseline tiers are still thin.

A new deployment has no baseline samples yet, but it has thousands of answers nobody complained about
(flywheel.data.stable says which). Mixing some of them into a snapshot keeps a fine-tune from
forgetting what already works. They enter as `candidate_baseline` rows, the lowest replay tier.
"""

from __future__ import annotations

from flywheel.context import Context
from flywheel.data.stable import stable_answers
from flywheel.records import SampleTier
from flywheel.trainer.dataset import PRODUCTION_REPLAY_PREFIX, ReplayRow


def stable_production_rows(ctx: Context, limit: int, *, version: str | None = None) -> list[ReplayRow]:
    """Up to `limit` replay rows from stable interactions (of `version` if given)."""
    rows: list[ReplayRow] = []
    for item in stable_answers(ctx.store, ctx.settings, limit, version=version):
        answer = item.last_assistant()
        assert answer is not None  # stable_answers keeps only interactions with an answer
        rows.append(ReplayRow(messages=item.prompt_messages() + [answer], tier=SampleTier.CANDIDATE, intent=item.intent, id=f"{PRODUCTION_REPLAY_PREFIX}{item.id}"))
    return rows
