"""The model registry: versions v1, v2, ... and the aliases that say which one serves.

A version is a base model plus (optionally) a LoRA adapter whose weights' sha256 is recorded, with its
lineage (parent version, dataset, training job) and, once evaluated, its report hash and gate result.
Three aliases point at versions: `champion` (serves), `canary` (serves a share of users) and `previous`
(where a rollback returns to).

Every alias change is one transaction that updates the alias row and writes an `alias_events` row with
a unique effect key, so a node re-run after a crash replays the earlier result instead of switching
twice (ARCHITECTURE principle 3). All release writes take one release lock first (a PostgreSQL advisory
lock; on SQLite the database write lock), so reads inside them see the state they change: version ids
are allocated without gaps or races and two promotions cannot interleave.

Promotion, rejection and rollback (the human decisions) live in flywheel.release.approvals, canaries
in flywheel.release.canary, sample graduation in flywheel.release.graduation; this module is their
shared mechanics. The SQL is in flywheel.store.versions; the records in flywheel.release.records.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection

from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Record, stable_hash, utcnow
from flywheel.release.records import AliasSwitch, ModelVersion, VersionStatus, version_number
from flywheel.store import approvals as approval_store
from flywheel.store import versions as version_store
from flywheel.store.db import Store

CHAMPION, CANARY, PREVIOUS = "champion", "canary", "previous"
ALIASES = (CHAMPION, CANARY, PREVIOUS)
AliasName = Literal["champion", "canary", "previous"]
MAX_KEY = 128  # alias_events.effect_key column width

# Keys in `model_versions.metrics` that `list_versions` shows (the eval report's headline numbers).
TASK_SUCCESS_KEY = "task_success"
TARGETED_KEY = "targeted_problem_rates"


# Versions in these states never serve again: a new adapter (a new version) has to earn it.
CLOSED = (VersionStatus.REJECTED, VersionStatus.ROLLED_BACK, VersionStatus.RETIRED)


class Routing(Record):
    """What the gateway routes by: everyone to the champion except a sticky `share` of users to the canary."""

    champion: str
    canary: str | None = None
    share: float = 0.0


class VersionRow(Record):
    """One line of `flywheel models`."""

    id: str
    status: str
    aliases: list[str] = []
    parent: str | None = None
    base_model: str
    adapter_path: str | None = None
    dataset_id: str | None = None
    job_id: str | None = None
    gate_passed: bool | None = None
    eval_report_hash: str | None = None
    approval: str | None = None  # "approved by alice" / "rejected by bob" for the current report
    task_success: float | None = None
    targeted_problem_rates: dict[str, float] = {}
    created_at: datetime


# --- small helpers --------------------------------------------------------------------------------------------


def effect_key(*parts: Any) -> str:
    """An effect key from what an action acts on, shortened with a hash when it would not fit."""
    key = ":".join(str(p) for p in parts)
    return key if len(key) <= MAX_KEY else f"{key[:100]}~{stable_hash(key, 24)}"


# --- versions ---------------------------------------------------------------------------------------------


def get_version(conn: Connection, version_id: str) -> ModelVersion:
    version = version_store.find_version(conn, version_id)
    if version is None:
        raise NotFoundError(f"no model version {version_id!r} (see `flywheel models`)")
    return version


def _next_id(conn: Connection) -> str:
    # Ids are allocated under the release lock, so max + 1 is safe.
    newest = version_store.newest_version_id(conn)
    return f"v{version_number(newest) + 1 if newest else 1}"


def adapter_weights_sha256(adapter_path: str | Path) -> str:
    """sha256 of a PEFT adapter folder's safetensors weights: the hash the registry records and checks."""
    from flywheel.inference.folders import ADAPTER_WEIGHTS, check_adapter_folder
    from flywheel.store.vectors import sha256_file

    return sha256_file(check_adapter_folder(adapter_path) / ADAPTER_WEIGHTS)


