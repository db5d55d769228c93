"""A local OpenAI-compatible chat server that tests start and script.

Real HTTP on 127.0.0.1 (a free port), served from a background thread, so the code under test talks to
it through the real `openai` client or langchain-openai's `ChatOpenAI` exactly as it would to a hosted
endpoint. It speaks `POST /v1/chat/completions` (plain and `stream: true` server-sent events) and
`GET /v1/models`.

Scripting. Each chat request takes its reply from, in order:
  1. the queue (`server.push(...)`, first in first out),
  2. the handler (`OpenAIServer(handler=fn)`, called with the parsed `ChatRequest`),
  3. the default reply (`Reply.text("ok")` unless given).
A reply is a `Reply`, or a shortcut: a `str` is assistant text, a `dict`/`list` is a structured-output
object, a callable is called with the request. `Reply.json(obj)` answers whichever way the client asked
for structured output: as message content for `response_format` (json_schema / json_object), as a call
of the forced tool for `tools` + `tool_choice` (langchain's `method="function_calling"`).
Failures: `Reply.rate_limited(retry_after=...)` (429), `Reply.server_error(500)`, `Reply.garbage()`
(200 with a body that is not JSON), and `.after(seconds)` on any reply to delay it (client timeouts).
`OpenAIServer(delay_s=0.2)` delays every chat reply by a fixed time (the benchmark's fake latency).

Every request is recorded (`server.requests`, `server.chat_requests`) for assertions, and the peak
number of chat requests in flight at once is kept in `server.peak_in_flight`.

LoRA adapters, as vLLM serves them with runtime loading enabled: `POST /v1/load_lora_adapter`
{lora_name, lora_path} adds a model name (400 when the name is loaded already), `POST
/v1/unload_lora_adapter` {lora_name} removes it, `server.loras` maps loaded names to paths and
`/v1/models` lists them after the base models. `OpenAIServer(strict_models=True)` answers 404 to a chat
request for a model that is neither a base model nor a loaded adapter (what vLLM does after a restart).

Use:
    with OpenAIServer(handler=lambda req: {"ok": True}) as server:
        ChatOpenAI(base_url=server.base_url, api_key="x", model="test-model")

or the `openai_server` fixture (import it into a test module: `from openai_server import openai_server`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

_UNSET: Any = object()


# --- what the server received ---------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """One request as the server parsed it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]
    received_at: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def tools(self) -> list[dict[str, Any]]:
        return list(self.body.get("tools") or [])

    @property
    def tool_names(self) -> list[str]:
        return [t.get("function", {}).get("name", "") for t in self.tools]

    @property
    def tool_choice(self) -> Any:
        return self.body.get("tool_choice")

    @property
    def response_format(self) -> dict[str, Any] | None:
        return self.body.get("response_format")

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def forced_tool(self) -> str | None:
        """The tool the client requires the model to call, if it forces one."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            return choice.get("function", {}).get("name")
        if choice in ("required", "any") and len(self.tools) == 1:
            return self.tool_names[0]
        return None

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the client wants the answer to follow: response_format's or the forced tool's."""
        fmt = self.response_format or {}
        if fmt.get("type") == "json_schema":
            return fmt.get("json_schema", {}).get("schema")
        name = self.forced_tool
        for tool in self.tools:
            if name and tool.get("function", {}).get("name") == name:
                return tool["function"].get("parameters")
        return None

    def texts(self, role: str | None = None) -> list[str]:
        """The text of every message (of one role, if given), multi-part contents joined."""
        out = []
        for message in self.messages:
            if role is not None and message.get("role") != role:
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append(content or "")
        return out

    @property
    def text(self) -> str:
        return "\n".join(self.texts())

    @property
    def system_text(self) -> str:
        return "\n".join(self.texts("system"))

    @property
    def last_user_text(self) -> str:
        users = self.texts("user")
        return users[-1] if users else ""


