"""The gateway's HTTP app: OpenAI-compatible chat completions over the registry's champion and canary,
every answer captured, feedback recorded.

    app = create_app(ctx, ProxyBackend("http://127.0.0.1:8000/v1"))     # or BuiltinBackend(LocalModel(base))
    uvicorn.run(app, host="127.0.0.1", port=8080)                     # `flywheel serve` does this

Routes (every one needs `Authorization: Bearer <key>` from `flywheel keys create`):
    POST /v1/chat/completions   `model` is an alias (champion, canary, previous) or a version id (v3);
                                plain JSON or server-sent events (`stream: true`), OpenAI's formats
    GET  /v1/models[/{model}]   what is served now, in OpenAI's list format
    POST /v1/feedback           signals on an answer (flywheel.serve.feedback)
    GET  /health                routing, capture and backend state

Each answer carries `x-flywheel-interaction-id` (also its completion id: feedback refers to it) and
`x-flywheel-model-version` (the version that produced it, as stored in interactions.model_version).
Optional request headers: `x-flywheel-user` (when the body has no `user`: the canary's sticky key and the
stored user id), `x-flywheel-user-tier`, `x-flywheel-intent`.

The request path touches no database: routing and keys come from snapshots a background thread refreshes,
capture goes through a queue (flywheel.serve.capture). Starlette rather than FastAPI: the gateway validates
its few fields itself and answers errors in OpenAI's shape, and every microsecond counts here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.context import Context
from flywheel.release.records import ModelVersion
from flywheel.serve import feedback as feedback_mod
from flywheel.serve.backends import Backend
from flywheel.serve.capture import Capture, Served
from flywheel.serve.keys import KeyCache
from flywheel.serve.protocol import (
    INTENT_HEADER,
    INTERACTION_HEADER,
    SSE_DONE,
    TIER_HEADER,
    USER_HEADER,
    VERSION_HEADER,
    ApiError,
    ChatRequest,
    StreamAccumulator,
    new_interaction_id,
    parse_json_object,
    sse,
    validate,
)
from flywheel.serve.routing import Router
from flywheel.settings import Settings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store

log = logging.getLogger("flywheel.serve")

RECENT_IDS = 100_000  # interaction ids feedback may name without a store lookup
MAX_TIER = 100  # interactions.user_tier width
MAX_INTENT = 200
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read to its end before the 413
HOW_TO_GET_A_KEY = (
    "create one with `flywheel keys create NAME` in the gateway's project (it prints the key once) "
    "and send it as 'Authorization: Bearer <key>' (docs/serving.md)"
)


@dataclass
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    store: Store
    backend: Backend
    router: Router
    keys: KeyCache
    capture: Capture
    capture_interactions: bool = True
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _poller: _Poller | None = None

    def served(self, item: Served) -> None:
        self.recent[item.id] = None
        if len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)
        if self.capture_interactions:
            self.capture.submit(item)

    def interaction_exists(self, interaction_id: str) -> bool | None:
        """Whether the store holds the interaction; None when the store cannot be asked."""
        try:
            return interaction_repo.get(self.store, interaction_id) is not None
        except SQLAlchemyError:
            return None


class _Poller(threading.Thread):
    """Re-reads the registry's aliases and the API keys in the background."""

    def __init__(self, gateway: Gateway):
        super().__init__(name="flywheel-routing", daemon=True)
        self.gateway = gateway
        self._stop_event = threading.Event()

    def run(self) -> None:
        cfg = self.gateway.settings.serve
        next_keys = time.monotonic() + cfg.keys_refresh_s
        while not self._stop_event.wait(cfg.routing_refresh_s):
            try:
                self.gateway.router.refresh()
                if time.monotonic() >= next_keys:
                    self.gateway.keys.refresh()
                    next_keys = time.monotonic() + cfg.keys_refresh_s
            except Exception:  # a bug here must not stop routing updates for good
                log.exception("routing refresh failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# --- authentication -----------------------------------------------------------------------------------------


class _ApiKeyAuth:
    """Pure ASGI middleware: every HTTP request needs an active key; the client's name goes into the scope."""

    def __init__(self, app: ASGIApp, keys: KeyCache):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = _bearer(scope)
        client = self.keys.client_for(key) if key else None
        if client is None and key and self.keys.claim_miss_refresh(key):  # a key created a moment ago
            await anyio.to_thread.run_sync(self.keys.refresh)
            client = self.keys.client_for(key)
        if client is None:
            # The body says how to get a key: a first request is often the first time anyone hears of keys.
            message = (
                f"Incorrect API key provided (unknown or revoked): {HOW_TO_GET_A_KEY}"
                if key
                else f"You didn't provide an API key: {HOW_TO_GET_A_KEY}"
            )
            error = ApiError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


# --- request helpers ----------------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 when it is over `limit`. An oversized body is still read (and dropped, up to
    DRAIN_LIMIT) before answering: a server that answers while the client is still sending makes many
    clients report a reset connection instead of the 413."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    parts, size = [], 0
    if not too_big or int(declared or 0) <= DRAIN_LIMIT:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                too_big = True
                if size > DRAIN_LIMIT:
                    break
                continue
            parts.append(part)
    if too_big:
        shown = declared if declared is not None and declared.isdigit() else f"over {limit}"
        raise ApiError(
            413,
            f"The request body is {shown} bytes, over this gateway's limit of {limit} bytes (serve.max_body_bytes)",
            code="request_too_large",
        )
    return b"".join(parts)


