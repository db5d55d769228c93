"""Running the gateway in tests: a real uvicorn server on a free loopback port, over a real store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from flywheel.context import Context
from flywheel.serve import keys
from flywheel.serve.app import Gateway, create_app
from flywheel.serve.capture import Capture
from flywheel.serve.server import ServerThread
from flywheel.settings import Settings
from flywheel.store.db import Store

FAST = {"routing_refresh_s": 0.05, "keys_refresh_s": 0.2, "store_retry_s": 0.2}


@dataclass
class Running:
    server: ServerThread
    gateway: Gateway
    key: str

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=30)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.key}"} if key != "" else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)

    def settle(self) -> None:
        """Wait until everything accepted so far is in the store (queue empty, spills replayed)."""
        assert self.gateway.capture.wait_idle(timeout=30, replayed=True), self.gateway.capture.stats()


def serve_settings(settings: Settings, **serve: Any) -> Settings:
    return settings.model_copy(update={"serve": settings.serve.model_copy(update={**FAST, **serve})})


@contextmanager
def running_gateway(store: Store, backend: Any, *, capture: Capture | None = None, **serve: Any) -> Iterator[Running]:
    """The gateway over `backend` and `store`, with a fresh API key, refreshing routing every 50 ms."""
    settings = serve_settings(store.settings, **serve)
    ctx = Context(settings=settings, _store=store)
    app = create_app(ctx, backend, capture=capture)
    key = keys.create_key(store, f"test-{uuid.uuid4().hex[:8]}")
    with ServerThread(app) as server:
        yield Running(server=server, gateway=app.state.gateway, key=key)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.02) -> Any:
    """Poll `predicate` until it is truthy (bounded); returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def chat(http: httpx.Client, model: str = "champion", text: str = "hello", user: str | None = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    if user is not None:
        body["user"] = user
    return http.post("/v1/chat/completions", json=body)
