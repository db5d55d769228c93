"""Persistence: the SQL store (SQLite or PostgreSQL), the Chroma index, artifact files."""

from flywheel.store.db import Store, open_store

__all__ = ["Store", "open_store"]
