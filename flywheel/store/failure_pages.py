"""Failure lists a page at a time, for the web console: fast with a hundred thousand failures.

flywheel.store.failures.list_failures joins every failure with its newest verdict through a grouped
subquery over all verdicts, which is fine for the CLI's one-off listing and too slow to render on every
page view. Here the order is the `ix_failures_risk` index (risk, highest first; id breaks ties), pages are
keyset-paged (`after` = the last row's (risk, id): no OFFSET to skip through), and the newest verdict
and the "verified" flag are looked up per row through the `failure_id` indexes, only for the rows a page
shows (or the rows a problem-type filter has to check).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, func, or_, select

from flywheel.records import FailureStatus, Record
from flywheel.store.db import Store
from flywheel.store.failures import FailureRow
from flywheel.store.schema import corrections, datasets, failures, verdicts


class PageFilter(Record):
    problem_type: str | None = None  # of the newest verdict
    intent: str | None = None
    rule: str | None = None
    version: str | None = None  # first_seen_version
    status: str | None = None  # None: every status but duplicate
    failure_id: str | None = None  # an exact id, or an id prefix ("f-12ab")


class Page(Record):
    rows: list[FailureRow]
    next_after: tuple[float, str] | None = None  # (risk, id) to pass as `after` for the next page


def _newest_verdict(column: str) -> Any:
    return (
        select(verdicts.c[column])
        .where(verdicts.c.failure_id == failures.c.id)
        .order_by(verdicts.c.id.desc())
        .limit(1)
        .correlate(failures)
        .scalar_subquery()
    )


RARE_TYPE = 5000  # a problem type with fewer verdicts than this is found through its verdicts, not the risk order


def failure_page(store: Store, flt: PageFilter, limit: int, after: tuple[float, str] | None = None) -> Page:
    """Up to `limit` failures matching `flt`, highest risk first, starting after the (risk, id) `after`.

    Two steps: the ids of the page (filters only; SQLite computes a query's columns for every row it sorts,
    so the per-row lookups wait for step two), then the page's rows with their newest verdict."""
    conds = [failures.c.status != str(FailureStatus.DUPLICATE) if flt.status is None else failures.c.status == flt.status]
    for column, value in (("intent", flt.intent), ("rule", flt.rule), ("first_seen_version", flt.version)):
        if value:
            conds.append(failures.c[column] == value)
    if flt.failure_id:
        conds.append(failures.c.id.startswith(flt.failure_id, autoescape=True))
    if after is not None:
        risk, last_id = after
        conds.append(or_(failures.c.risk < risk, and_(failures.c.risk == risk, failures.c.id > last_id)))
    with store.engine.connect() as conn:
        if flt.problem_type:
            conds.append(_newest_verdict("problem_type") == flt.problem_type)
            rare = conn.execute(select(func.count()).where(verdicts.c.problem_type == flt.problem_type)).scalar_one() < RARE_TYPE
            if rare:  # few candidates: start from the verdicts (ix_verdicts_problem_type) rather than walk the risk order
                conds.append(failures.c.id.in_(select(verdicts.c.failure_id).where(verdicts.c.problem_type == flt.problem_type)))
        keys = conn.execute(
            select(failures.c.id, failures.c.risk).where(and_(*conds)).order_by(failures.c.risk.desc(), failures.c.id).limit(limit + 1)
        ).fetchall()
        shown = [k.id for k in keys[:limit]]
        verified = exists().where(corrections.c.failure_id == failures.c.id, corrections.c.verified.is_(True))
        query = select(
            failures,
            _newest_verdict("problem_type").label("problem_type"),
            _newest_verdict("severity").label("severity"),
            _newest_verdict("acceptance").label("acceptance"),
            verified.label("ok"),
        ).where(failures.c.id.in_(shown))
        found = {r.id: r for r in conn.execute(query)} if shown else {}
    rows = [_row(found[i]) for i in shown if i in found]
    more = len(keys) > limit
    return Page(rows=rows, next_after=(float(keys[limit - 1].risk), keys[limit - 1].id) if more and limit else None)


def _row(row: Any) -> FailureRow:
    values = row._mapping
    return FailureRow.model_validate(
        {name: values[name] for name in FailureRow.model_fields if name in values} | {"verified": bool(row.ok)}
    )


def distinct_values(store: Store, column: str, limit: int = 500) -> list[str]:
    """The values a failure filter can take (intent, rule, first_seen_version), from the column's index."""
    if column not in ("intent", "rule", "first_seen_version"):
        raise ValueError(f"no filter on {column!r}")
    col = failures.c[column]
    with store.engine.connect() as conn:
        return [v for v in conn.execute(select(col).where(col.is_not(None)).distinct().order_by(col).limit(limit)).scalars()]


def snapshots_with(store: Store, failure_id: str) -> list[str]:
    """The dataset snapshots that hold the failure, newest first: by the manifest's `failure_ids` when it
    lists them, else by the snapshot's row files (each row names its `failure_id`)."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(datasets.c.id, datasets.c.path, datasets.c.manifest).order_by(datasets.c.created_at.desc())).fetchall()
    needle = json.dumps({"failure_id": failure_id})[1:-1]  # '"failure_id": "f-..."', as the rows are written
    compact = needle.replace('": "', '":"')
    found = []
    for row in rows:
        manifest = row.manifest if isinstance(row.manifest, dict) else {}
        listed = manifest.get("failure_ids")
        if isinstance(listed, list):
            if failure_id in listed:
                found.append(row.id)
            continue
        for entry in (manifest.get("files") or {}).values():
            path = Path(row.path) / str((entry or {}).get("name", ""))
            if path.suffix == ".jsonl" and path.is_file() and _holds(path, (needle, compact)):
                found.append(row.id)
                break
    return found


def _holds(path: Path, needles: tuple[str, ...]) -> bool:
    with path.open(encoding="utf-8") as handle:
        return any(any(n in line for n in needles) for line in handle)


def cluster_members(store: Store, cluster_id: str, limit: int = 20) -> Sequence[str]:
    """Ids of failures in a cluster (duplicates point at their representative), the representative first."""
    with store.engine.connect() as conn:
        query = select(failures.c.id).where(failures.c.cluster_id == cluster_id).order_by((failures.c.id != cluster_id), failures.c.id)
        return list(conn.execute(query.limit(limit)).scalars())
