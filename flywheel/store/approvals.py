"""Stored approvals: a person's decision bound to one version and one eval report hash.

The SQL behind flywheel.release.approvals. At most one decision per (version, report hash): the table's
unique constraint says so, and the release code reads before it writes, under the release lock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from flywheel.release.records import Approval, DecisionKind
from flywheel.store.schema import approvals


def _from_row(row: Any) -> Approval:
    return Approval.model_validate(dict(row._mapping))


def approvals_for(conn: Connection, version: str) -> list[Approval]:
    """Every decision on `version`, oldest first."""
    rows = conn.execute(select(approvals).where(approvals.c.version == version).order_by(approvals.c.id)).fetchall()
    return [_from_row(r) for r in rows]


def all_approvals(conn: Connection) -> list[Approval]:
    return [_from_row(r) for r in conn.execute(select(approvals).order_by(approvals.c.id))]


def decision_on(conn: Connection, version: str, report_hash: str) -> Approval | None:
    """The decision on this version's report, None when nobody decided on it."""
    row = conn.execute(select(approvals).where(approvals.c.version == version, approvals.c.report_hash == report_hash)).first()
    return _from_row(row) if row is not None else None


def insert_approval(
    conn: Connection,
    *,
    version: str,
    report_hash: str,
    decision: DecisionKind,
    approver: str,
    channel: str,
    reason: str,
    run_id: str | None,
    created_at: datetime,
) -> Approval:
    new_id = conn.execute(
        approvals.insert()
        .values(
            version=version,
            report_hash=report_hash,
            decision=decision,
            approver=approver,
            channel=channel,
            reason=reason,
            run_id=run_id,
            created_at=created_at,
        )
        .returning(approvals.c.id)
    ).scalar_one()
    return _from_row(conn.execute(select(approvals).where(approvals.c.id == new_id)).one())