# --- what the server answers ------------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer. Build it with the class methods."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments" (dict or str), "id"?}
    structured: Any = _UNSET
    status: int = 200
    error_message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    delay_s: float = 0.0
    finish_reason: str | None = None
    refusal: str | None = None

    @classmethod
    def text(cls, content: str) -> Reply:
        return cls(content=content)

    @classmethod
    def tool(cls, name: str, arguments: dict[str, Any] | str | None = None, call_id: str | None = None) -> Reply:
        return cls.tools({"name": name, "arguments": arguments or {}, "id": call_id})

    @classmethod
    def tools(cls, *calls: dict[str, Any]) -> Reply:
        return cls(tool_calls=list(calls))

    @classmethod
    def json(cls, obj: Any) -> Reply:
        return cls(structured=obj)

    @classmethod
    def refuse(cls, refusal: str = "I can't help with that.") -> Reply:
        """A structured-output refusal: no content, the `refusal` field set."""
        return cls(refusal=refusal)

    @classmethod
    def rate_limited(cls, retry_after: float | None = None, message: str = "rate limit reached") -> Reply:
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        return cls(status=429, error_message=message, headers=headers)

    @classmethod
    def server_error(cls, status: int = 500, message: str = "internal error") -> Reply:
        return cls(status=status, error_message=message)

    @classmethod
    def client_error(cls, status: int = 400, message: str = "bad request") -> Reply:
        return cls(status=status, error_message=message)

    @classmethod
    def garbage(cls, body: bytes = b"<html>502 upstream hiccup</html>{not json", content_type: str = "application/json") -> Reply:
        return cls(raw_body=body, headers={"content-type": content_type})

    def after(self, seconds: float) -> Reply:
        """This reply, sent `seconds` later (for client timeouts)."""
        return replace(self, delay_s=self.delay_s + seconds)


ReplyLike = Reply | str | dict | list | Callable[[ChatRequest], Any]
Handler = Callable[[ChatRequest], Any]


def as_reply(item: Any, request: ChatRequest) -> Reply | None:
    if callable(item) and not isinstance(item, Reply):
        item = item(request)
    if item is None or isinstance(item, Reply):
        return item
    if isinstance(item, str):
        return Reply.text(item)
    if isinstance(item, (dict, list)):
        return Reply.json(item)
    raise TypeError(f"a scripted reply must be a Reply, str, dict, list or callable, not {type(item).__name__}")


# --- the server -----------------------------------------------------------------------------------------