def register_version(
    store: Store,
    *,
    base_model: str,
    adapter_path: str | Path | None = None,
    adapter_sha256: str | None = None,
    dataset_id: str | None = None,
    job_id: str | None = None,
    parent: str | None = None,
    notes: str = "",
) -> ModelVersion:
    """Register a trained adapter (or, without one, a whole model folder) as a new candidate v<n+1>.

    Idempotent: the same adapter weights (by sha256), or the same adapter-less model, registered again
    return the existing version. When the adapter folder is on this machine its weights are hashed here
    and must match a given `adapter_sha256`. `parent` defaults to the current champion."""
    path = str(adapter_path) if adapter_path is not None else None
    if path is None:
        if adapter_sha256:
            raise UserInputError("adapter_sha256 given without an adapter_path")
    elif Path(path).exists():
        actual = adapter_weights_sha256(path)
        if adapter_sha256 and adapter_sha256 != actual:
            raise UserInputError(f"{path}: adapter weights sha256 {actual} does not match the given {adapter_sha256}")
        adapter_sha256 = actual
    elif not adapter_sha256:
        raise UserInputError(f"{path}: no such adapter folder, and no adapter_sha256 given to record")
    with store.begin() as conn:
        version_store.release_lock(conn)
        existing = version_store.same_model(conn, base_model, adapter_sha256)
        if existing is not None:
            return existing
        if parent is not None:
            get_version(conn, parent)
        else:
            parent = version_store.alias_target(conn, CHAMPION)
        version = ModelVersion(
            id=_next_id(conn),
            parent=parent,
            base_model=base_model,
            adapter_path=path,
            adapter_sha256=adapter_sha256,
            dataset_id=dataset_id,
            job_id=job_id,
            notes=notes,
            created_at=utcnow(),
        )
        version_store.insert_version(conn, version)
        return version


def register_base(store: Store, base_model: str, *, actor: str = "flywheel", notes: str = "") -> ModelVersion:
    """Register a base model (no adapter) as a version; it becomes `champion` when there is none.

    Idempotent: the same base model registered again returns its existing version."""
    with store.begin() as conn:
        version_store.release_lock(conn)
        version = version_store.same_model(conn, base_model, None)
        if version is None:
            version = ModelVersion(id=_next_id(conn), base_model=base_model, notes=notes, created_at=utcnow())
            version_store.insert_version(conn, version)
        if version_store.alias_target(conn, CHAMPION) is None:
            key = effect_key("base", version.id, version_store.epoch(conn))
            set_alias(conn, CHAMPION, version.id, actor=actor, reason="first champion: the base model", key=key)
            version_store.set_status(conn, version.id, VersionStatus.CHAMPION)
        return get_version(conn, version.id)


def first_champion(store: Store, base_model: str, *, actor: str, notes: str = "") -> tuple[ModelVersion, bool]:
    """The champion; when there is none yet, `base_model` registered as it (v1 in a new project), so that
    the first trained adapter is a candidate with something to be compared against. The flag is True when
    this call registered it. With a champion already, nothing is registered: the base would be a stray
    candidate."""
    try:
        return resolve(store, CHAMPION), False
    except NotFoundError:
        return register_base(store, base_model, actor=actor, notes=notes), True


def attach_eval(
    store: Store, version: str, report_path: str | Path, report_hash: str, gate_passed: bool, metrics: dict[str, Any] | None = None
) -> ModelVersion:
    """Record a version's evaluation report. A new report (another hash) replaces the old one, and an
    approval given for the old report no longer lets the version be promoted."""
    if not report_hash:
        raise UserInputError(f"attach_eval {version}: empty report hash")
    with store.begin() as conn:
        version_store.release_lock(conn)
        get_version(conn, version)
        version_store.set_eval(conn, version, str(report_path), report_hash, bool(gate_passed), metrics or {})
        return get_version(conn, version)


def verify_adapter(version: ModelVersion) -> Path | None:
    """The adapter folder to serve, after checking its weights still hash to the recorded sha256.

    None for a base-model version. A changed or missing file raises UserInputError naming the path."""
    if version.adapter_path is None:
        return None
    from flywheel.inference.folders import check_adapter_folder

    if not version.adapter_sha256:
        raise UserInputError(f"{version.id}: no adapter sha256 recorded; refusing to serve {version.adapter_path} unchecked")
    return check_adapter_folder(version.adapter_path, version.adapter_sha256)


# --- aliases ----------------------------------------------------------------------------------------------


