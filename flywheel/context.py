"""The handles one command or one agent run works with, opened on first use and closed together.

The CLI builds one `Context` in `main()`; the agent's tools and the gateway receive it. Nothing in
flywheel connects to a database, an index or a model at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.store.db import Store
    from flywheel.store.vectors import VectorIndex


@dataclass
class Context:
    settings: Settings
    _store: "Store | None" = field(default=None, repr=False)
    _index: "VectorIndex | None" = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def store(self) -> "Store":
        if self._store is None:
            from flywheel.store.db import open_store

            self._store = open_store(self.settings)
        return self._store

    @property
    def index(self) -> "VectorIndex":
        if self._index is None:
            from flywheel.store.vectors import open_index

            self._index = open_index(self.settings)
        return self._index

    def close(self) -> None:
        if self._store is not None:
            self._store.dispose()
            self._store = None
        if self._index is not None:
            self._index.close()
            self._index = None