def _header(request: Request, name: str, limit: int) -> str | None:
    value = request.headers.get(name)
    if value is not None and len(value) > limit:
        raise ApiError(400, f"Header {name} is {len(value)} characters, over {limit}", param=name, code="invalid_value")
    return value or None


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


# --- routes -------------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    payload = parse_json_object(await _read_body(request, gw.settings.serve.max_body_bytes))
    chat: ChatRequest = validate(ChatRequest, payload)
    user = chat.user or _header(request, USER_HEADER, 10_000)
    meta = {
        "user_id": user,
        "user_tier": _header(request, TIER_HEADER, MAX_TIER),
        "intent": _header(request, INTENT_HEADER, MAX_INTENT),
        "client": request.scope["state"].get("client"),
    }
    version = gw.router.route(chat.model, user)
    if version is None:  # a version id asked for by name: look it up and prepare it off the event loop
        version = await anyio.to_thread.run_sync(gw.router.load_version, chat.model)
    interaction_id = new_interaction_id()
    timestamp = gw.capture.stamp()
    started = time.perf_counter()
    headers = {INTERACTION_HEADER: interaction_id, VERSION_HEADER: version.id}
    if chat.stream:
        return await _stream(gw, payload, chat, version, interaction_id, timestamp, started, headers, meta)
    result = await gw.backend.complete(payload, chat, version)
    latency_ms = (time.perf_counter() - started) * 1000.0
    body = result.body
    body["id"], body["model"] = interaction_id, version.id
    gw.served(
        Served(
            id=interaction_id,
            timestamp=timestamp,
            model_version=version.id,
            messages=[*payload["messages"], result.message],
            latency_ms=latency_ms,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            **meta,
        )
    )
    return _json(body, headers=headers)


async def _stream(
    gw: Gateway,
    payload: dict[str, Any],
    chat: ChatRequest,
    version: ModelVersion,
    interaction_id: str,
    timestamp: Any,
    started: float,
    headers: dict[str, str],
    meta: dict[str, Any],
) -> Response:
    chunks = await gw.backend.stream(payload, chat, version)  # raises before the first byte: a real status code

    async def events() -> AsyncIterator[bytes]:
        answer = StreamAccumulator()
        finished = False
        try:
            async for obj in chunks:
                obj["id"], obj["model"] = interaction_id, version.id
                answer.add(obj)
                if not obj.get("choices") and obj.get("usage") is not None:
                    if chat.include_usage:  # the final usage chunk, only for clients that asked for it
                        yield sse(obj)
                    continue
                if not chat.include_usage:
                    obj.pop("usage", None)
                yield sse(obj)
            finished = True
            yield SSE_DONE
        except ApiError as exc:  # the stream already started: the error travels as an event (openai raises on it)
            yield sse(exc.body())
        finally:
            await chunks.aclose()
            # An answer the client did not receive to the end (it disconnected, the upstream broke) is not stored.
            if finished:
                prompt_tokens, completion_tokens = answer.tokens()
                gw.served(
                    Served(
                        id=interaction_id,
                        timestamp=timestamp,
                        model_version=version.id,
                        messages=[*payload["messages"], answer.message()],
                        latency_ms=(time.perf_counter() - started) * 1000.0,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        **meta,
                    )
                )

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
    )


