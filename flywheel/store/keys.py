"""API keys of the gateway: the `api_keys` table (names and sha256 hashes; flywheel.serve.keys makes them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from flywheel.records import utcnow
from flywheel.store.db import Store
from flywheel.store.schema import api_keys


def insert(store: Store, name: str, key_hash: str) -> bool:
    """Store a new active key. False when a key with that name (or hash) exists already."""
    try:
        with store.begin() as conn:
            conn.execute(api_keys.insert().values(name=name, key_hash=key_hash, revoked=False, created_at=utcnow()))
    except IntegrityError:
        return False
    return True


def list_all(store: Store) -> list[dict[str, Any]]:
    """{"name", "revoked", "created_at"} of every key, oldest first."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(api_keys.c.name, api_keys.c.revoked, api_keys.c.created_at).order_by(api_keys.c.created_at, api_keys.c.id)
        )
        return [{"name": r.name, "revoked": bool(r.revoked), "created_at": r.created_at} for r in rows]


def revoke(store: Store, name: str) -> dict[str, Any] | None:
    """Revoke the key named `name`; its {"name", "created_at"}, or None when there is no such key."""
    with store.begin() as conn:
        row = conn.execute(select(api_keys.c.name, api_keys.c.created_at).where(api_keys.c.name == name)).first()
        if row is None:
            return None
        conn.execute(api_keys.update().where(api_keys.c.name == name).values(revoked=True))
    return {"name": row.name, "created_at": row.created_at}


def active_hashes(store: Store) -> dict[str, str]:
    """key hash -> client name, of every key not revoked."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(api_keys.c.key_hash, api_keys.c.name).where(api_keys.c.revoked.is_(False))).fetchall()
    return {r.key_hash: r.name for r in rows}
