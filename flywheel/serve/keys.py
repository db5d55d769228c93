"""API keys: one per client of the gateway, shown once at creation, stored only as a sha256.

    key = create_key(store, "support-bot")      # "fw-..." : print it, it is never shown again
    list_keys(store) / revoke_key(store, "support-bot")

The gateway checks keys against `KeyCache`, an in-memory copy of the active key hashes that a background
thread re-reads every `serve.keys_refresh_s`, so the request path never waits on the store and a
revocation takes effect within that interval without a restart. A key the cache does not know triggers
one early re-read, so a key created a moment ago works at once; the same unknown key does so at most
every MISS_REFRESH_S and all unknown keys together at most MISS_REFRESHES_PER_S times a second, so a
flood of wrong keys costs the store a few small reads.

Why sha256 and not a slow password hash: the keys are 256-bit random tokens, not passwords a person
chose; nothing can be guessed from a fast hash of one, and the gateway checks one per request.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Record
from flywheel.store import keys as key_repo
from flywheel.store.db import Store

log = logging.getLogger("flywheel.serve")

KEY_PREFIX = "fw-"
MAX_NAME = 200  # the width of api_keys.name and console_users.name
MISS_REFRESH_S = 2.0
MISS_REFRESHES_PER_S = 10


class ApiKey(Record):
    name: str
    revoked: bool
    created_at: datetime


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_name(name: str, missing: str, label: str = "key name") -> str:
    """A name for a stored secret (an API key's client, a console user): stripped, non-empty, printable,
    without spaces, within the column. `missing` is the message for an empty one."""
    name = name.strip()
    if not name:
        raise UserInputError(missing)
    if len(name) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise UserInputError(f"{label} {name[:40]!r}: use up to {MAX_NAME} printable characters without spaces")
    return name


def create_key(store: Store, name: str) -> str:
    """A new key for client `name`. Returns the key itself; only its sha256 is stored."""
    name = check_name(name, "a key needs a name (the client it is for), e.g. `flywheel keys create support-bot`")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    if not key_repo.insert(store, name, hash_key(key)):
        raise UserInputError(f"a key named {name!r} exists already (revoked keys keep their name); choose another name")
    return key


def list_keys(store: Store) -> list[ApiKey]:
    return [ApiKey(**row) for row in key_repo.list_all(store)]


def revoke_key(store: Store, name: str) -> ApiKey:
    """Revoke the key named `name` (revoking it again changes nothing). The gateway refuses it within
    serve.keys_refresh_s."""
    row = key_repo.revoke(store, name)
    if row is None:
        raise NotFoundError(f"no API key named {name!r} (see `flywheel keys list`)")
    return ApiKey(revoked=True, **row)


class KeyCache:
    """Active key hashes -> client name, re-read from the store in the background."""

    def __init__(self, store: Store, refresh_s: float = 1.0):
        self.store = store
        self.refresh_s = refresh_s
        self._by_hash: dict[str, str] = {}
        self._lock = threading.Lock()
        self._misses: dict[str, float] = {}  # unknown key hash -> when it last caused a re-read
        self._recent_rereads: list[float] = []
        self.loaded = False  # at least one read succeeded

    def refresh(self) -> bool:
        """Re-read the active keys. False (and the old table kept) when the store cannot be read."""
        try:
            by_hash = key_repo.active_hashes(self.store)
        except SQLAlchemyError as exc:
            log.warning("cannot re-read API keys (keeping the %d known): %s", len(self._by_hash), str(exc).splitlines()[0])
            return False
        self._by_hash = by_hash  # one assignment: readers see the old or the new table
        self.loaded = True
        return True

    def client_for(self, key: str) -> str | None:
        return self._by_hash.get(hash_key(key))

    def claim_miss_refresh(self, key: str) -> bool:
        """True when a request with this unknown key may re-read the table now."""
        now = time.monotonic()
        digest = hash_key(key)
        with self._lock:
            if now - self._misses.get(digest, -MISS_REFRESH_S) < MISS_REFRESH_S:
                return False
            self._recent_rereads = [t for t in self._recent_rereads if now - t < 1.0]
            if len(self._recent_rereads) >= MISS_REFRESHES_PER_S:
                return False
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[digest] = now
            self._recent_rereads.append(now)
            return True

    def __len__(self) -> int:
        return len(self._by_hash)
