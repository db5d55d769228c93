"""Human decisions about a candidate, and the alias moves they allow: approve, promote, reject, rollback.

Approval is code, not a prompt (ARCHITECTURE principle 4). An approval is a stored row bound to one
version AND the hash of the eval report the person saw; `promote` switches aliases only when such a row
says "approved", comes from an approver the settings allow, the report hash is still the version's
current one and the gate passed. Anything else is a PolicyViolation that says which check failed. The
agent has no tool that calls `promote`; the CLI (`flywheel approve`), Slack and web approvals do, after a
person decided.

Who may approve:
  terminal  anyone at the terminal when `approvals.approvers` is empty, otherwise only those names;
  slack     only Slack user ids in `approvals.slack_approvers` (an empty list means nobody);
  api, web  only names in `approvals.approvers` (an empty list means nobody: a network caller is not a
            person at this machine).
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection

from flywheel.errors import PolicyViolation, UserInputError
from flywheel.records import Record, utcnow
from flywheel.release import registry
from flywheel.release.baseline_review import revert_confirmations
from flywheel.release.graduation import return_to_pool, revert_graduation
from flywheel.release.records import CHANNELS, AliasSwitch, Approval, Channel, DecisionKind, ModelVersion, VersionStatus
from flywheel.release.registry import CANARY, CHAMPION, CLOSED, PREVIOUS
from flywheel.settings import Settings
from flywheel.store import approvals as approval_store
from flywheel.store import versions as version_store
from flywheel.store.db import Store


class Promotion(Record):
    version: str  # the new champion
    previous: str | None  # the champion it replaced
    approval_id: int
    effect_key: str
    replayed: bool = False  # already done earlier: nothing changed now


class Rejection(Record):
    approval: Approval
    returned_to_pool: list[str]  # failures of the version's dataset that stay problem samples
    pool_note: str = ""  # why nothing was returned, when nothing was


class Rollback(Record):
    rolled_back: str  # the champion that was taken back
    champion: str  # the version serving now
    reverted_samples: list[str] = []  # samples that had graduated because of the rolled-back version
    effect_key: str
    replayed: bool = False


# --- approvers --------------------------------------------------------------------------------------------


def check_approver(settings: Settings, approver: str, channel: str) -> None:
    """Refuse (PolicyViolation) an approver the settings do not allow on this channel."""
    if channel not in CHANNELS:
        raise UserInputError(f"unknown approval channel {channel!r}; expected one of {', '.join(CHANNELS)}")
    if not approver.strip():
        raise PolicyViolation("an approval needs the approver's name")
    if channel == "slack":
        allowed = settings.approvals.slack_approvers
        if approver not in allowed:
            raise PolicyViolation(
                f"Slack user {approver!r} is not in approvals.slack_approvers" + ("" if allowed else " (the list is empty)")
            )
        return
    allowed = settings.approvals.approvers
    if channel == "terminal" and not allowed:
        return
    if approver not in allowed:
        raise PolicyViolation(
            f"{approver!r} is not in approvals.approvers" + ("" if allowed else f" (the list is empty, so {channel} approvals are off)")
        )


def approvals_for(store: Store, version: str) -> list[Approval]:
    with store.engine.connect() as conn:
        return approval_store.approvals_for(conn, version)


# --- deciding ---------------------------------------------------------------------------------------------


def record_approval(
    store: Store, version: str, decision: DecisionKind, approver: str, channel: Channel, reason: str = "", run_id: str | None = None
) -> Approval:
    """Store a person's decision on `version`, bound to its current eval report hash.

    The same decision again returns the stored one; a different decision on the same version and report
    is refused ("already decided"). Approving a version whose gate failed is refused: a person cannot
    override the gate, only re-run the evaluation."""
    if decision not in ("approved", "rejected"):
        raise UserInputError(f"decision must be 'approved' or 'rejected', not {decision!r}")
    check_approver(store.settings, approver, channel)
    with store.begin() as conn:
        version_store.release_lock(conn)  # decisions are serialised: the second of two racing ones sees the first
        return _decide(conn, version, decision, approver, channel, reason, run_id)[0]


def _record(
    conn: Connection, version: str, decision: DecisionKind, approver: str, channel: str, reason: str, run_id: str | None
) -> Approval:
    target = registry.get_version(conn, version)
    if not target.eval_report_hash:
        raise PolicyViolation(f"{version} has no eval report; evaluate it before deciding (flywheel eval --candidate {version})")
    earlier = approval_store.decision_on(conn, version, target.eval_report_hash)
    if earlier is not None:
        if earlier.decision != decision:
            raise PolicyViolation(
                f"{version} (report {target.eval_report_hash[:12]}) was already decided: {earlier.decision} by {earlier.approver}"
            )
        return earlier
    if decision == "approved" and target.gate_passed is not True:
        raise PolicyViolation(f"{version} did not pass the promotion gate; an approval cannot override the gate")
    if decision == "approved" and target.status in CLOSED:
        raise PolicyViolation(f"{version} is {target.status}; it cannot be approved")
    return approval_store.insert_approval(
        conn,
        version=version,
        report_hash=target.eval_report_hash,
        decision=decision,
        approver=approver,
        channel=channel,
        reason=reason,
        run_id=run_id,
        created_at=utcnow(),
    )


def promote(store: Store, settings: Settings, version: str, actor: str, effect_key: str | None = None) -> Promotion:
    """Make `version` the champion (the champion becomes previous) in ONE transaction, if and only if it
    carries a stored approval for its current report from an allowed approver and passed its gate.

    Idempotent: promoting the champion again changes nothing; a repeated `effect_key` returns the first
    call's result. Raises PolicyViolation naming the failed check."""
    with store.begin() as conn:
        version_store.release_lock(conn)
        if effect_key is not None:
            earlier = version_store.recorded_switch(conn, effect_key)
            if earlier is not None:
                return _promotion_from(conn, earlier)
        target = registry.get_version(conn, version)
        approval = _check_promotable(conn, settings, target)
        current = version_store.alias_map(conn)
        champion = current.get(CHAMPION, (None, None))[0]
        if champion == target.id:
            return Promotion(
                version=target.id,
                previous=current.get(PREVIOUS, (None, None))[0],
                approval_id=approval.id,
                effect_key=effect_key or "",
                replayed=True,
            )
        key = effect_key or registry.effect_key("promote", target.id, (target.eval_report_hash or "")[:16], version_store.epoch(conn))
        reason = f"promoted: {approval.decision} by {approval.approver} ({approval.channel})"
        old_previous = current.get(PREVIOUS, (None, None))[0]
        # The champion switch carries the caller's key; the companion switches derive theirs from it.
        registry.set_alias(conn, CHAMPION, target.id, actor=actor, reason=reason, key=key)
        if champion is not None:
            registry.set_alias(
                conn, PREVIOUS, champion, actor=actor, reason=f"replaced by {target.id}", key=registry.effect_key(key, "previous")
            )
            version_store.set_status(conn, champion, VersionStatus.PREVIOUS)
        if old_previous is not None and old_previous not in (champion, target.id):
            version_store.set_status(conn, old_previous, VersionStatus.RETIRED)
        if current.get(CANARY, (None, None))[0] == target.id:
            registry.set_alias(conn, CANARY, None, actor=actor, reason=f"{target.id} promoted", key=registry.effect_key(key, "canary"))
        version_store.set_status(conn, target.id, VersionStatus.CHAMPION)
        return Promotion(version=target.id, previous=champion, approval_id=approval.id, effect_key=key)


