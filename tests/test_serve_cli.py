"""`flywheel keys ...` and `flywheel serve` through the real command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai_server import OpenAIServer

from flywheel.cli import main
from flywheel.release import registry
from flywheel.serve.keys import hash_key
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import open_store
from flywheel.store.schema import api_keys


def test_keys_create_list_revoke(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-C", str(project), "keys", "create", "support-bot"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("fw-") and len(key) > 40
    store = open_store(load_settings(project))
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(api_keys.select()).fetchall()
        assert [(r.name, r.key_hash) for r in rows] == [("support-bot", hash_key(key))]  # only the hash is stored
        assert key not in json.dumps([dict(r._mapping) for r in rows], default=str)
    finally:
        store.dispose()
    assert main(["-C", str(project), "keys", "create", "support-bot"]) == 2  # names are unique
    assert "exists already" in capsys.readouterr().err
    assert main(["-C", str(project), "keys", "create", "has space"]) == 2
    capsys.readouterr()
    assert main(["-C", str(project), "keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["revoked"]) for k in listed] == [("support-bot", False)] and "key_hash" not in listed[0]
    assert main(["-C", str(project), "keys", "revoke", "support-bot"]) == 0
    assert main(["-C", str(project), "keys", "revoke", "nobody"]) == 3
    capsys.readouterr()
    assert main(["-C", str(project), "keys", "list"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_serve_refuses_incomplete_setups(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-C", str(project), "serve", "--backend", "proxy"]) == 2
    assert "needs an upstream" in capsys.readouterr().err
    assert main(["-C", str(project), "serve"]) == 2  # built-in, no base model anywhere
    assert "needs a base model" in capsys.readouterr().err
    assert main(["-C", str(project), "serve", "--backend", "gpu"]) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_answers_and_flushes_on_sigterm(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(load_settings(project))
    registry.register_base(store, "tiny-base")
    store.dispose()
    assert main(["-C", str(project), "keys", "create", "cli-client"]) == 0
    key = capsys.readouterr().out.strip()

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    with OpenAIServer(default="Hello from upstream") as upstream:
        proc = subprocess.Popen(
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
                upstream.base_url,
                "--port",
                str(port),
            ],
            env={**env, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    assert proc.poll() is None, proc.communicate()[1]
                    assert time.monotonic() < deadline, "flywheel serve did not start"
                    time.sleep(0.1)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {key}"}, timeout=30) as http:
                ids = []
                for i in range(30):
                    response = http.post(
                        "/v1/chat/completions", json={"model": "champion", "messages": [{"role": "user", "content": f"hi {i}"}]}
                    )
                    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Hello from upstream"
                    ids.append(response.headers["x-flywheel-interaction-id"])
                assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
            proc.send_signal(signal.SIGTERM)  # what a deploy does: the queue must reach the store before exit
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "flywheel gateway (proxy) on http://127.0.0.1" in err
    store = open_store(load_settings(project))
    try:
        assert {i.id for i in interaction_repo.iter_all(store)} == set(ids)
    finally:
        store.dispose()