def _model_card(name: str, version: ModelVersion) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(version.created_at.timestamp()),
        "owned_by": "flywheel",
        "version": version.id,
        "status": str(version.status),
    }


async def list_models(request: Request) -> Response:
    cards = [_model_card(name, version) for name, version in _gateway(request).router.listing()]
    return _json({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    gw = _gateway(request)
    name = request.path_params["model"]
    version = gw.router.route(name, None) if name != "champion" else gw.router.snapshot.aliases.get("champion")
    if version is None:
        version = await anyio.to_thread.run_sync(gw.router.load_version, name)
    return _json(_model_card(name, version))


async def post_feedback(request: Request) -> Response:
    gw = _gateway(request)
    payload = parse_json_object(await _read_body(request, gw.settings.serve.max_body_bytes))
    asked = validate(feedback_mod.FeedbackRequest, payload)
    item = feedback_mod.normalise(asked, request.scope["state"].get("client"), gw.settings.policies.max_message_chars)
    if item.interaction_id not in gw.recent:
        known = await anyio.to_thread.run_sync(gw.interaction_exists, item.interaction_id)
        if known is False:
            raise ApiError(
                404,
                f"No interaction {item.interaction_id!r}: use the id this gateway returned (x-flywheel-interaction-id)",
                param="interaction_id",
                code="interaction_not_found",
            )
    gw.capture.submit(item)
    return _json(
        {"object": "feedback", "interaction_id": item.interaction_id, "kind": item.kind, "value": item.value, "status": "accepted"},
        status=202,
    )


async def health(request: Request) -> Response:
    gw = _gateway(request)
    routing = gw.router.describe()
    capture = gw.capture.stats()
    ok = routing["champion"] is not None and routing["registry_reachable"] and capture["store_ok"]
    return _json(
        {
            "status": "ok" if ok else "degraded",
            "backend": gw.backend.describe(),
            "routing": routing,
            "capture": capture,
            "keys": len(gw.keys),
        }
    )


# --- errors in OpenAI's shape ---------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path} (this gateway serves /v1/chat/completions, /v1/models, /v1/feedback, /health)"
        return ApiError(404, message, code="unknown_url").response()
    if exc.status_code == 405:
        return ApiError(
            405, f"Method {request.method} is not allowed on {request.url.path}", code="method_not_allowed", headers=dict(exc.headers or {})
        ).response()
    return ApiError(exc.status_code, str(exc.detail)).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"Internal gateway error: {type(exc).__name__}", type="server_error", code="internal_error").response()


# --- the factory ----------------------------------------------------------------------------------------------


def create_app(ctx: Context, backend: Backend, *, capture: Capture | None = None) -> Starlette:
    """The gateway over `backend`, routing by the registry in `ctx.store`. Starting it (the ASGI lifespan)
    starts the backend, reads routing and keys once, and starts the capture writer and the refresh thread;
    stopping it flushes the capture queue."""
    settings = ctx.settings
    store = ctx.store
    gateway = Gateway(
        settings=settings,
        store=store,
        backend=backend,
        router=Router(store, backend),
        keys=KeyCache(store, settings.serve.keys_refresh_s),
        capture=capture or Capture(store, settings),
        capture_interactions=settings.serve.capture,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.start()
        await anyio.to_thread.run_sync(gateway.keys.refresh)
        await anyio.to_thread.run_sync(gateway.router.refresh)
        if not gateway.keys.loaded:
            log.warning("API keys could not be read: every request is refused until the store answers")
        elif not len(gateway.keys):
            log.warning("no API keys: every request gets 401; create one with `flywheel keys create NAME`")
        gateway.capture.start()
        gateway._poller = _Poller(gateway)
        gateway._poller.start()
        try:
            yield
        finally:
            gateway._poller.stop()
            await anyio.to_thread.run_sync(gateway.capture.close)
            await backend.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/feedback", post_feedback, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_ApiKeyAuth, keys=gateway.keys)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
