"""Routing: which registry version answers a request for `champion`, `canary`, `previous` or `v3`.

The router keeps an in-memory snapshot of the registry's aliases (`registry.current_routing`) and of the
versions they point at, already prepared by the backend (adapter verified and loaded). A background
thread (app.py) calls `refresh()` every `serve.routing_refresh_s`: a promotion, rollback or canary change
is picked up within that interval, with no restart, and the request path never waits on the store.

A version is published only after the backend prepared it: until a new champion's adapter is loaded,
requests keep going to the old one (and say so in `x-flywheel-model-version`); an adapter that fails its
sha256 check or does not load is never served, the problem is logged and retried every RETRY_BROKEN_S.

Canary: a request for `champion` goes to the canary when the user's bucket, a stable hash of the user id
and the canary version in [0, 1), is below the canary's share. The same user stays on the same arm for
the whole canary (sticky), raising the share only adds users, and each new canary draws a fresh set of
users. A request without a user id (no `user` field, no x-flywheel-user header) is bucketed at random.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from flywheel.errors import FlywheelError, NotFoundError
from flywheel.release import registry
from flywheel.release.records import ModelVersion, version_number
from flywheel.release.registry import CANARY, CHAMPION, CLOSED, PREVIOUS, Routing
from flywheel.serve.protocol import ApiError, not_found_model
from flywheel.store.db import Store

log = logging.getLogger("flywheel.serve")

VERSION_ID = re.compile(r"^v[0-9]{1,9}$")
RETRY_BROKEN_S = 10.0  # a version that failed to prepare is tried again this often
UNKNOWN_TTL_S = 1.0  # a version id the store does not know is not looked up again for this long
MAX_EXPLICIT = 64  # versions requested by id kept prepared besides the aliases


def bucket(user: str, salt: str) -> float:
    """A user's stable position in [0, 1) for the canary keyed by `salt`."""
    digest = hashlib.sha256(f"{salt}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Snapshot:
    routing: Routing | None = None  # None: no champion yet (or the store was never readable)
    aliases: dict[str, ModelVersion] = field(default_factory=dict)  # alias -> prepared version
    versions: dict[str, ModelVersion] = field(default_factory=dict)  # id -> prepared version (aliases' and explicit)

    @property
    def canary_share(self) -> float:
        return self.routing.share if self.routing and CANARY in self.aliases else 0.0


class Router:
    def __init__(self, store: Store, backend: Any):
        self.store = store
        self.backend = backend
        self._snapshot = Snapshot()
        self._write_lock = threading.Lock()  # refresh and explicit loads publish snapshots one at a time
        self._broken: dict[tuple[str, str | None], tuple[float, str]] = {}  # (id, sha) -> (retry at, why)
        self._unknown: dict[str, float] = {}  # version id -> until when it is known not to exist
        self._explicit: list[str] = []  # ids requested directly, oldest first
        self._unservable: dict[str, tuple[str, str]] = {}  # alias -> (version, why) the registry names but cannot be served
        self.store_ok = False
        self.refreshed_at = 0.0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- the background refresh ----------------------------------------------------------------------------

    def refresh(self) -> Snapshot:
        """Re-read the aliases, prepare what is new, publish. The old snapshot stays when the store fails."""
        try:
            try:
                routing: Routing | None = registry.current_routing(self.store)
            except NotFoundError:
                routing = None  # no champion yet
            with self.store.engine.connect() as conn:
                wanted: dict[str, ModelVersion] = {}
                if routing is not None:
                    wanted[CHAMPION] = registry.get_version(conn, routing.champion)
                    if routing.canary:
                        wanted[CANARY] = registry.get_version(conn, routing.canary)
                try:
                    wanted[PREVIOUS] = registry.resolve_in(conn, PREVIOUS)
                except NotFoundError:
                    pass
                explicit = {}
                for vid in list(self._explicit):
                    try:
                        explicit[vid] = registry.get_version(conn, vid)
                    except NotFoundError:
                        pass
        except SQLAlchemyError as exc:
            if self.store_ok or not self.refreshed_at:
                log.warning("routing: cannot read the registry (serving the last known routing): %s", str(exc).splitlines()[0])
            self.store_ok = False
            return self._snapshot
        self.store_ok = True
        with self._write_lock:
            old = self._snapshot
            aliases: dict[str, ModelVersion] = {}
            unservable: dict[str, tuple[str, str]] = {}
            for alias, version in wanted.items():
                ready = self._ready(version, old)
                if ready is not None:
                    aliases[alias] = ready
                    continue
                unservable[alias] = (version.id, self._broken.get((version.id, version.adapter_sha256), (0.0, "it failed to load"))[1])
                if alias == CHAMPION and CHAMPION in old.aliases:
                    aliases[alias] = old.aliases[CHAMPION]  # keep serving the old champion until the new one loads
            self._unservable = unservable
            versions = {v.id: v for v in aliases.values()}
            for vid, version in explicit.items():
                if version.status not in CLOSED and (ready := self._ready(version, old)) is not None:
                    versions.setdefault(vid, ready)
            for vid in self._explicit:  # loaded by a request while this refresh was reading the store
                if vid not in explicit and vid in old.versions:
                    versions.setdefault(vid, old.versions[vid])
            if routing is not None and CHAMPION in aliases and aliases[CHAMPION].id != routing.champion:
                routing = routing.model_copy(update={"champion": aliases[CHAMPION].id})
            snapshot = Snapshot(routing=routing if CHAMPION in aliases else None, aliases=aliases, versions=versions)
            if _changed(old, snapshot):
                log.info(
                    "routing: champion %s, canary %s at %.0f%%",
                    _id(snapshot.aliases.get(CHAMPION)),
                    _id(snapshot.aliases.get(CANARY)),
                    100 * snapshot.canary_share,
                )
            self._snapshot = snapshot
        self.refreshed_at = time.monotonic()
        return snapshot

    def _ready(self, version: ModelVersion, old: Snapshot) -> ModelVersion | None:
        """The version once the backend prepared it; None when it cannot be served (logged, retried later)."""
        known = old.versions.get(version.id)
        if known is not None and known.adapter_sha256 == version.adapter_sha256 and known.adapter_path == version.adapter_path:
            return version
        key = (version.id, version.adapter_sha256)
        broken = self._broken.get(key)
        if broken is not None and time.monotonic() < broken[0]:
            return None
        try:
            self.backend.prepare(version)
        except (FlywheelError, OSError) as exc:
            self._broken[key] = (time.monotonic() + RETRY_BROKEN_S, str(exc))
            log.error("routing: %s cannot be served: %s", version.id, exc)
            return None
        self._broken.pop(key, None)
        return version

    # --- the request path ----------------------------------------------------------------------------------

    def route(self, model: str, user: str | None) -> ModelVersion | None:
        """The version that answers `model` for `user`. None: `model` is a version id this router has not
        prepared yet (call `load_version` off the event loop). Raises a 404 ApiError for anything else."""
        snap = self._snapshot
        if model == CHAMPION:
            champion = snap.aliases.get(CHAMPION)
            if champion is None:
                self._raise_unservable(model)
                raise not_found_model(model, "no version is champion yet (register a base model: flywheel train / flywheel demo)")
            canary = snap.aliases.get(CANARY)
            if canary is not None and snap.canary_share > 0:
                position = bucket(user, canary.id) if user else random.random()
                if position < snap.canary_share:
                    return canary
            return champion
        if model in (CANARY, PREVIOUS):
            version = snap.aliases.get(model)
            if version is None:
                self._raise_unservable(model)
                raise not_found_model(model, f"no version is {model} now")
            return version
        version = snap.versions.get(model)
        if version is not None:
            return version
        if not VERSION_ID.match(model):
            raise not_found_model(model)
        if time.monotonic() < self._unknown.get(model, 0.0):
            raise not_found_model(model)
        return None

    def _raise_unservable(self, alias: str) -> None:
        """A 503 when the registry names a version for `alias` that cannot be served (its adapter failed)."""
        if alias in self._unservable:
            version_id, why = self._unservable[alias]
            raise ApiError(
                503,
                f"{alias} is {version_id}, which cannot be served now: {why}",
                type="server_error",
                param="model",
                code="model_unavailable",
            )

    def load_version(self, version_id: str) -> ModelVersion:
        """Look a version up by id and prepare it (blocking: run it in a worker thread). A 404 when the
        registry does not have it or it may no longer serve; a 503 when its adapter cannot be loaded."""
        try:
            with self.store.engine.connect() as conn:
                version = registry.get_version(conn, version_id)
        except NotFoundError:
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[version_id] = time.monotonic() + UNKNOWN_TTL_S
            raise not_found_model(version_id) from None
        except SQLAlchemyError as exc:
            raise ApiError(
                503, f"cannot look up {version_id}: the registry is not reachable", type="server_error", code="registry_unavailable"
            ) from exc
        if version.status in CLOSED:
            raise not_found_model(version_id, f"it is {version.status} and no longer serves")
        with self._write_lock:
            old = self._snapshot
            ready = self._ready(version, old)
            if ready is None:
                why = self._broken.get((version.id, version.adapter_sha256), (0.0, "it failed to load"))[1]
                raise ApiError(
                    503, f"{version_id} cannot be served now: {why}", type="server_error", param="model", code="model_unavailable"
                )
            if version_id not in self._explicit:
                self._explicit.append(version_id)
                del self._explicit[:-MAX_EXPLICIT]
            self._snapshot = Snapshot(routing=old.routing, aliases=old.aliases, versions={**old.versions, version_id: ready})
        return ready

    def listing(self) -> list[tuple[str, ModelVersion]]:
        """(name, version) for each alias and each version currently served: what GET /v1/models shows."""
        snap = self._snapshot
        names = [(alias, version) for alias, version in snap.aliases.items()]
        names += [(vid, version) for vid, version in sorted(snap.versions.items(), key=lambda kv: version_number(kv[0]))]
        return names

    def describe(self) -> dict[str, Any]:
        snap = self._snapshot
        return {
            "champion": _id(snap.aliases.get(CHAMPION)),
            "canary": _id(snap.aliases.get(CANARY)),
            "canary_share": snap.canary_share,
            "previous": _id(snap.aliases.get(PREVIOUS)),
            "registry_reachable": self.store_ok,
            "unservable": {vid: why for (vid, _sha), (_at, why) in self._broken.items()},
        }


def _id(version: ModelVersion | None) -> str | None:
    return version.id if version is not None else None


def _changed(old: Snapshot, new: Snapshot) -> bool:
    return {a: v.id for a, v in old.aliases.items()} != {a: v.id for a, v in new.aliases.items()} or old.canary_share != new.canary_share
