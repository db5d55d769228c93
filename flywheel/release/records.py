"""The release records: a model version, an alias switch, a person's decision and its stored approval.

One definition each, shared by the release modules (flywheel.release) and the store repositories that
read and write them (flywheel.store.versions, flywheel.store.approvals). Nothing here touches the store.

Two names for a decision: `DecisionKind` is what was decided ("approved" or "rejected", the stored
column), `Decision` is a person's whole answer to a pending approval (kind, approver, channel, reason,
the report they looked at).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import TypeAdapter, ValidationError

from flywheel.errors import UserInputError
from flywheel.records import Record

DecisionKind = Literal["approved", "rejected"]
Channel = Literal["terminal", "slack", "api", "web"]
CHANNELS: tuple[str, ...] = get_args(Channel)


class VersionStatus(StrEnum):
    CANDIDATE = "candidate"  # registered, maybe evaluated; not serving
    CANARY = "canary"  # serving a share of users
    CHAMPION = "champion"  # serving everyone else
    PREVIOUS = "previous"  # the champion before this one: where a rollback returns to
    RETIRED = "retired"  # an older champion
    REJECTED = "rejected"  # a person rejected it
    ROLLED_BACK = "rolled_back"  # served and was taken back (by a person or by the canary monitor)


def version_number(version_id: str) -> int:
    if not (version_id.startswith("v") and version_id[1:].isdigit()):
        raise ValueError(f"not a version id: {version_id!r}")
    return int(version_id[1:])


class ModelVersion(Record):
    id: str
    parent: str | None = None
    base_model: str
    adapter_path: str | None = None  # None: the base model itself
    adapter_sha256: str | None = None  # sha256 of the adapter's weights file
    dataset_id: str | None = None
    job_id: str | None = None
    eval_report_path: str | None = None
    eval_report_hash: str | None = None
    gate_passed: bool | None = None
    status: VersionStatus = VersionStatus.CANDIDATE
    metrics: dict[str, Any] = {}
    notes: str = ""
    created_at: datetime

    @property
    def number(self) -> int:
        return version_number(self.id)


class AliasSwitch(Record):
    """One alias change as recorded. `replayed` is True when the effect key had already been applied and
    this call changed nothing."""

    alias: str
    from_version: str | None
    to_version: str | None  # None: the alias was removed
    effect_key: str
    actor: str
    reason: str = ""
    created_at: datetime
    replayed: bool = False


class Approval(Record):
    """A stored decision, bound to one version and the report hash the person saw."""

    id: int
    version: str
    report_hash: str
    decision: DecisionKind
    approver: str
    channel: Channel  # checked against CHANNELS before it is stored (approvals.check_approver)
    reason: str = ""
    run_id: str | None = None
    created_at: datetime


@dataclass(frozen=True)
class Decision:
    """A person's answer to a pending approval: `Command(resume=Decision(...))`, or the same as a dict.

    `report_hash`, when given, is the report the person looked at: the decision is refused if the
    candidate's report has changed since (someone re-evaluated it)."""

    decision: DecisionKind
    approver: str
    reason: str = ""
    channel: Channel = "terminal"
    report_hash: str | None = None
    # approving also confirms the baseline samples the pending approval proposed to move up a tier
    # (flywheel.release.baseline_review); False: promote only
    confirm_baselines: bool = True

    def __post_init__(self) -> None:
        if not str(self.approver).strip():
            raise UserInputError("a decision needs the approver's name")
        if self.decision == "rejected" and not str(self.reason).strip():
            raise UserInputError("a rejection needs a reason")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any) -> Decision:
        """A Decision from a Decision or a dict (what a checkpoint gives back); UserInputError if invalid."""
        if isinstance(value, Decision):
            return value
        try:
            return _DECISION.validate_python(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "decision"
            raise UserInputError(f"not a valid decision ({where}: {err['msg']})") from None


_DECISION = TypeAdapter(Decision)
