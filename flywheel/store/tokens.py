"""Named secrets stored only as a sha256: the gateway's API keys (`api_keys`) and the console's users
(`console_users`). Both tables hold a unique name, the unique hash, `revoked` and `created_at`; a
`TokenTable` is the insert / list / revoke they share, each table's own lookups stay in its module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError

from flywheel.records import utcnow
from flywheel.store.db import Store


@dataclass(frozen=True)
class TokenTable:
    table: Table
    hash_column: str  # the column holding the sha256 ("key_hash", "token_hash")

    def insert(self, store: Store, name: str, token_hash: str) -> bool:
        """Store a new active entry. False when one with that name (or hash) exists already."""
        try:
            with store.begin() as conn:
                conn.execute(self.table.insert().values(name=name, revoked=False, created_at=utcnow(), **{self.hash_column: token_hash}))
        except IntegrityError:
            return False
        return True

    def list_all(self, store: Store) -> list[dict[str, Any]]:
        """{"name", "revoked", "created_at"} of every entry, oldest first."""
        c = self.table.c
        with store.engine.connect() as conn:
            rows = conn.execute(select(c.name, c.revoked, c.created_at).order_by(c.created_at, c.id))
            return [{"name": r.name, "revoked": bool(r.revoked), "created_at": r.created_at} for r in rows]

    def revoke(self, store: Store, name: str) -> dict[str, Any] | None:
        """Revoke the entry `name` (again: no change); its {"name", "created_at"}, or None when there is none."""
        c = self.table.c
        with store.begin() as conn:
            row = conn.execute(select(c.name, c.created_at).where(c.name == name)).first()
            if row is None:
                return None
            conn.execute(self.table.update().where(c.name == name).values(revoked=True))
        return {"name": row.name, "created_at": row.created_at}
