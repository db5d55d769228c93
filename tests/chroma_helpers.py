"""A real Chroma server (`chroma run`, shipped with chromadb) on a free loopback port, for the tests that
run the index as a server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def chroma_server(folder: Path) -> Iterator[int]:
    """Start `chroma run` with its data in `folder`, yield its port once it accepts connections, stop it after."""
    exe = shutil.which("chroma")
    if exe is None:
        pytest.fail("the chroma CLI is missing: chromadb installs it, so the install is broken")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "chroma.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [exe, "run", "--path", str(folder / "data"), "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None:
                    pytest.fail(f"chroma run exited: {log_path.read_text()[-500:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"chroma run did not listen on {port} within 60 s: {log_path.read_text()[-500:]}")
                time.sleep(0.2)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