def _check_promotable(conn: Connection, settings: Settings, target: ModelVersion) -> Approval:
    if target.status in CLOSED:
        raise PolicyViolation(f"{target.id} is {target.status}; it cannot be promoted (train and evaluate a new version)")
    if not target.eval_report_hash:
        raise PolicyViolation(f"{target.id} has no eval report; it cannot be promoted")
    if target.gate_passed is not True:
        raise PolicyViolation(f"{target.id} did not pass the promotion gate")
    approval = approval_store.decision_on(conn, target.id, target.eval_report_hash)
    if approval is None:
        older = next(iter(approval_store.approvals_for(conn, target.id)), None)
        if older is not None:
            raise PolicyViolation(
                f"the approval of {target.id} was for report {older.report_hash[:12]}, but its report is now "
                f"{target.eval_report_hash[:12]}; approve the new report"
            )
        raise PolicyViolation(f"no approval recorded for {target.id}; a person must approve it (flywheel approve {target.id})")
    if approval.decision != "approved":
        raise PolicyViolation(f"{target.id} was rejected by {approval.approver}: {approval.reason or 'no reason given'}")
    # The approver list may have changed since the approval: it must hold now.
    check_approver(settings, approval.approver, approval.channel)
    return approval


def _promotion_from(conn: Connection, event: AliasSwitch) -> Promotion:
    if event.alias != CHAMPION or event.to_version is None:
        raise UserInputError(f"effect key {event.effect_key!r} belongs to a {event.alias} switch, not a promotion")
    target = registry.get_version(conn, event.to_version)
    approval = approval_store.decision_on(conn, target.id, target.eval_report_hash or "")
    return Promotion(
        version=target.id,
        previous=event.from_version,
        approval_id=approval.id if approval else 0,
        effect_key=event.effect_key,
        replayed=True,
    )