def set_alias(
    conn: Connection, alias: str, version: str | None, *, actor: str, reason: str, key: str, share: float | None = None
) -> AliasSwitch:
    """Point `alias` at `version` (None removes it) and record the event. Inside a locked transaction."""
    if alias not in ALIASES:
        raise UserInputError(f"unknown alias {alias!r}; expected one of {', '.join(ALIASES)}")
    before = version_store.alias_target(conn, alias)
    now = utcnow()
    if version is None:
        version_store.delete_alias(conn, alias)
    else:
        version_store.put_alias(conn, alias, version, share, now)
    event = AliasSwitch(alias=alias, from_version=before, to_version=version, effect_key=key, actor=actor, reason=reason, created_at=now)
    version_store.insert_switch(conn, event)
    return event


def switch_alias(
    store: Store, alias: AliasName, version: str | None, *, actor: str, reason: str, effect_key: str, share: float | None = None
) -> AliasSwitch:
    """Point an alias at a version (None removes it), atomically with its event row.

    A second call with the same `effect_key` changes nothing and returns the first call's event (with
    `replayed=True`). This is the low-level switch: promotion goes through `approvals.promote`,
    which checks the approval first."""
    if len(effect_key) > MAX_KEY:
        raise UserInputError(f"effect key longer than {MAX_KEY} characters: {effect_key[:40]}...")
    with store.begin() as conn:
        version_store.release_lock(conn)
        earlier = version_store.recorded_switch(conn, effect_key)
        if earlier is not None:
            return earlier
        if version is not None:
            get_version(conn, version)
        return set_alias(conn, alias, version, actor=actor, reason=reason, key=effect_key, share=share)


def resolve(store: Store, name_or_alias: str) -> ModelVersion:
    """A version by id (v3) or by alias (champion, canary, previous)."""
    with store.engine.connect() as conn:
        return resolve_in(conn, name_or_alias)


def resolve_in(conn: Connection, name_or_alias: str) -> ModelVersion:
    name = name_or_alias.strip()
    if name in ALIASES:
        target = version_store.alias_target(conn, name)
        if target is None:
            raise NotFoundError(f"no version is {name} now (see `flywheel models`)")
        return get_version(conn, target)
    return get_version(conn, name)


def alias_target(store: Store, alias: str) -> str | None:
    """The version `alias` points at now, None when it points at none."""
    with store.engine.connect() as conn:
        return version_store.alias_target(conn, alias)


def current_routing(store: Store) -> Routing:
    """Champion, canary and the canary's share, read in one snapshot for the gateway's router."""
    with store.engine.connect() as conn:
        current = version_store.alias_map(conn)
    if CHAMPION not in current:
        raise NotFoundError("no champion: register a base model first (flywheel train / flywheel demo)")
    canary = current.get(CANARY)
    return Routing(champion=current[CHAMPION][0], canary=canary[0] if canary else None, share=(canary[1] or 0.0) if canary else 0.0)


def alias_history(store: Store, limit: int = 50) -> list[AliasSwitch]:
    with store.engine.connect() as conn:
        return version_store.switches(conn, limit)


# --- listing ----------------------------------------------------------------------------------------------


def list_versions(store: Store) -> list[VersionRow]:
    """Every version, newest first, with its aliases, lineage, gate, approval and headline metrics."""
    with store.engine.connect() as conn:
        versions = version_store.all_versions(conn)
        by_version: dict[str, list[str]] = {}
        for name, (target, _share) in version_store.alias_map(conn).items():
            by_version.setdefault(target, []).append(name)
        decisions = {(r.version, r.report_hash): f"{r.decision} by {r.approver}" for r in approval_store.all_approvals(conn)}
    versions.sort(key=lambda v: v.number, reverse=True)
    return [
        VersionRow(
            id=v.id,
            status=str(v.status),
            aliases=sorted(by_version.get(v.id, []), key=ALIASES.index),
            parent=v.parent,
            base_model=v.base_model,
            adapter_path=v.adapter_path,
            dataset_id=v.dataset_id,
            job_id=v.job_id,
            gate_passed=v.gate_passed,
            eval_report_hash=v.eval_report_hash,
            approval=decisions.get((v.id, v.eval_report_hash)) if v.eval_report_hash else None,
            task_success=_number(v.metrics.get(TASK_SUCCESS_KEY)),
            targeted_problem_rates={k: r for k, val in (v.metrics.get(TARGETED_KEY) or {}).items() if (r := _number(val)) is not None},
            created_at=v.created_at,
        )
        for v in versions
    ]


def _number(value: Any) -> float | None:
    """A metric as a float: a plain number, or a rate object/dict with a `rate` field (evals.metrics.Rate)."""
    if isinstance(value, dict):
        value = value.get("rate")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
