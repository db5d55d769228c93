"""Tier moves and the queries sample graduation asks: reads.

The SQL behind flywheel.release.graduation. A move itself is written by flywheel.store.failures.move_tier
(it updates the failure and records the move together); this module reads the moves back, by the
version that caused them and the prefix their reason starts with, which is what makes each graduation
step idempotent and a rollback reversible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Connection, func, select

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


def tier_counts(conn: Connection) -> dict[str, int]:
    """Samples per tier (every tier present, 0 when empty), leaving out duplicates and non-failures."""
    counts = {str(tier): 0 for tier in SampleTier}
    rows = conn.execute(
        select(failures.c.tier, func.count())
        .where(failures.c.status.not_in([str(FailureStatus.DUPLICATE), str(FailureStatus.NOT_FAILURE)]))
        .group_by(failures.c.tier)
    )
    for tier, count in rows:
        counts[str(tier)] = int(count)
    return counts


def entered_tier_at(conn: Connection, failure_ids: Sequence[str]) -> dict[str, datetime]:
    """When each sample last changed into the tier it is in now (samples that never moved are absent)."""
    out: dict[str, datetime] = {}
    for start in range(0, len(failure_ids), 500):
        chunk = list(failure_ids[start : start + 500])
        rows = conn.execute(
            select(tier_moves.c.failure_id, func.max(tier_moves.c.created_at))
            .join(failures, failures.c.id == tier_moves.c.failure_id)
            .where(
                tier_moves.c.failure_id.in_(chunk), tier_moves.c.to_tier == failures.c.tier, tier_moves.c.from_tier != tier_moves.c.to_tier
            )
            .group_by(tier_moves.c.failure_id)
        )
        out.update({failure_id: at for failure_id, at in rows})
    return out


def recurrences(conn: Connection, sample_ids: Sequence[str], served_by: Sequence[str]) -> dict[str, int]:
    """sample id -> failures in the sample's cluster (triage's near-duplicates of it, or its own cluster
    representative's members) whose interaction one of the `served_by` versions answered. A sample whose
    mistake came back on real traffic is not stable, whatever the eval says."""
    found = {i: 0 for i in sample_ids}
    if not sample_ids or not served_by:
        return found
    samples = {
        row.id: row.cluster_id or row.id
        for row in conn.execute(select(failures.c.id, failures.c.cluster_id).where(failures.c.id.in_(list(sample_ids))))
    }
    by_cluster: dict[str, list[str]] = {}
    for sample_id, cluster in samples.items():
        by_cluster.setdefault(cluster, []).append(sample_id)
    clusters = list(by_cluster)
    for start in range(0, len(clusters), 500):
        chunk = clusters[start : start + 500]
        rows = conn.execute(
            select(failures.c.id, func.coalesce(failures.c.cluster_id, failures.c.id).label("cluster")).where(
                func.coalesce(failures.c.cluster_id, failures.c.id).in_(chunk),
                failures.c.first_seen_version.in_(list(served_by)),
                failures.c.status != str(FailureStatus.NOT_FAILURE),
            )
        )
        for failure_id, cluster in rows:
            for sample_id in by_cluster.get(cluster, []):
                if failure_id != sample_id:
                    found[sample_id] += 1
    return found