class OpenAIServer:
    def __init__(
        self,
        handler: Handler | None = None,
        *,
        delay_s: float = 0.0,
        default: ReplyLike = "ok",
        models: tuple[str, ...] = ("test-model",),
        strict_models: bool = False,
    ):
        self.handler = handler
        self.strict_models = strict_models
        self.loras: dict[str, str] = {}  # loaded LoRA adapter name -> path
        self.delay_s = delay_s
        self.default = default
        self.models = models
        self._queue: deque[ReplyLike] = deque()
        self._requests: list[ChatRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._in_flight = 0
        self.peak_in_flight = 0
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> OpenAIServer:
        server = self

        class _Handler(_RequestHandler):
            owner = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        # Many clients connect at once in the benchmark: a deep backlog avoids dropped SYNs (1 s retries).
        httpd.request_queue_size = 256
        httpd.daemon_threads = True
        httpd.block_on_close = False
        httpd.allow_reuse_address = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # wakes delayed replies
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # scripting and inspection
    def push(self, *replies: ReplyLike) -> OpenAIServer:
        with self._lock:
            self._queue.extend(replies)
        return self

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[ChatRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[ChatRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self.peak_in_flight = 0

    def unload_all_loras(self) -> None:
        """Forget every loaded adapter, as a restarted vLLM does."""
        with self._lock:
            self.loras.clear()

    # called by the request handler threads
    def _record(self, request: ChatRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _next_reply(self, request: ChatRequest) -> Reply:
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        reply = as_reply(item, request) if item is not None else None
        if reply is None and self.handler is not None:
            reply = as_reply(self.handler, request)
        if reply is None:
            reply = as_reply(self.default, request)
        assert reply is not None
        return reply

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _wait(self, seconds: float) -> bool:
        """Sleep; False if the server is closing meanwhile."""
        return not self._closing.wait(seconds) if seconds > 0 else True

    def _new_id(self) -> str:
        return f"chatcmpl-{next(self._ids)}-{uuid.uuid4().hex[:8]}"


class _RequestHandler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect
    # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm and the client's
    # delayed ACK hold the body back ~40 ms on keep-alive connections.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet test output

    # --- routing
    def do_GET(self) -> None:
        request = ChatRequest("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, {})
        self.owner._record(request)
        if self.path.rstrip("/").endswith("/models"):
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "flywheel-tests"} for m in self.owner.models]
            data += [
                {"id": name, "object": "model", "created": 0, "owned_by": "flywheel-tests", "root": path, "parent": self.owner.models[0]}
                for name, path in dict(self.owner.loras).items()
            ]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_error(404, f"no route GET {self.path}", "not_found_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            self.owner._record(
                ChatRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, {"_raw": raw.decode("utf-8", "replace")})
            )
            self._send_error(400, f"invalid JSON body: {exc}", "invalid_request_error")
            return
        request = ChatRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.owner._record(request)
        if self.path.rstrip("/").endswith(("/load_lora_adapter", "/unload_lora_adapter")):
            self._lora(request)
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_error(404, f"no route POST {self.path}", "not_found_error")
            return
        self.owner._enter()
        try:
            self._chat(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            self.owner._leave()

    # --- LoRA adapters (vLLM's runtime loading endpoints)
    def _lora(self, request: ChatRequest) -> None:
        name, path = request.body.get("lora_name"), request.body.get("lora_path")
        loras = self.owner.loras
        if self.path.rstrip("/").endswith("/unload_lora_adapter"):
            if name not in loras:
                self._send_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
                return
            with self.owner._lock:
                loras.pop(name, None)
            self._send_bytes(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), {"content-type": "text/plain"})
            return
        if not name or not path:
            self._send_error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            return
        if name in loras:
            self._send_error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            return
        with self.owner._lock:
            loras[name] = path
        self._send_bytes(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), {"content-type": "text/plain"})

    # --- chat completions
    def _chat(self, request: ChatRequest) -> None:
        if self.owner.strict_models and request.model not in self.owner.models and request.model not in self.owner.loras:
            self._send_error(404, f"The model `{request.model}` does not exist.", "NotFoundError")
            return
        try:
            reply = self.owner._next_reply(request)
        except Exception as exc:  # a broken test handler shows up as a 500 naming it, not a hang
            self._send_error(500, f"scripted handler failed: {type(exc).__name__}: {exc}", "server_error")
            return
        if not self.owner._wait(self.owner.delay_s + reply.delay_s):
            self.close_connection = True
            return
        if reply.raw_body is not None:
            self._send_bytes(reply.status, reply.raw_body, {"content-type": "application/json", **reply.headers})
            return
        if reply.status >= 400:
            kind = {429: "rate_limit_error", 400: "invalid_request_error"}.get(reply.status, "server_error")
            self._send_error(reply.status, reply.error_message or "error", kind, reply.headers)
            return
        message = _message_for(reply, request)
        finish = reply.finish_reason or ("tool_calls" if message.get("tool_calls") else "stop")
        usage = _usage(request, message)
        if request.stream:
            self._send_stream(request, message, finish, usage, reply.headers)
        else:
            completion = {
                "id": self.owner._new_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model or self.owner.models[0],
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            }
            self._send_json(200, completion, reply.headers)

    def _send_stream(
        self, request: ChatRequest, message: dict[str, Any], finish: str, usage: dict[str, int], headers: dict[str, str]
    ) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        base = {
            "id": self.owner._new_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model or self.owner.models[0],
        }

        def event(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            self._chunk({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

        event({"role": "assistant", "content": ""})
        for piece in _pieces(message.get("content") or ""):
            event({"content": piece})
        for index, call in enumerate(message.get("tool_calls") or []):
            head = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            event({"tool_calls": [head]})
            for piece in _pieces(call["function"]["arguments"]):
                event({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        event({}, finish)
        if (request.body.get("stream_options") or {}).get("include_usage"):
            self._chunk({**base, "choices": [], "usage": usage})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the terminating zero-length chunk

    # --- low-level writing
    def _chunk(self, obj: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), {"content-type": "application/json", **(headers or {})})

    def _send_error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, headers)

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def _message_for(reply: Reply, request: ChatRequest) -> dict[str, Any]:
    content = reply.content
    calls = list(reply.tool_calls)
    if reply.structured is not _UNSET:
        encoded = json.dumps(reply.structured)
        wants_tool = request.forced_tool or (request.tools and not request.response_format)
        if wants_tool:
            calls.append({"name": request.forced_tool or request.tool_names[0], "arguments": encoded})
        else:
            content = encoded
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": reply.refusal}
    if calls:
        message["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": call["arguments"] if isinstance(call.get("arguments"), str) else json.dumps(call.get("arguments") or {}),
                },
            }
            for call in calls
        ]
    elif content is None and reply.refusal is None:
        message["content"] = ""
    return message


def _usage(request: ChatRequest, message: dict[str, Any]) -> dict[str, int]:
    prompt = len(request.text.split())
    completion = len((message.get("content") or "").split()) + sum(
        len(c["function"]["arguments"]) // 4 for c in message.get("tool_calls") or []
    )
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _pieces(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A started server with an empty script (answers "ok"); script it with push() or `.handler = fn`."""
    with OpenAIServer() as server:
        yield server
