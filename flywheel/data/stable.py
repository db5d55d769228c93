"""Stable production answers: what the model already gets right, as far as the logs can tell.

"Stable" means: the answer passes the rule judge, and its interaction is caught by no capture rule
switched on in settings.rules (flywheel.data.rules: no thumbs-down, escalation, repeated follow-ups,
QA Risk/Reject or complaint, as far as those rules are on) and was not captured as a failure. Two
stages read them: snapshots mix them in as the lowest replay tier (flywheel.trainer.replay), and the
offline corrector takes the usual reply of an intent from them when there is no knowledge base
(flywheel.data.replies). One definition for both.
"""

from __future__ import annotations

from collections.abc import Sequence

from flywheel.data.rules import matched_rules
from flywheel.evals.rule_judge import RuleJudge
from flywheel.records import Interaction
from flywheel.settings import Settings
from flywheel.store import capture as capture_repo
from flywheel.store.db import Store


def stable_answers(
    store: Store, settings: Settings, limit: int, *, version: str | None = None, intents: Sequence[str] | None = None
) -> list[Interaction]:
    """Up to `limit` stable interactions (of `version`, of `intents`, if given): thumbs-up first, then
    in id order, so the same store gives the same answers."""
    judge = RuleJudge(settings)
    out: list[Interaction] = []
    # Read a little more than asked: some rows fail the rule judge and are skipped.
    for item in capture_repo.quiet_interactions(store, settings.rules, limit * 2, version=version, intents=intents):
        answer = item.last_assistant()
        if answer is None or not (answer.content or "").strip() or judge.check(item, answer):
            continue
        if matched_rules(item, settings.rules):  # SQL's reading of the rules is the coarser one
            continue
        out.append(item)
        if len(out) >= limit:
            break
    return out
