"""Console users: the `console_users` table (names and sha256 hashes of their tokens; flywheel.console.auth
makes the tokens and checks them). Insert, list and revoke are flywheel.store.tokens', shared with API keys."""

from __future__ import annotations

from sqlalchemy import select

from flywheel.store.db import Store
from flywheel.store.schema import console_users
from flywheel.store.tokens import TokenTable

USERS = TokenTable(console_users, "token_hash")
insert, list_all, revoke = USERS.insert, USERS.list_all, USERS.revoke


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