def reject(store: Store, version: str, approver: str, reason: str, channel: Channel = "terminal", run_id: str | None = None) -> Rejection:
    """Record a person's rejection of `version` (the same as `record_approval(..., "rejected", ...)`,
    with a required reason) and say which samples stay in the pool."""
    if not reason.strip():
        raise UserInputError("a rejection needs a reason (--reason)")
    check_approver(store.settings, approver, channel)
    with store.begin() as conn:
        version_store.release_lock(conn)
        return cast(Rejection, _decide(conn, version, "rejected", approver, channel, reason, run_id)[1])


def _decide(
    conn: Connection, version: str, decision: DecisionKind, approver: str, channel: str, reason: str, run_id: str | None
) -> tuple[Approval, Rejection | None]:
    """Store the decision; a rejection also takes effect: the version's status becomes rejected, a canary
    of it stops, and the failures of its dataset stay problem samples (graduation.return_to_pool).
    Every step is idempotent, so deciding the same again changes nothing."""
    if decision == "rejected" and version_store.alias_map(conn).get(CHAMPION, (None, None))[0] == version:
        raise UserInputError(f"{version} is the champion; use `flywheel rollback` to take it back")
    approval = _record(conn, version, decision, approver, channel, reason, run_id)
    if decision != "rejected":
        return approval, None
    target = registry.get_version(conn, version)
    if version_store.alias_map(conn).get(CANARY, (None, None))[0] == version:
        registry.set_alias(
            conn,
            CANARY,
            None,
            actor=approver,
            reason=f"{version} rejected",
            key=registry.effect_key("reject", version, approval.id, "canary"),
        )
    version_store.set_status(conn, version, VersionStatus.REJECTED)
    returned, note = return_to_pool(conn, target, actor=approval.approver, reason=f"{version} rejected: {approval.reason}")
    return approval, Rejection(approval=approval, returned_to_pool=returned, pool_note=note)


def rollback(store: Store, actor: str, reason: str = "", effect_key: str | None = None) -> Rollback:
    """Return the champion to the previous version, in one transaction, and record the event.

    The rolled-back version becomes rolled_back and cannot serve again; samples that graduated because
    of it go back to where they were. `previous` is cleared: there is one step of history, so a second
    rollback needs a promotion in between. A repeated `effect_key` returns the first call's result."""
    with store.begin() as conn:
        version_store.release_lock(conn)
        if effect_key is not None:
            earlier = version_store.recorded_switch(conn, effect_key)
            if earlier is not None:
                return Rollback(
                    rolled_back=earlier.from_version or "", champion=earlier.to_version or "", effect_key=effect_key, replayed=True
                )
        current = version_store.alias_map(conn)
        champion = current.get(CHAMPION, (None, None))[0]
        previous = current.get(PREVIOUS, (None, None))[0]
        if champion is None:
            raise UserInputError("there is no champion to roll back")
        if previous is None:
            raise UserInputError(f"no previous version to roll back to (champion is {champion})")
        key = effect_key or registry.effect_key("rollback", champion, previous, version_store.epoch(conn))
        why = reason or "rollback"
        registry.set_alias(conn, CHAMPION, previous, actor=actor, reason=why, key=key)
        registry.set_alias(conn, PREVIOUS, None, actor=actor, reason=f"{previous} restored", key=registry.effect_key(key, "previous"))
        version_store.set_status(conn, champion, VersionStatus.ROLLED_BACK)
        version_store.set_status(conn, previous, VersionStatus.CHAMPION)
        reverted = revert_graduation(conn, champion, actor=actor, reason=f"{champion} rolled back: {why}")
        reverted += revert_confirmations(conn, champion, actor=actor, reason=f"{champion} rolled back: {why}")
        return Rollback(rolled_back=champion, champion=previous, reverted_samples=reverted, effect_key=key)
