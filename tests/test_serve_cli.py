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
from flywheel.store import feedback as feedback_repo
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


def _start_gateway(project: Path, upstream_url: str, port: int, **env: str) -> subprocess.Popen[str]:
    """`flywheel serve --backend proxy` in a child process, returned once it accepts connections."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    command = [sys.executable, "-m", "flywheel.cli", "-C", str(project), "serve", "--backend", "proxy"]
    command += ["--upstream", upstream_url, "--port", str(port)]
    proc = subprocess.Popen(command, env={**clean, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"flywheel serve exited: {proc.communicate()[1][-2000:]}") from None
            assert time.monotonic() < deadline, "flywheel serve did not start"
            time.sleep(0.1)


def test_serve_command_answers_and_flushes_on_sigterm(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(load_settings(project))
    registry.register_base(store, "tiny-base")
    store.dispose()
    assert main(["-C", str(project), "keys", "create", "cli-client"]) == 0
    key = capsys.readouterr().out.strip()

    port = _free_port()
    with OpenAIServer(default="Hello from upstream") as upstream:
        proc = _start_gateway(project, upstream.base_url, port)
        try:
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


@pytest.mark.postgres
def test_three_gateways_capture_into_one_postgresql_without_duplicates(
    project: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three `flywheel serve` processes behind an imaginary load balancer, one PostgreSQL store: every
    answered request is stored exactly once, and feedback sent to another gateway than the one that
    answered is applied once."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import _truncate_all

    _truncate_all(pg_url)
    (project / "flywheel.toml").write_text(f'[store]\nurl = "{pg_url}"\n', encoding="utf-8")
    store = open_store(load_settings(project))
    registry.register_base(store, "tiny-base")
    store.dispose()
    assert main(["-C", str(project), "keys", "create", "lb"]) == 0
    headers = {"authorization": f"Bearer {capsys.readouterr().out.strip()}"}

    def send(port: int, n: int) -> list[str]:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as http:
            body = {"model": "champion", "messages": [{"role": "user", "content": "where is my order"}], "user": f"u{n % 7}"}
            return [http.post("/v1/chat/completions", json=body).headers["x-flywheel-interaction-id"] for _ in range(40)]

    ports = [_free_port() for _ in range(3)]
    gateways: list[subprocess.Popen[str]] = []
    with OpenAIServer(default="It ships tomorrow.") as upstream:
        try:
            gateways = [_start_gateway(project, upstream.base_url, port) for port in ports]
            with ThreadPoolExecutor(max_workers=6) as pool:  # two clients per gateway at once
                served = list(pool.map(send, ports * 2, range(6)))
            ids = [i for batch in served for i in batch]
            # a follow-up for each of the first gateway's interactions, sent to the next gateway
            for interaction_id in served[0]:
                with httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", headers=headers, timeout=30) as http:
                    answer = http.post("/v1/feedback", json={"interaction_id": interaction_id, "kind": "followup"})
                    assert answer.status_code == 202, answer.text
            for gateway in gateways:
                gateway.send_signal(signal.SIGTERM)  # each flushes its queue to the store before it exits
            for gateway in gateways:
                gateway.communicate(timeout=60)
        finally:
            for gateway in gateways:
                if gateway.poll() is None:
                    gateway.kill()
                    gateway.wait()
    assert len(ids) == len(set(ids)) == 240
    store = open_store(load_settings(project))
    try:
        # what triage does first: apply the feedback that raced its interaction's insert on another gateway
        feedback_repo.sweep(store)
        stored = list(interaction_repo.iter_all(store))
        assert sorted(i.id for i in stored) == sorted(ids)  # every answer once, none twice, none lost
        followups = {i.id: i.signals.followups for i in stored}
        assert all(followups[i] == 1 for i in served[0]) and sum(followups.values()) == len(served[0])
    finally:
        store.dispose()
