"""Failures, their verdicts, corrections and tier moves: reads and writes.

These are the functions behind `flywheel failures` and the agent's failure tools; nothing else queries
the failure tables directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from flywheel.errors import NotFoundError
from flywheel.records import Correction, Failure, FailureStatus, FailureView, Record, SampleTier, Verdict, Verification, stable_hash, utcnow
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.schema import corrections, failures, labels, tier_moves, verdicts


def failure_id_for(interaction_id: str) -> str:
    return "f-" + stable_hash(interaction_id, 12)


# --- conversions ------------------------------------------------------------------------------------------


def failure_to_row(item: Failure) -> dict[str, Any]:
    row = item.model_dump()
    row["status"] = str(item.status)
    row["tier"] = str(item.tier)
    row["updated_at"] = utcnow()
    return row


def failure_from_row(row: Any) -> Failure:
    m = dict(row._mapping)
    m.pop("updated_at", None)
    return Failure.model_validate(m)


def verdict_from_row(row: Any) -> Verdict:
    m = dict(row._mapping)
    m.pop("id", None)
    return Verdict.model_validate(m)


def correction_from_row(row: Any) -> Correction:
    m = dict(row._mapping)
    m.pop("id", None)
    m.pop("verified", None)
    ver = m.pop("verification", None)
    return Correction(**m, verification=Verification.model_validate(ver) if ver else None)


# --- writes -----------------------------------------------------------------------------------------------


def insert_failures(conn: Connection, items: Sequence[Failure]) -> int:
    """Store new failures; one interaction yields at most one failure, so re-running triage adds nothing."""
    if not items:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(failures).on_conflict_do_nothing().returning(failures.c.id)
    return len(conn.execute(stmt, [failure_to_row(f) for f in items]).fetchall())


def set_status(conn: Connection, failure_ids: Sequence[str], status: FailureStatus) -> None:
    for start in range(0, len(failure_ids), 500):
        chunk = list(failure_ids[start : start + 500])
        conn.execute(update(failures).where(failures.c.id.in_(chunk)).values(status=str(status), updated_at=utcnow()))


def set_cluster(conn: Connection, failure_id: str, cluster_id: str, cluster_size: int, status: FailureStatus | None = None) -> None:
    values: dict[str, Any] = {"cluster_id": cluster_id, "cluster_size": cluster_size, "updated_at": utcnow()}
    if status is not None:
        values["status"] = str(status)
    conn.execute(update(failures).where(failures.c.id == failure_id).values(**values))


def save_verdict(conn: Connection, verdict: Verdict) -> None:
    """Store a verdict and move its failure to judged / not_failure / unjudged."""
    row = verdict.model_dump()
    conn.execute(verdicts.insert().values(**row))
    if verdict.status == "unjudged":
        status = FailureStatus.UNJUDGED
    elif verdict.is_failure:
        status = FailureStatus.JUDGED
    else:
        status = FailureStatus.NOT_FAILURE
    set_status(conn, [verdict.failure_id], status)


def save_correction(conn: Connection, correction: Correction) -> None:
    """Store a correction; its failure becomes verified, or corrected (kept, with reasons) if it failed."""
    row = correction.model_dump(exclude={"verification"})
    row["verified"] = correction.verified
    row["verification"] = correction.verification.model_dump() if correction.verification else None
    conn.execute(corrections.insert().values(**row))
    set_status(conn, [correction.failure_id], FailureStatus.VERIFIED if correction.verified else FailureStatus.CORRECTED)


def save_uncorrectable(conn: Connection, failure_id: str, generator: str, reason: str, prompt_version: str = "") -> None:
    """Record that no corrector could write an answer, and why; the failure becomes uncorrectable.

    The attempt is a corrections row with an empty answer and a failed verification holding the reason,
    so `show` and the history say which generator gave up. It is never verified, so nothing trains on it.
    """
    verification = Verification(passed=False, reasons=[reason], verifier=generator)
    conn.execute(
        corrections.insert().values(
            failure_id=failure_id,
            answer="",
            generator=generator,
            prompt_version=prompt_version,
            context_ids=[],
            verified=False,
            verification=verification.model_dump(),
            created_at=utcnow(),
        )
    )
    set_status(conn, [failure_id], FailureStatus.UNCORRECTABLE)


def move_tier(
    conn: Connection,
    failure_id: str,
    to_tier: SampleTier,
    actor: str,
    reason: str = "",
    version: str | None = None,
    weight: float | None = None,
) -> None:
    """Move a sample between tiers and record the move."""
    current = conn.execute(select(failures.c.tier, failures.c.weight).where(failures.c.id == failure_id)).first()
    if current is None:
        raise NotFoundError(f"no failure {failure_id}")
    values: dict[str, Any] = {"tier": str(to_tier), "updated_at": utcnow()}
    if weight is not None:
        values["weight"] = weight
    conn.execute(update(failures).where(failures.c.id == failure_id).values(**values))
    conn.execute(
        tier_moves.insert().values(
            failure_id=failure_id,
            from_tier=current.tier,
            to_tier=str(to_tier),
            weight=weight,
            version=version,
            actor=actor,
            reason=reason,
            created_at=utcnow(),
        )
    )


# --- reads ------------------------------------------------------------------------------------------------


class FailureFilter(Record):
    problem_type: str | None = None
    severity: str | None = None
    intent: str | None = None
    version: str | None = None  # first_seen_version
    status: str | None = None
    rule: str | None = None
    tier: str | None = None
    limit: int = 50
    offset: int = 0


class FailureRow(Record):
    """One line of `flywheel failures`: the failure and its latest verdict."""

    id: str
    interaction_id: str
    status: str
    rule: str
    intent: str | None
    first_seen_version: str
    cluster_size: int
    tier: str
    problem_type: str | None = None
    severity: str | None = None
    acceptance: str | None = None
    verified: bool = False


def _latest_verdicts():
    newest = select(verdicts.c.failure_id, func.max(verdicts.c.id).label("vid")).group_by(verdicts.c.failure_id).subquery()
    return select(verdicts).join(newest, verdicts.c.id == newest.c.vid).subquery("v")


def _latest_verified():
    """Per failure: 1 if any of its corrections passed verification."""
    passed = case((corrections.c.verified.is_(True), 1), else_=0)
    return select(corrections.c.failure_id, func.max(passed).label("ok")).group_by(corrections.c.failure_id).subquery("c")


def list_failures(store: Store, flt: FailureFilter) -> list[FailureRow]:
    v = _latest_verdicts()
    c = _latest_verified()
    query = (
        select(failures, v.c.problem_type, v.c.severity, v.c.acceptance, c.c.ok)
        .select_from(failures.outerjoin(v, v.c.failure_id == failures.c.id).outerjoin(c, c.c.failure_id == failures.c.id))
        .where(failures.c.status != str(FailureStatus.DUPLICATE) if flt.status is None else failures.c.status == flt.status)
    )
    conds = []
    if flt.problem_type:
        conds.append(v.c.problem_type == flt.problem_type)
    if flt.severity:
        conds.append(v.c.severity == flt.severity)
    if flt.intent:
        conds.append(failures.c.intent == flt.intent)
    if flt.version:
        conds.append(failures.c.first_seen_version == flt.version)
    if flt.rule:
        conds.append(failures.c.rule == flt.rule)
    if flt.tier:
        conds.append(failures.c.tier == flt.tier)
    if conds:
        query = query.where(and_(*conds))
    query = query.order_by(failures.c.risk.desc(), failures.c.id).limit(flt.limit).offset(flt.offset)
    with store.engine.connect() as conn:
        rows = conn.execute(query).fetchall()
    return [
        FailureRow(
            id=r.id,
            interaction_id=r.interaction_id,
            status=r.status,
            rule=r.rule,
            intent=r.intent,
            first_seen_version=r.first_seen_version,
            cluster_size=r.cluster_size,
            tier=r.tier,
            problem_type=r.problem_type,
            severity=r.severity,
            acceptance=r.acceptance,
            verified=bool(r.ok),
        )
        for r in rows
    ]


def counts(store: Store, by: Sequence[str] = ("problem_type", "severity")) -> list[dict[str, Any]]:
    """Counts of judged failures grouped by verdict fields (problem_type, severity, acceptance) and/or
    failure fields (intent, status, rule, first_seen_version, tier). Cluster sizes count as frequency."""
    v = _latest_verdicts()
    cols = []
    for name in by:
        if name in ("problem_type", "severity", "acceptance"):
            cols.append(v.c[name].label(name))
        elif name in ("intent", "status", "rule", "first_seen_version", "tier"):
            cols.append(failures.c[name].label(name))
        else:
            raise ValueError(f"cannot group by {name!r}")
    query = (
        select(*cols, func.count().label("failures"), func.sum(failures.c.cluster_size).label("frequency"))
        .select_from(failures.outerjoin(v, v.c.failure_id == failures.c.id))
        .where(failures.c.status != str(FailureStatus.DUPLICATE))
        .group_by(*cols)
        .order_by(func.count().desc())
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def get_failures(conn: Connection, status: FailureStatus | None = None, ids: Sequence[str] | None = None) -> list[Failure]:
    query = select(failures)
    if status is not None:
        query = query.where(failures.c.status == str(status))
    if ids is not None:
        query = query.where(failures.c.id.in_(list(ids)))
    return [failure_from_row(r) for r in conn.execute(query.order_by(failures.c.risk.desc(), failures.c.id))]


def latest_verdict(conn: Connection, failure_id: str) -> Verdict | None:
    row = conn.execute(select(verdicts).where(verdicts.c.failure_id == failure_id).order_by(verdicts.c.id.desc()).limit(1)).first()
    return verdict_from_row(row) if row else None


def latest_correction(conn: Connection, failure_id: str, verified_only: bool = False) -> Correction | None:
    query = select(corrections).where(corrections.c.failure_id == failure_id)
    if verified_only:
        query = query.where(corrections.c.verified.is_(True))
    row = conn.execute(query.order_by(corrections.c.id.desc()).limit(1)).first()
    return correction_from_row(row) if row else None


def show(store: Store, failure_id: str) -> FailureView:
    """The failure with its interaction, newest verdict and correction, and tier moves. `reference` is
    left None: labels are flywheel.data.labels' to read (its `failure_view` adds the newest one)."""
    with store.engine.connect() as conn:
        row = conn.execute(select(failures).where(failures.c.id == failure_id)).first()
        if row is None:
            raise NotFoundError(f"no failure with id {failure_id!r}")
        failure = failure_from_row(row)
        interaction = interaction_repo.get_many(conn, [failure.interaction_id])[failure.interaction_id]
        moves = [
            dict(r._mapping)
            for r in conn.execute(select(tier_moves).where(tier_moves.c.failure_id == failure_id).order_by(tier_moves.c.id))
        ]
        return FailureView(
            failure=failure,
            interaction=interaction,
            verdict=latest_verdict(conn, failure_id),
            correction=latest_correction(conn, failure_id),
            tier_moves=moves,
        )


