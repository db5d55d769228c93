"""Interactions as the capture rules see them: candidates for triage, and quiet (stable) interactions.

The rules themselves are defined once, in flywheel.data.rules; this module only reads their conditions
as SQL over the `interactions` columns of the same names. Every test is NULL-safe (true or false, never
NULL), so negating the whole condition is exact: a quiet interaction is one no rule switched on catches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import ColumnElement, and_, exists, false, func, not_, or_, select, true

from flywheel.data.rules import AllOf, AnyOf, Condition, Test, rule_conditions
from flywheel.records import Interaction
from flywheel.settings_sections import RuleSettings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.schema import failures, interactions


def _sql(condition: Condition) -> ColumnElement[bool]:
    if isinstance(condition, AnyOf):
        return or_(false(), *(_sql(p) for p in condition.parts))
    if isinstance(condition, AllOf):
        return and_(true(), *(_sql(p) for p in condition.parts))
    assert isinstance(condition, Test)
    column = interactions.c[condition.signal]
    if condition.op == "equals":
        return and_(column.is_not(None), column == condition.value)
    if condition.op == "true":
        return column.is_(True)
    if condition.op == "at_least":
        return and_(column.is_not(None), column >= condition.value)
    if condition.op == "filled":
        return and_(column.is_not(None), func.trim(column) != "")
    if condition.op == "one_of_folded":
        return and_(column.is_not(None), func.lower(func.trim(column)).in_(sorted(condition.value)))
    raise ValueError(f"unknown test {condition.op!r}")


def caught(rules: RuleSettings) -> ColumnElement[bool]:
    """SQL true for an interaction some rule switched on may catch (never fewer than Python's
    `matched_rules` finds, barely more)."""
    return _sql(AnyOf(tuple(rule_conditions(rules).values())))


def iter_uncaptured_candidates(store: Store, rules: RuleSettings, batch: int) -> Iterator[Interaction]:
    """Interactions some rule may catch and no failure points to yet, in id order, `batch` per query."""
    not_captured = ~exists().where(failures.c.interaction_id == interactions.c.id)
    return interaction_repo.iter_all(store, batch=batch, where=and_(caught(rules), not_captured))


def quiet_interactions(
    store: Store, rules: RuleSettings, limit: int, *, version: str | None = None, intents: Sequence[str] | None = None
) -> list[Interaction]:
    """Up to `limit` interactions no rule switched on catches and no failure points to (of `version`, of
    `intents`, if given): thumbs-up first, then in id order."""
    query = select(interactions).where(not_(caught(rules)), ~interactions.c.id.in_(select(failures.c.interaction_id)))
    if version is not None:
        query = query.where(interactions.c.model_version == version)
    if intents is not None:
        query = query.where(interactions.c.intent.in_(list(intents)))
    # coalesce: on PostgreSQL a NULL comparison sorts first under DESC, which put rows with no feedback
    # ahead of thumbs-up ones there (SQLite sorts NULL last)
    thumbs_up = func.coalesce(interactions.c.feedback, "") == "up"
    query = query.order_by(thumbs_up.desc(), interactions.c.id).limit(limit)
    with store.engine.connect() as conn:
        return [interaction_repo.from_row(r) for r in conn.execute(query)]
