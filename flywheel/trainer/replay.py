"""Replay rows from stable production traffic, for when the baseline tiers are still thin.

A new deployment has no baseline samples yet, but it has thousands of answers nobody complained about.
Mixing some of them into a snapshot keeps a fine-tune from forgetting what already works. "Stable"
means: the answer passes the rule judge, and the interaction carries no negative signal (no thumbs-down,
escalation, repeated follow-ups, QA Risk/Reject or complaint) and was not captured as a failure. Answers
with a thumbs-up come first. They enter as `candidate_baseline` rows, the lowest replay tier.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select

from flywheel.context import Context
from flywheel.evals.rule_judge import RuleJudge
from flywheel.records import SampleTier
from flywheel.store.interactions import from_row
from flywheel.store.schema import failures, interactions
from flywheel.trainer.dataset import ReplayRow


def stable_production_rows(ctx: Context, limit: int, *, version: str | None = None) -> list[ReplayRow]:
    """Up to `limit` replay rows from interactions without negative signals (of `version` if given)."""
    settings = ctx.settings
    quiet = and_(
        or_(interactions.c.feedback.is_(None), interactions.c.feedback == "up"),
        interactions.c.escalated_to_human.is_(False),
        interactions.c.followups < settings.rules.followups_min,
        or_(interactions.c.qa_verdict.is_(None), interactions.c.qa_verdict == "Accept"),
        interactions.c.complaint.is_(None),
        ~interactions.c.id.in_(select(failures.c.interaction_id)),
    )
    query = select(interactions).where(quiet)
    if version is not None:
        query = query.where(interactions.c.model_version == version)
    # thumbs-up first, then a stable order so the same store gives the same rows
    query = query.order_by((interactions.c.feedback == "up").desc(), interactions.c.id).limit(limit * 2)
    judge = RuleJudge(settings)
    rows: list[ReplayRow] = []
    with ctx.store.engine.connect() as conn:
        for record in conn.execute(query):
            item = from_row(record)
            answer = item.last_assistant()
            if answer is None or not (answer.content or "").strip() or judge.check(item, answer):
                continue
            rows.append(ReplayRow(messages=item.prompt_messages() + [answer], tier=SampleTier.CANDIDATE, intent=item.intent, id=f"replay-{item.id}"))
            if len(rows) >= limit:
                break
    return rows
