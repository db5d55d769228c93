"""Tier moves and the queries sample graduation asks: reads.

The SQL behind flywheel.release.graduation. A move itself is written by flywheel.store.failures.move_tier
(it updates the failure and records the move together); this module reads the moves back, by the
version that caused them and the prefix their reason starts with, which is what makes each graduation
step idempotent and a rollback reversible.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, select

from flywheel.records import FailureStatus, Record, SampleTier
from flywheel.store.schema import failures, tier_moves


class TierMove(Record):
    failure_id: str
    from_tier: str
    to_tier: str
    weight: float | None = None
    version: str | None = None
    reason: str = ""


def problem_pool_ids(conn: Connection) -> list[str]:
    """Failures in the problem tier, leaving out duplicates and those judged not a failure."""
    return list(
        conn.execute(
            select(failures.c.id).where(
                failures.c.tier == str(SampleTier.PROBLEM),
                failures.c.status.not_in([str(FailureStatus.DUPLICATE), str(FailureStatus.NOT_FAILURE)]),
            )
        ).scalars()
    )


def moved_by(conn: Connection, version: str, prefix: str, failure_ids: Iterable[str] | None = None) -> set[str]:
    """The failures (of `failure_ids`, or any) with a move caused by `version` whose reason starts with `prefix`."""
    query = select(tier_moves.c.failure_id).where(tier_moves.c.version == version, tier_moves.c.reason.startswith(prefix))
    if failure_ids is not None:
        ids = list(failure_ids)
        if not ids:
            return set()
        query = query.where(tier_moves.c.failure_id.in_(ids))
    return set(conn.execute(query).scalars())


def tier_changes_by(conn: Connection, version: str, prefix: str) -> list[TierMove]:
    """The moves caused by `version`, reason starting with `prefix`, that changed a tier; oldest first."""
    rows = conn.execute(
        select(
            tier_moves.c.failure_id,
            tier_moves.c.from_tier,
            tier_moves.c.to_tier,
            tier_moves.c.weight,
            tier_moves.c.version,
            tier_moves.c.reason,
        )
        .where(tier_moves.c.version == version, tier_moves.c.reason.startswith(prefix), tier_moves.c.from_tier != tier_moves.c.to_tier)
        .order_by(tier_moves.c.id)
    ).fetchall()
    return [TierMove.model_validate(dict(r._mapping)) for r in rows]
