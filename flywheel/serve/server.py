"""Running an ASGI app with uvicorn: the gateway in the foreground (`flywheel serve`), or any app from a
background thread on a free loopback port or a given one (`ServerThread`: the Slack HTTP endpoint, and the
tests and the benchmark, which talk to the gateway over real HTTP)."""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from flywheel.errors import InfrastructureError

LOOPBACK = "127.0.0.1"


def serve_forever(app: Any, host: str, port: int, *, access_log: bool = False, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then runs the app's shutdown, which flushes the capture queue.

    A shorter GIL switch interval: the capture writer and the routing thread share the interpreter with the
    event loop, and the default 5 ms slice shows up directly in the p99 latency of requests (bench/serve.py:
    p99 16 ms with 5 ms, 7 ms with 1 ms, no better below). gc.freeze() after the imports keeps the garbage
    collector's full passes from walking the hundreds of thousands of objects a loaded process holds."""
    sys.setswitchinterval(0.001)
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app, host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30
    )
    uvicorn.Server(config).run()


class ServerThread:
    """A uvicorn server in a daemon thread on 127.0.0.1 and a free port (port=0) or a given one.

    The socket is bound by `bind()` (or by `start()`), before the thread starts, so that port 0 gives a
    known port and a taken port is an OSError in the caller's thread. `what` names the server in errors."""

    def __init__(
        self, app: Any, host: str = LOOPBACK, port: int = 0, *, name: str = "flywheel-gateway", what: str = "the gateway", **config: Any
    ):
        self.app = app
        self.host = host
        self.name = name
        self.what = what
        self._port = port
        self._config = {"log_level": "warning", "access_log": False, "lifespan": "on", **config}
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None, "the server is not started"
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def bind(self) -> ServerThread:
        """Bind the listening socket (once); raises OSError when the address is taken or not ours."""
        if self._socket is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self._port))
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.bind()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, **self._config))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise InfrastructureError(f"{self.what} did not start on {self.host}:{self.port} (see the log above)")
            if time.monotonic() > deadline:
                raise InfrastructureError(f"{self.what} did not start on {self.host}:{self.port} within {timeout:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: in-flight requests finish, then the app's shutdown flushes capture."""
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
