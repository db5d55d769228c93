"""API keys of the gateway: the `api_keys` table (names and sha256 hashes; flywheel.serve.keys makes them).
Insert, list and revoke are flywheel.store.tokens', shared with console users."""

from __future__ import annotations

from sqlalchemy import select

from flywheel.store.db import Store
from flywheel.store.schema import api_keys
from flywheel.store.tokens import TokenTable

KEYS = TokenTable(api_keys, "key_hash")
insert, list_all, revoke = KEYS.insert, KEYS.list_all, KEYS.revoke


def active_hashes(store: Store) -> dict[str, str]:
    """key hash -> client name, of every key not revoked."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(api_keys.c.key_hash, api_keys.c.name).where(api_keys.c.revoked.is_(False))).fetchall()
    return {r.key_hash: r.name for r in rows}