# --- reads for triage, snapshots, evaluation and labelling --------------------------------------------------


def existing_ids(conn: Connection, ids: Sequence[str]) -> set[str]:
    """Which of `ids` are stored failures."""
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        found.update(conn.execute(select(failures.c.id).where(failures.c.id.in_(chunk))).scalars())
    return found


def representatives_among(conn: Connection, ids: Sequence[str]) -> set[str]:
    """Which of `ids` lead a cluster (their cluster_id is their own id)."""
    if not ids:
        return set()
    query = select(failures.c.id).where(failures.c.id.in_(list(ids)), failures.c.cluster_id == failures.c.id)
    return {row.id for row in conn.execute(query)}


def unclustered(store: Store, limit: int) -> list[Failure]:
    """Up to `limit` captured failures without a cluster, highest risk first."""
    query = (
        select(failures)
        .where(failures.c.status == str(FailureStatus.CAPTURED), failures.c.cluster_id.is_(None))
        .order_by(failures.c.risk.desc(), failures.c.id)
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [failure_from_row(r) for r in conn.execute(query)]


def cluster_sizes(conn: Connection, representative_ids: Sequence[str]) -> list[tuple[str, int]]:
    """(representative id, failures in its cluster) for each of `representative_ids` with members."""
    query = (
        select(failures.c.cluster_id, func.count())
        .where(failures.c.cluster_id.in_(list(representative_ids)))
        .group_by(failures.c.cluster_id)
    )
    return [(rep_id, int(size)) for rep_id, size in conn.execute(query).all()]


def count_representatives(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(failures).where(failures.c.cluster_id == failures.c.id)).scalar_one()


def representative_ids(conn: Connection) -> list[str]:
    return [r.id for r in conn.execute(select(failures.c.id).where(failures.c.cluster_id == failures.c.id).order_by(failures.c.id))]


class ClusterRisk(Record):
    id: str  # the representative
    status: str  # the representative's
    risk: float  # the highest among its members


def cluster_risks(store: Store, statuses: Sequence[str]) -> list[ClusterRisk]:
    """Each cluster whose representative is in `statuses`, with the highest risk among its members."""
    member = failures.alias("member")
    query = (
        select(failures.c.id, failures.c.status, func.max(member.c.risk).label("risk"))
        .join(member, member.c.cluster_id == failures.c.id)
        .where(failures.c.status.in_(list(statuses)), failures.c.cluster_id == failures.c.id)
        .group_by(failures.c.id, failures.c.status)
    )
    with store.engine.connect() as conn:
        return [ClusterRisk(id=r.id, status=r.status, risk=float(r.risk)) for r in conn.execute(query).all()]


def training_failures(conn: Connection) -> list[Failure]:
    """Failures a snapshot may train on, in id order: tier problem and status verified (new fixes), a
    baseline tier (graduated samples, whatever their status), or not_failure with a person's label."""
    query = select(failures).where(
        or_(
            and_(failures.c.tier == str(SampleTier.PROBLEM), failures.c.status == str(FailureStatus.VERIFIED)),
            failures.c.tier.in_([str(t) for t in SampleTier if t != SampleTier.PROBLEM]),
            and_(failures.c.status == str(FailureStatus.NOT_FAILURE), failures.c.id.in_(select(labels.c.failure_id))),
        )
    )
    return [failure_from_row(r) for r in conn.execute(query.order_by(failures.c.id))]


def failures_in_tiers(conn: Connection, tiers: Sequence[SampleTier], status: FailureStatus | None = None) -> list[Failure]:
    """Failures in `tiers` (and `status`, if given), in id order."""
    query = select(failures).where(failures.c.tier.in_([str(t) for t in tiers]))
    if status is not None:
        query = query.where(failures.c.status == str(status))
    return [failure_from_row(r) for r in conn.execute(query.order_by(failures.c.id))]


def failures_not_in(conn: Connection, statuses: Sequence[str], limit: int) -> list[Failure]:
    """Up to `limit` failures whose status is none of `statuses`, highest risk first."""
    query = select(failures).where(failures.c.status.not_in(list(statuses)))
    return [failure_from_row(r) for r in conn.execute(query.order_by(failures.c.risk.desc(), failures.c.id).limit(limit))]


def _newest(conn: Connection, table: Any, failure_ids: Sequence[str], condition: Any = None) -> dict[str, Any]:
    """The newest row of `table` (verdicts or corrections) per failure id, optionally among rows meeting
    `condition`: two queries per 500 failures instead of two per failure."""
    out: dict[str, Any] = {}
    for start in range(0, len(failure_ids), 500):
        query = select(table).where(table.c.failure_id.in_(list(failure_ids[start : start + 500])))
        if condition is not None:
            query = query.where(condition)
        for row in conn.execute(query.order_by(table.c.id)):
            out[row.failure_id] = row  # ascending ids: the newest is written last
    return out


def newest_corrections(conn: Connection, failure_ids: Sequence[str], verified_only: bool = False) -> dict[str, Correction]:
    """`latest_correction` for many failures at once (those without one are absent)."""
    found = _newest(conn, corrections, failure_ids, corrections.c.verified.is_(True) if verified_only else None)
    return {fid: correction_from_row(row) for fid, row in found.items()}


def newest_verdicts(conn: Connection, failure_ids: Sequence[str]) -> dict[str, Verdict]:
    """`latest_verdict` for many failures at once (those without one are absent)."""
    return {fid: verdict_from_row(row) for fid, row in _newest(conn, verdicts, failure_ids).items()}


class VerifiedAnswer(Record):
    failure_id: str
    answer: str
    generator: str
    intent: str | None  # the failure's own intent


def verified_answers(conn: Connection) -> list[VerifiedAnswer]:
    """Every verified correction's answer with its failure's intent, oldest correction first."""
    query = (
        select(corrections.c.failure_id, corrections.c.answer, corrections.c.generator, failures.c.intent)
        .join(failures, failures.c.id == corrections.c.failure_id)
        .where(corrections.c.verified.is_(True))
        .order_by(corrections.c.id)
    )
    return [VerifiedAnswer(failure_id=r.failure_id, answer=r.answer, generator=r.generator, intent=r.intent) for r in conn.execute(query)]
