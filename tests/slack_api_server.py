"""A local stand-in for the Slack Web API (and the Socket Mode websocket), for tests run offline.

The real `slack_sdk.WebClient` talks to it over HTTP on loopback (`base_url=server.api_url`); the real
Socket Mode client connects to its websocket. It speaks the parts of Slack's protocol flywheel uses:

  auth.test, chat.postMessage, chat.update, chat.postEphemeral, views.open, conversations.history,
  conversations.list, apps.connections.open (returns the local ws:// URL)

Every call is recorded (`calls`, `calls_to(method)`), messages are kept per channel so `chat.update`
and `conversations.history` behave like Slack's (newest first, metadata only when asked for), and the
answers are Slack-shaped JSON (`{"ok": false, "error": "..."}` with HTTP 200 for API errors, as Slack
does). Tokens are checked: a bot token for the Web API, an app-level token for apps.connections.open.

`accept_then_drop(method)`: the next call of `method` takes effect but the connection is closed before
the answer, as when Slack accepted a message and the network failed on the way back.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

BOT_USER = "U0FLYBOT"
TEAM = "T0TEAM"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None


@dataclass
class SlackState:
    bot_token: str
    app_token: str | None
    channels: dict[str, str] = field(default_factory=lambda: {"approvals": "C0APPROVALS", "general": "C0GENERAL"})
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # channel id -> oldest first
    ephemeral: list[dict[str, Any]] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    drop_next: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: itertools.count = field(default_factory=lambda: itertools.count(1))


class SlackApiServer:
    """`with SlackApiServer(bot_token=..., app_token=...) as slack:` ... `slack.api_url` for the WebClient."""

    def __init__(self, bot_token: str = "xoxb-test-token", app_token: str | None = "xapp-test-token", socket_mode: bool = False):
        self.state = SlackState(bot_token=bot_token, app_token=app_token)
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="slack-api", daemon=True)
        self.socket = SocketModeServer() if socket_mode else None

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> SlackApiServer:
        self._thread.start()
        if self.socket is not None:
            self.socket.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.socket is not None:
            self.socket.stop()
        self._http.shutdown()
        self._http.server_close()

    @property
    def api_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/api/"

    # --- what happened ----------------------------------------------------------------------------------
    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def messages(self, channel: str = "C0APPROVALS") -> list[dict[str, Any]]:
        with self.state.lock:
            return [dict(m) for m in self.state.messages.get(channel, [])]

    @property
    def ephemeral(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.ephemeral)

    @property
    def views(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.views)

    def accept_then_drop(self, method: str) -> None:
        with self.state.lock:
            self.state.drop_next.add(method)

    def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "a condition") -> Any:
        """Poll `predicate()` until it returns something truthy (the work happens on other threads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; calls so far: {[c.method for c in self.calls]}")

    # --- the API -----------------------------------------------------------------------------------------
    def handle(self, method: str, params: dict[str, Any], token: str | None) -> dict[str, Any]:
        s = self.state
        with s.lock:
            s.calls.append(Call(method, params, token))
            if method == "apps.connections.open":
                if not s.app_token or token != s.app_token:
                    return {"ok": False, "error": "invalid_auth"}
                if self.socket is None:
                    return {"ok": False, "error": "not_allowed_token_type"}
                return {"ok": True, "url": self.socket.url}
            if token != s.bot_token:
                return {"ok": False, "error": "not_authed" if not token else "invalid_auth"}
            handler = getattr(self, "_" + method.replace(".", "_"), None)
            if handler is None:
                return {"ok": False, "error": "unknown_method"}
            return handler(params)

    def _ts(self) -> str:
        return f"{int(time.time())}.{next(self.state.clock):06d}"

    def _channel_id(self, channel: str | None) -> str | None:
        if not channel:
            return None
        name = channel.lstrip("#")
        if name in self.state.channels:
            return self.state.channels[name]
        return channel if channel in self.state.channels.values() else None

    def _auth_test(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://flywheel-test.slack.com/",
            "team": "flywheel test",
            "user": "flywheel",
            "team_id": TEAM,
            "user_id": BOT_USER,
            "bot_id": "B0FLYBOT",
            "is_enterprise_install": False,
        }

    def _chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel_id(params.get("channel"))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if not params.get("text") and not params.get("blocks"):
            return {"ok": False, "error": "no_text"}
        message = {
            "type": "message",
            "user": BOT_USER,
            "bot_id": "B0FLYBOT",
            "ts": self._ts(),
            "text": params.get("text", ""),
            "blocks": _json(params.get("blocks")) or [],
            "metadata": _json(params.get("metadata")),
            "thread_ts": params.get("thread_ts"),
        }
        self.state.messages.setdefault(channel, []).append(message)
        return {"ok": True, "channel": channel, "ts": message["ts"], "message": _visible(message, True)}

    def _chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel_id(params.get("channel"))
        for message in self.state.messages.get(channel or "", []):
            if message["ts"] == params.get("ts"):
                message["text"] = params.get("text", message["text"])
                if params.get("blocks") is not None:
                    message["blocks"] = _json(params.get("blocks"))
                message["edited"] = {"user": BOT_USER, "ts": self._ts()}
                return {"ok": True, "channel": channel, "ts": message["ts"], "text": message["text"], "message": _visible(message, True)}
        return {"ok": False, "error": "message_not_found" if channel else "channel_not_found"}

    def _chat_postEphemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel_id(params.get("channel"))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if not params.get("user"):
            return {"ok": False, "error": "user_not_in_channel"}
        self.state.ephemeral.append(
            {"channel": channel, "user": params["user"], "text": params.get("text", ""), "blocks": _json(params.get("blocks"))}
        )
        return {"ok": True, "message_ts": self._ts()}

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        if not params.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        view = dict(_json(params.get("view")) or {})
        view.update({"id": f"V{next(self.state.clock):08d}", "team_id": TEAM, "hash": self._ts()})
        self.state.views.append({"trigger_id": params["trigger_id"], "view": view})
        return {"ok": True, "view": view}

    def _conversations_history(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        if channel not in self.state.channels.values():
            return {"ok": False, "error": "channel_not_found"}
        oldest = float(params.get("oldest") or 0)
        limit = int(params.get("limit") or 100)
        with_metadata = str(params.get("include_all_metadata", "")).lower() in ("1", "true")
        found = [m for m in reversed(self.state.messages.get(channel, [])) if float(m["ts"]) >= oldest]
        page = [_visible(m, with_metadata) for m in found[:limit]]
        return {"ok": True, "messages": page, "has_more": len(found) > limit, "response_metadata": {"next_cursor": ""}}

    def _conversations_list(self, _params: dict[str, Any]) -> dict[str, Any]:
        channels = [{"id": cid, "name": name, "is_channel": True, "is_member": True} for name, cid in self.state.channels.items()]
        return {"ok": True, "channels": channels, "response_metadata": {"next_cursor": ""}}


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _visible(message: dict[str, Any], with_metadata: bool) -> dict[str, Any]:
    shown = {k: v for k, v in message.items() if v is not None and k != "metadata"}
    if with_metadata and message.get("metadata"):
        shown["metadata"] = message["metadata"]
    return shown


def _handler(server: SlackApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:  # quiet
            pass

        def _params(self) -> dict[str, Any]:
            url = urlparse(self.path)
            params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            kind = self.headers.get("Content-Type", "")
            if raw and "json" in kind:
                params.update(json.loads(raw))
            elif raw:
                params.update({k: v[-1] for k, v in parse_qs(raw.decode()).items()})
            return params

        def _answer(self) -> None:
            url = urlparse(self.path)
            if not url.path.startswith("/api/"):
                self.send_error(404)
                return
            method = url.path[len("/api/") :]
            auth = self.headers.get("Authorization", "")
            params = self._params()
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else params.get("token")
            result = server.handle(method, params, token)
            with server.state.lock:
                drop = method in server.state.drop_next
                server.state.drop_next.discard(method)
            if drop:  # took effect; the answer is lost on the way back
                self.close_connection = True
                self.connection.shutdown(2)
                return
            body = json.dumps(result).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _answer
        do_POST = _answer

    return Handler


# --- Socket Mode ---------------------------------------------------------------------------------------------


class SocketModeServer:
    """Slack's Socket Mode end, on a local websocket: says hello, pushes envelopes, collects the acks.

    `push(type_, payload)` sends an envelope ({"envelope_id", "type", "payload", "accepts_response_payload"})
    to the connected app and returns its id; `ack_for(envelope_id)` waits for the app's acknowledgement."""

    def __init__(self) -> None:
        self._outbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.acks: dict[str, dict[str, Any]] = {}
        self.connected = threading.Event()
        self._ids = itertools.count(1)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        host, port = self._server.socket.getsockname()[:2]
        return f"ws://{host}:{port}/link/?ticket=test"

    def start(self) -> None:
        from websockets.sync.server import serve

        self._server = serve(self._connection, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self._server.serve_forever, name="slack-socket-mode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()

    def push(self, type_: str, payload: dict[str, Any], retry_attempt: int = 0) -> str:
        envelope_id = f"env-{next(self._ids)}"
        self._outbox.put(
            {
                "envelope_id": envelope_id,
                "type": type_,
                "payload": payload,
                "accepts_response_payload": type_ != "events_api",
                "retry_attempt": retry_attempt,
                "retry_reason": "timeout" if retry_attempt else "",
            }
        )
        return envelope_id

    def ack_for(self, envelope_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if envelope_id in self.acks:
                return self.acks[envelope_id]
            time.sleep(0.02)
        raise AssertionError(f"no ack for {envelope_id}")

    def _connection(self, conn: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        conn.send(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": 1,
                    "connection_info": {"app_id": "A0FLY"},
                    "debug_info": {"host": "local", "approximate_connection_time": 3600},
                }
            )
        )
        self.connected.set()
        try:
            while not self._stop.is_set():
                try:
                    envelope = self._outbox.get_nowait()
                    conn.send(json.dumps(envelope))
                except queue.Empty:
                    pass
                try:
                    text = conn.recv(timeout=0.05)
                except TimeoutError:
                    continue
                data = json.loads(text)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = data
        except ConnectionClosed:
            pass
