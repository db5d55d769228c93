"""Stable production answers: what the model already gets right, as far as the logs can tell.

"Stable" means: the answer passes the rule judge, and its interaction carries no negative signal (no
thumbs-down, escalation, repeated follow-ups, QA Risk/Reject or complaint) and was not captured as a
failure. Two stages read them: snapshots mix them in as the lowest replay tier
(flywheel.trainer.replay), and the offline corrector takes the usual reply of an intent from them
when there is no knowledge base (flywheel.data.replies). One definition for both.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, or_, select

from flywheel.evals.rule_judge import RuleJudge
from flywheel.records import Interaction
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.interactions import from_row
from flywheel.store.schema import failures, interactions


def stable_answers(
    store: Store,
    settings: Settings,
    limit: int,
    *,
    version: str | None = None,
    intents: Sequence[str] | None = None,
) -> list[Interaction]:
    """Up to `limit` stable interactions (of `version`, of `intents`, if given): thumbs-up first, then
    in id order, so the same store gives the same answers."""
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
    if intents is not None:
        query = query.where(interactions.c.intent.in_(list(intents)))
    # Read a little more than asked: some rows fail the rule judge and are skipped.
    query = query.order_by((interactions.c.feedback == "up").desc(), interactions.c.id).limit(limit * 2)
    judge = RuleJudge(settings)
    out: list[Interaction] = []
    with store.engine.connect() as conn:
        for record in conn.execute(query):
            item = from_row(record)
            answer = item.last_assistant()
            if answer is None or not (answer.content or "").strip() or judge.check(item, answer):
                continue
            out.append(item)
            if len(out) >= limit:
                break
    return out
