"""The two backends behind the gateway, one interface.

    BuiltinBackend(LocalModel(base))   transformers + PEFT in this process: the base model loaded once, each
                                       version's adapter loaded under its version id and switched per batch
    ProxyBackend(upstream_url)         an OpenAI-compatible server such as vLLM started with --enable-lora
                                       (and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): adapters are loaded there
                                       with POST /v1/load_lora_adapter when a version is first routed

`prepare(version)` makes a version servable and is called by the router's refresh thread before the version
is published, so no request waits for an adapter to load. `complete` answers one request; `stream` returns
the chunks of a streamed answer (raising an ApiError before the first chunk when the model cannot answer,
so the client gets a real status code). Both return OpenAI objects; the app sets their id and model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import re
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio
import httpx
import orjson
import yarl

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.release import registry
from flywheel.release.records import ModelVersion
from flywheel.serve import protocol
from flywheel.serve.protocol import ApiError, ChatRequest, message_text

log = logging.getLogger("flywheel.serve")


@dataclass
class Completion:
    body: dict[str, Any]  # an OpenAI chat.completion object
    message: dict[str, Any]  # the answer, as captured
    prompt_tokens: int | None
    completion_tokens: int | None


class Backend(Protocol):
    kind: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def prepare(self, version: ModelVersion) -> None: ...

    async def complete(self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion) -> Completion: ...

    async def stream(
        self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    def describe(self) -> dict[str, Any]: ...


# --- built-in: transformers + PEFT in this process --------------------------------------------------------------


@dataclass
class _Job:
    conversation: list[dict[str, str]]
    max_new_tokens: int
    adapter: str | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class BuiltinBackend:
    """Greedy generation with a LocalModel. Concurrent requests for the same version and token limit are
    generated as one batch by a single worker thread (the model is not thread-safe, and batching is what
    makes a CPU or a small GPU serve more than one user at a time). Sampling parameters are ignored:
    the answers are greedy, as the evaluation's are."""

    kind = "builtin"

    def __init__(self, model: Any, *, max_new_tokens: int = 256, batch_size: int = 8):
        self.model = model  # flywheel.inference.local_model.LocalModel
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.largest_batch = 0

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="flywheel-generate", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await anyio.to_thread.run_sync(self._thread.join, 30)
            self._thread = None

    def prepare(self, version: ModelVersion) -> None:
        base = Path(self.model.base_path).resolve()
        wanted = Path(version.base_model).expanduser()
        if not (wanted.exists() and wanted.resolve() == base):
            raise UserInputError(f"{version.id} runs on base model {version.base_model!r}, but this gateway serves {base}")
        if version.adapter_path is not None:
            folder = registry.verify_adapter(version)  # the recorded sha256 must still match
            self.model.load_adapter(version.id, folder)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_model": str(self.model.base_path),
            "adapters": sorted(self.model.adapters),
            "batches": self.batches,
            "largest_batch": self.largest_batch,
        }

    async def complete(self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion) -> Completion:
        text, finish, prompt_tokens, completion_tokens = await self._generate(request, version)
        message = {"role": "assistant", "content": text, "refusal": None}
        body = protocol.completion(version.id, message, finish, protocol.usage(prompt_tokens, completion_tokens))
        return Completion(body=body, message=message, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def stream(self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion) -> AsyncGenerator[dict[str, Any], None]:
        # LocalModel generates whole answers: the stream carries it in word-sized pieces once it is ready.
        text, finish, prompt_tokens, completion_tokens = await self._generate(request, version)
        return self._chunks(version.id, text, finish, protocol.usage(prompt_tokens, completion_tokens))

    @staticmethod
    async def _chunks(model: str, text: str, finish: str, token_usage: dict[str, int]) -> AsyncGenerator[dict[str, Any], None]:
        yield protocol.chunk(model, {"role": "assistant", "content": ""})
        for piece in re.findall(r"\s*\S+|\s+", text):
            yield protocol.chunk(model, {"content": piece})
        yield protocol.chunk(model, {}, finish)
        yield protocol.usage_chunk(model, token_usage)

    async def _generate(self, request: ChatRequest, version: ModelVersion) -> tuple[str, str, int, int]:
        if request.n not in (None, 1):
            raise ApiError(
                400, "n > 1 is not supported by the built-in backend (its answers are greedy)", param="n", code="unsupported_value"
            )
        limit = min(request.token_limit or self.max_new_tokens, self.max_new_tokens)
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)} for m in request.messages
        ]
        job = _Job(conversation, limit, version.id if version.adapter_path is not None else None)
        if self._thread is None:
            raise ApiError(503, "the built-in backend is not started", type="server_error", code="backend_unavailable")
        self._jobs.put(job)
        generation, prompt_tokens = await asyncio.wrap_future(job.future)
        text, finish = generation.text, "length" if generation.tokens >= limit else "stop"
        cut = min((i for i in (text.find(s) for s in request.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        return text, finish, prompt_tokens, generation.tokens

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < 4 * self.batch_size:  # whatever else is waiting joins, grouped below
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # stop after this round
                    break
                jobs.append(more)
            groups: dict[tuple[str | None, int], list[_Job]] = {}
            for item in jobs:
                groups.setdefault((item.adapter, item.max_new_tokens), []).append(item)
            for (adapter, limit), group in groups.items():
                for start in range(0, len(group), self.batch_size):
                    self._run(adapter, limit, group[start : start + self.batch_size])

    def _run(self, adapter: str | None, limit: int, jobs: list[_Job]) -> None:
        try:
            generations = self.model.generate([j.conversation for j in jobs], max_new_tokens=limit, batch_size=len(jobs), adapter=adapter)
            tokenizer = self.model.tokenizer
            for job, generation in zip(jobs, generations, strict=True):
                prompt = self.model.render(job.conversation, add_generation_prompt=True)
                job.future.set_result((generation, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(jobs))
        except Exception as exc:  # one bad batch fails its requests, not the worker
            log.exception("built-in backend: generation failed")
            error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}"[:300], type="server_error", code="generation_failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)


# --- proxy: an upstream OpenAI-compatible server ------------------------------------------------------------------


def lora_name(version: ModelVersion) -> str:
    """The adapter's name at the upstream: the version id plus its weights' hash, so two projects sharing one
    vLLM never serve each other's v2."""
    return f"{version.id}-{(version.adapter_sha256 or 'unhashed')[:12]}"


class ProxyBackend:
    """Forwards requests to an upstream server over one pool of keep-alive connections.

    Requests go through aiohttp, not httpx: on this path httpx's async client cost about four times the
    CPU and latency per request (0.8 ms vs 0.17 ms CPU, 2.5 ms vs 0.6 ms wall, measured against the
    bench/serve.py upstream), which alone would use up the gateway's 5 ms p99 budget. The adapter
    loading calls come from the router's thread and use httpx's sync client."""

    kind = "proxy"

    def __init__(
        self,
        upstream_url: str,
        *,
        api_key: str | None = None,
        base_model_name: str = "",
        timeout_s: float = 120.0,
        max_connections: int = 256,
        adapter_path_map: dict[str, str] | None = None,
    ):
        if not upstream_url.startswith(("http://", "https://")):
            raise UserInputError(f"upstream URL {upstream_url!r}: expected http://host:port[/v1]")
        url = upstream_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.base_model_name = base_model_name
        self.adapter_path_map = dict(adapter_path_map or {})
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._chat_url = yarl.URL(self.base_url + "/chat/completions")
        self._session: aiohttp.ClientSession | None = None
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self._admin = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self._headers)  # prepare(): sync
        self._names: dict[str, str] = {}  # version id -> the upstream's model name

    async def start(self) -> None:
        if self._session is None:  # created on the serving event loop, which it then belongs to
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(10.0, self.timeout_s)),
                headers=self._headers,
                auto_decompress=True,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._admin.close()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "upstream": self.base_url, "models": dict(self._names)}

    # --- adapters ---------------------------------------------------------------------------------------

    def prepare(self, version: ModelVersion) -> None:
        if version.adapter_path is None:
            self._names[version.id] = self.base_model_name or version.base_model
            return
        if Path(version.adapter_path).exists():
            registry.verify_adapter(version)  # the recorded sha256 must still match
        else:
            log.warning("proxy: %s's adapter %s is not on this machine; the upstream loads it unchecked", version.id, version.adapter_path)
        self._load(version)

    def _load(self, version: ModelVersion) -> None:
        name, path = lora_name(version), self._upstream_path(str(version.adapter_path))
        try:
            response = self._admin.post("/load_lora_adapter", content=orjson.dumps({"lora_name": name, "lora_path": path}))
        except httpx.HTTPError as exc:
            raise InfrastructureError(f"cannot reach the upstream at {self.base_url} to load {version.id}'s adapter: {exc}") from exc
        if response.status_code == 200 or (response.status_code == 400 and "already" in response.text):
            self._names[version.id] = name
            log.info("proxy: %s is loaded at the upstream as %s", version.id, name)
            return
        hint = " (start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)" if response.status_code in (404, 405) else ""
        raise InfrastructureError(
            f"the upstream refused to load {version.id}'s adapter from {path}: HTTP {response.status_code} {response.text[:200]}{hint}"
        )

    def _upstream_path(self, local: str) -> str:
        for prefix, remote in self.adapter_path_map.items():
            if local.startswith(prefix):
                return remote + local[len(prefix) :]
        return local

    def _name(self, version: ModelVersion) -> str:
        name = self._names.get(version.id)
        if name is None:  # not prepared by the router (should not happen): the base or the lora name
            name = self.base_model_name or version.base_model if version.adapter_path is None else lora_name(version)
        return name

    # --- requests ---------------------------------------------------------------------------------------

    async def complete(self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion) -> Completion:
        body = orjson.dumps({**payload, "model": self._name(version)})
        status, content, headers = await self._post(body)
        if status == 404 and version.adapter_path is not None:
            await self._reload(version)  # the upstream restarted and lost the adapter
            status, content, headers = await self._post(body)
        if status != 200:
            raise _upstream_error(status, content, headers)
        try:
            data = orjson.loads(content)
            message = data["choices"][0]["message"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ApiError(
                502,
                f"the upstream answered with a body that is not a chat completion: {content[:200]!r}",
                type="server_error",
                code="bad_upstream_response",
            ) from None
        token_usage = data.get("usage") or {}
        return Completion(
            body=data,
            message=message,
            prompt_tokens=token_usage.get("prompt_tokens"),
            completion_tokens=token_usage.get("completion_tokens"),
        )

    async def stream(self, payload: dict[str, Any], request: ChatRequest, version: ModelVersion) -> AsyncGenerator[dict[str, Any], None]:
        # The gateway always asks for usage (it stores token counts); the app drops that chunk for clients
        # that did not ask for it.
        body = orjson.dumps(
            {**payload, "model": self._name(version), "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}}
        )
        response = await self._open(body)
        if response.status == 404 and version.adapter_path is not None:
            response.release()
            await self._reload(version)
            response = await self._open(body)
        if response.status != 200:
            try:
                content = await response.read()
            except aiohttp.ClientError:
                content = b""
            finally:
                response.release()
            raise _upstream_error(response.status, content, response.headers)
        return self._chunks(response)

    async def _chunks(self, response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise ApiError(
                        502,
                        f"the upstream sent an event that is not JSON: {data[:120]!r}",
                        type="server_error",
                        code="bad_upstream_response",
                    ) from None
                if "error" in obj:
                    raise ApiError(502, f"the upstream failed mid-stream: {_message_of(obj)}", type="server_error", code="upstream_error")
                yield obj
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ApiError(
                502, f"the upstream stream broke: {type(exc).__name__}: {exc}", type="server_error", code="upstream_error"
            ) from exc
        finally:
            response.release()

    def _session_or_503(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ApiError(503, "the proxy backend is not started", type="server_error", code="backend_unavailable")
        return self._session

    async def _post(self, body: bytes) -> tuple[int, bytes, Any]:
        try:
            async with self._session_or_503().post(self._chat_url, data=body) as response:
                return response.status, await response.read(), response.headers
        except TimeoutError as exc:
            raise _timeout(exc) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    async def _open(self, body: bytes) -> aiohttp.ClientResponse:
        try:
            return await self._session_or_503().post(self._chat_url, data=body)
        except TimeoutError as exc:
            raise _timeout(exc) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(
            502,
            f"cannot reach the upstream model server at {self.base_url}: {type(exc).__name__}: {exc}",
            type="server_error",
            code="upstream_unavailable",
        )

    async def _reload(self, version: ModelVersion) -> None:
        try:
            await anyio.to_thread.run_sync(self._load, version)
        except InfrastructureError as exc:
            raise ApiError(
                503, f"{version.id} cannot be served now: {exc}", type="server_error", param="model", code="model_unavailable"
            ) from exc


def _timeout(exc: Exception) -> ApiError:
    return ApiError(
        504, f"the upstream model server did not answer in time ({type(exc).__name__})", type="server_error", code="upstream_timeout"
    )


def _message_of(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):  # vLLM's older ErrorResponse: {"object": "error", "message": ...}
            return str(body["message"])
    return str(body)[:300]


def _upstream_error(status: int, content: bytes, headers: Any) -> ApiError:
    """The upstream's error as the client's: its own 4xx passes through (a bad parameter is the caller's
    to fix), anything that is the gateway's or the upstream's fault becomes a 502."""
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = content[:300].decode("utf-8", "replace")
    message = _message_of(body)
    if status in (401, 403):
        return ApiError(
            502, f"the upstream refused the gateway's credentials (HTTP {status}): {message}", type="server_error", code="upstream_auth"
        )
    if status == 404:
        return ApiError(
            502,
            f"the upstream does not serve the model the gateway asked for (set serve.upstream_model?): {message}",
            type="server_error",
            code="upstream_model_not_found",
        )
    if status == 429:
        retry = {"retry-after": headers["retry-after"]} if "retry-after" in headers else None
        return ApiError(
            429, f"the upstream is rate limiting: {message}", type="rate_limit_error", code="rate_limit_exceeded", headers=retry
        )
    if 400 <= status < 500:
        kind = body.get("error", {}).get("type") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
        return ApiError(status, message, type=kind or "invalid_request_error", code="upstream_rejected")
    return ApiError(502, f"the upstream failed (HTTP {status}): {message}", type="server_error", code="upstream_error")
