"""The handles one command or one agent run works with, opened on first use and closed together.

The CLI builds one `Context` in `main()`; the agent's tools and the gateway receive it. Nothing in
flywheel connects to a database, an index or a model at import time.

Besides the handles, a run may plug in who does what a deployment leaves to people and real traffic
(the demo's simulated labeller and canary users, a test's model loader); each has its own field, None
meaning the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.data.labelling import Labeller
    from flywheel.evals.generate import ModelLoader
    from flywheel.store.db import Store
    from flywheel.store.vectors import VectorIndex
    from flywheel.trainer.launcher import Launcher

ProgressSink = Callable[[dict[str, Any]], None]  # takes {"message": ..., **details}
CanaryTraffic = Callable[[str, float, Callable[[str], None]], Any]  # (canary version, share, say): serves its users now


@dataclass
class Context:
    settings: Settings
    _store: Store | None = field(default=None, repr=False)
    _index: VectorIndex | None = field(default=None, repr=False)
    # The job launcher; trainer.launcher.get_launcher makes a local one on first use and keeps it, since
    # it remembers the children it started.
    launcher: Launcher | None = field(default=None, repr=False)
    # Who answers label requests (flywheel.tools.labels); None: they are queued in a file for people.
    labeller: Labeller | None = field(default=None, repr=False)
    # Serves the canary's users before an observation (flywheel.tools.canary; the demo's simulated
    # users); None: the gateway serves them as they come.
    canary_traffic: CanaryTraffic | None = field(default=None, repr=False)
    # Run state: the canary version `canary_traffic` has already served, so each canary is served once.
    canary_served: str | None = None
    # Loads the models an evaluation compares (flywheel.tools.evals); None: the real models.
    eval_model_loader: ModelLoader | None = field(default=None, repr=False)
    # Where tools report the progress of long steps (tools.base.report_progress); the agent's tool
    # node sets it for the length of one call. None: progress is dropped.
    progress: ProgressSink | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        if self._store is None:
            from flywheel.store.db import open_store

            self._store = open_store(self.settings)
        return self._store

    @property
    def index(self) -> VectorIndex:
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
