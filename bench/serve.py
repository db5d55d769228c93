"""Gateway overhead: the same instant upstream called directly and through `flywheel serve` (proxy backend,
capture on), at a fixed concurrency, in one run.

    python bench/serve.py [--requests 3000] [--concurrency 4] [--rounds 3]

Three processes on loopback: an upstream that answers every chat completion instantly with a fixed body
(uvicorn + a bare ASGI app), the gateway started through the real CLI (`flywheel serve --backend proxy`,
SQLite store, capture on), and this process as the load generator: `concurrency` keep-alive connections,
each sending its next request when the last one answered. The two targets alternate in rounds so machine
noise hits both alike. Added latency = gateway percentile - direct percentile. After the run the gateway's
/health must show every request captured and nothing lost. FLYWHEEL_SERVE__* variables reach the gateway
(e.g. FLYWHEEL_SERVE__ROUTING_REFRESH_S=60 to take the routing refresh out of the picture); `--no-capture`
runs it without capture. Prints one JSON object last.

What it showed on the 2-core development machine shared with other jobs (load average 4-9):
concurrency 1: added p50 0.4-0.5 ms, p99 4-9 ms; concurrency 4: added p50 1.1-1.5 ms, p99 5-9 ms,
~1,400-2,300 requests/s through the gateway. The p99 moved as much between identical runs as between runs
with and without capture or the routing refresh: it is the machine's scheduling (a bare client calling the
bare upstream alone showed p99 2.2 ms at the same time), not a cost of the gateway. The gateway's own CPU is
~0.3 ms per request (cProfile of the request path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXED = json.dumps(
    {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-base",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Your refund was issued today."},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }
).encode()
BODY = json.dumps(
    {
        "model": "champion",
        "messages": [
            {"role": "system", "content": "You are a support agent for an online shop."},
            {"role": "user", "content": "Hi, I was charged twice for order 5512, can I get a refund?"},
        ],
    }
).encode()


# --- the upstream: a fixed answer, nothing else ----------------------------------------------------------------


async def upstream_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(FIXED)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": FIXED})


def run_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the load generator: a minimal keep-alive HTTP/1.1 client -----------------------------------------------


async def _connection(port: int, path: str, headers: bytes, count: int, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {len(BODY)}\r\n").encode()
        + headers
        + b"\r\n"
        + BODY
    )
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000.0)
            if not status.startswith(b"HTTP/1.1 200"):
                errors.append(status.decode().strip())
    finally:
        writer.close()


async def load(port: int, path: str, headers: bytes, requests: int, concurrency: int) -> tuple[list[float], float, list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    per = requests // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, path, headers, per, latencies, errors) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


# --- orchestration -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "mean": round(float(arr.mean()), 3),
    }


def prepare_project(folder: Path) -> str:
    from flywheel.release import registry
    from flywheel.serve import keys
    from flywheel.settings import load_settings
    from flywheel.store.db import open_store

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "flywheel.toml").exists():
        (folder / "flywheel.toml").write_text(
            "# bench/serve.py's project: every setting at its default\n", encoding="utf-8"
        )  # the CLI refuses a folder without one
    store = open_store(load_settings(folder))
    try:
        registry.register_base(store, "bench-base")
        return keys.create_key(store, "bench")
    finally:
        store.dispose()


def gateway_health(port: int, key: str) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health", headers={"authorization": f"Bearer {key}"}, timeout=10).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per target per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--no-capture", action="store_true", help="run the gateway without capture (to see what capture costs)")
    parser.add_argument("--role", choices=["bench", "upstream"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port)
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("FLYWHEEL_") or k.startswith("FLYWHEEL_SERVE__")}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-serve-") as tmp:
        project = Path(tmp)
        key = prepare_project(project)
        up_port, gw_port = free_port(), free_port()
        upstream = subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port)], env=env)
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flywheel.cli",
                "-C",
                str(project),
                "serve",
                "--backend",
                "proxy",
                "--upstream",
                f"http://127.0.0.1:{up_port}/v1",
                "--port",
                str(gw_port),
                *(["--no-capture"] if args.no_capture else []),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(up_port, upstream)
            wait_port(gw_port, gateway)
            auth = f"authorization: Bearer {key}\r\n".encode()
            targets = {"direct": (up_port, b""), "gateway": (gw_port, auth)}
            for port, headers in targets.values():  # warm both: connections, caches, the JIT-less paths
                asyncio.run(load(port, "/v1/chat/completions", headers, args.warmup, args.concurrency))
            latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
            seconds: dict[str, float] = {"direct": 0.0, "gateway": 0.0}
            errors: list[str] = []
            for _ in range(args.rounds):
                for name, (port, headers) in targets.items():
                    lat, took, errs = asyncio.run(load(port, "/v1/chat/completions", headers, args.requests, args.concurrency))
                    latencies[name] += lat
                    seconds[name] += took
                    errors += errs
            sent = args.warmup + args.rounds * (args.requests // args.concurrency) * args.concurrency
            deadline = time.monotonic() + 60
            health = gateway_health(gw_port, key)
            while not args.no_capture and health["capture"]["stored"] < sent and time.monotonic() < deadline:
                time.sleep(0.2)
                health = gateway_health(gw_port, key)
        finally:
            gateway.terminate()
            upstream.terminate()
            gateway.wait(30)
            upstream.wait(30)
    direct, through = percentiles(latencies["direct"]), percentiles(latencies["gateway"])
    result = {
        "benchmark": "serve",
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "concurrency": args.concurrency,
        "capture": not args.no_capture,
        "requests_per_target": len(latencies["gateway"]),
        "direct_ms": direct,
        "gateway_ms": through,
        "added_ms": {"p50": round(through["p50"] - direct["p50"], 3), "p99": round(through["p99"] - direct["p99"], 3)},
        "requests_per_s": {
            "direct": round(len(latencies["direct"]) / seconds["direct"], 1),
            "gateway": round(len(latencies["gateway"]) / seconds["gateway"], 1),
        },
        "errors": len(errors),
        "captured": health["capture"]["stored"],
        "sent_to_gateway": sent,
        "capture_lost": health["capture"]["lost"],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
