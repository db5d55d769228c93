"""Console users: the `console_users` table (names and sha256 hashes of their tokens; flywheel.console.auth
makes the tokens and checks them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from flywheel.records import utcnow
from flywheel.store.db import Store
from flywheel.store.schema import console_users


def insert(store: Store, name: str, token_hash: str) -> bool:
    """Store a new active user. False when a user with that name (or token hash) exists already."""
    try:
        with store.begin() as conn:
            conn.execute(console_users.insert().values(name=name, token_hash=token_hash, revoked=False, created_at=utcnow()))
    except IntegrityError:
        return False
    return True


def list_all(store: Store) -> list[dict[str, Any]]:
    """{"name", "revoked", "created_at"} of every user, oldest first."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(console_users.c.name, console_users.c.revoked, console_users.c.created_at).order_by(
                console_users.c.created_at, console_users.c.id
            )
        )
        return [{"name": r.name, "revoked": bool(r.revoked), "created_at": r.created_at} for r in rows]


def revoke(store: Store, name: str) -> dict[str, Any] | None:
    """Revoke the user `name`; their {"name", "created_at"}, or None when there is no such user."""
    with store.begin() as conn:
        row = conn.execute(select(console_users.c.name, console_users.c.created_at).where(console_users.c.name == name)).first()
        if row is None:
            return None
        conn.execute(console_users.update().where(console_users.c.name == name).values(revoked=True))
    return {"name": row.name, "created_at": row.created_at}


def active_user(store: Store, token_hash: str) -> str | None:
    """The name of the active user whose token hashes to `token_hash`, or None."""
    with store.engine.connect() as conn:
        return conn.execute(
            select(console_users.c.name).where(console_users.c.token_hash == token_hash, console_users.c.revoked.is_(False))
        ).scalar()


def is_active(store: Store, name: str) -> bool:
    """Whether `name` is a console user who has not been revoked (checked on every request: a revoked
    user's session ends at once)."""
    with store.engine.connect() as conn:
        found = conn.execute(select(console_users.c.id).where(console_users.c.name == name, console_users.c.revoked.is_(False))).first()
    return found is not None
