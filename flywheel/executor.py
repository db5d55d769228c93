"""Batch stages over workers: in this process, or as Ray tasks on the `[ray]` cluster.

The stages whose work grows with traffic (embedding texts for triage, selection and correction; the rule
judge over captured failures) cut their input into batches and hand them to an `Executor`:
`map(fn, batches)` returns `[fn(batch) for batch in batches]`, in order. `LocalExecutor` does exactly
that; `RayExecutor` runs each batch as a Ray task and gathers the results, so the same input gives the
same output either way (tests/test_ray.py compares them). `fn` must be a module-level function (Ray
sends it by reference) and the cluster's Python must import flywheel (`[ray] runtime_env`).

`executor_for(settings)` picks Ray when train.launcher is "ray" and ray.batch_stages is on; a stage keeps
its single-process path when `executor.distributed` is False.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

GCS_PORT = 6379  # `ray start --head`'s default
TASK_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONNECT_TIMEOUT_S = 5.0


class Executor(Protocol):
    name: str
    distributed: bool

    def map(self, fn: Callable[[T], R], batches: Sequence[T]) -> list[R]: ...


class LocalExecutor:
    name = "local"
    distributed = False

    def map(self, fn: Callable[[T], R], batches: Sequence[T]) -> list[R]:
        return [fn(batch) for batch in batches]


class RayExecutor:
    """Each batch one Ray task (`num_cpus` each) on the cluster at `address` (what ray.init takes:
    "host:port" of the GCS, or "ray://host:10001"); connects on the first `map`."""

    name = "ray"
    distributed = True

    def __init__(self, address: str, runtime_env: dict[str, Any] | None = None, num_cpus: float = 1.0):
        self.address = address
        self.runtime_env = {**(runtime_env or {}), "env_vars": {**TASK_ENV, **dict((runtime_env or {}).get("env_vars") or {})}}
        self.num_cpus = num_cpus

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise UserInputError('Ray is not installed: pip install -e ".[ray]" (or pip install "flywheel[ray]")') from exc
        if not ray.is_initialized():
            _probe(self.address)  # ray.init retries an unreachable address for minutes
            try:
                ray.init(
                    address=self.address,
                    runtime_env=self.runtime_env,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InfrastructureError(f"cannot connect to the Ray cluster at {self.address}: {str(exc).splitlines()[0]}") from exc
        return ray

    def map(self, fn: Callable[[T], R], batches: Sequence[T]) -> list[R]:
        if not batches:
            return []
        ray = self._ray()
        task = ray.remote(num_cpus=self.num_cpus)(_apply)  # Ray wants a plain function; `fn` may be a partial
        refs = [task.remote(fn, batch) for batch in batches]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # the stage's own error (a FlywheelError, or a bug with its traceback)
            raise InfrastructureError(f"a Ray task of {_name(fn)} failed: {str(exc).splitlines()[0]}") from exc
        except ray.exceptions.RayError as exc:  # a worker or node died, the cluster went away
            raise InfrastructureError(f"Ray tasks of {_name(fn)} failed: {str(exc).splitlines()[0]}") from exc


def _apply(fn: Callable[[T], R], batch: T) -> R:
    return fn(batch)


def _name(fn: Any) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", repr(fn))


def _probe(address: str) -> None:
    """One clear line when nothing listens at the cluster address."""
    target = urlparse(address if "://" in address else f"tcp://{address}")
    if not target.hostname:
        raise UserInputError(f"ray.cluster_address {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((target.hostname, target.port or GCS_PORT), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise InfrastructureError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc


def cluster_address(settings: Settings) -> str:
    """What ray.init connects to: ray.cluster_address, else ray.address's host at the GCS port."""
    if settings.ray.cluster_address:
        return settings.ray.cluster_address
    host = urlparse(settings.ray.address).hostname
    if not host:
        raise UserInputError("ray.address is empty or not a URL (e.g. http://head:8265): batch stages cannot find the cluster")
    return f"{host}:{GCS_PORT}"


def executor_for(settings: Settings) -> Executor:
    if settings.train.launcher == "ray" and settings.ray.batch_stages:
        return RayExecutor(cluster_address(settings), settings.ray.runtime_env)
    return LocalExecutor()


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
