"""Canary routing and registry changes under traffic, through the proxy backend and an instant upstream."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai_server import OpenAIServer
from release_helpers import candidate
from serve_helpers import Running, chat, running_gateway, wait_until

from flywheel.release import approvals, canary, registry
from flywheel.serve.backends import ProxyBackend
from flywheel.serve.routing import bucket
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store


@pytest.fixture
def upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(models=("tiny-base",), strict_models=True) as server:
        yield server


@pytest.fixture
def gw(store: Store, upstream: OpenAIServer, tmp_path: Path) -> Iterator[Running]:
    registry.register_base(store, "tiny-base")  # v1 champion
    candidate(store, tmp_path, seed=2)  # v2
    candidate(store, tmp_path, seed=3)  # v3
    with running_gateway(store, ProxyBackend(upstream.base_url), capture_batch=512) as running:
        yield running


def _versions_for(gw: Running, users: list[str], threads: int = 8) -> list[str]:
    """The version that answered each user's request, in order (real HTTP, a few clients in parallel)."""
    local = threading.local()

    def one(user: str) -> str:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=gw.server.url, headers={"authorization": f"Bearer {gw.key}"}, timeout=30)
        response = chat(local.http, user=user)
        assert response.status_code == 200, response.text
        return response.headers["x-flywheel-model-version"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, users))


def test_bucket_is_stable_and_uniform() -> None:
    assert bucket("alice", "v2") == bucket("alice", "v2")
    assert bucket("alice", "v2") != bucket("alice", "v3")  # each canary draws its own users
    positions = [bucket(f"user-{i}", "v2") for i in range(20_000)]
    assert all(0 <= p < 1 for p in positions)
    for share in (0.05, 0.3, 0.5):
        assert abs(sum(p < share for p in positions) / len(positions) - share) < 0.015


def test_canary_share_within_tolerance_and_sticky_per_user(gw: Running, store: Store) -> None:
    canary.start_canary(store, "v2", share=0.3)
    wait_until(lambda: gw.gateway.router.snapshot.canary_share == 0.3)
    users = [f"user-{i}" for i in range(3000)]
    served = _versions_for(gw, users)
    counts = Counter(served)
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v2"] / len(users) - 0.3) < 0.04, counts  # ~5 standard deviations at n=3000

    # sticky: the same users again, in another order, land exactly where they landed before
    again = dict(zip(users[::-1], _versions_for(gw, users[::-1])))
    assert all(again[u] == v for u, v in zip(users, served))
    # the stored interactions say which version served each answer (what the canary monitor compares)
    gw.settle()
    stored = Counter(i.model_version for i in interaction_repo.iter_all(store))
    assert stored == Counter(served) + Counter(again.values())

    # raising the share keeps everyone already on the canary there
    canary.start_canary(store, "v2", share=0.5)
    wait_until(lambda: gw.gateway.router.snapshot.canary_share == 0.5)
    sample = users[:600]
    raised = _versions_for(gw, sample)
    assert all(r == "v2" for s, r in zip(served[:600], raised) if s == "v2")
    assert abs(raised.count("v2") / len(sample) - 0.5) < 0.08

    canary.stop_canary(store, actor="ops")
    wait_until(lambda: gw.gateway.router.snapshot.canary_share == 0.0)
    assert set(_versions_for(gw, users[:200])) == {"v1"}


def test_requests_without_a_user_are_spread_at_random(gw: Running, store: Store) -> None:
    canary.start_canary(store, "v2", share=0.5)
    wait_until(lambda: gw.gateway.router.snapshot.canary_share == 0.5)
    with gw.http() as http:
        served = Counter(chat(http).headers["x-flywheel-model-version"] for _ in range(200))
    assert served["v1"] > 40 and served["v2"] > 40


def test_canary_alias_and_header_user(gw: Running, store: Store) -> None:
    canary.start_canary(store, "v3", share=0.2)
    wait_until(lambda: gw.gateway.router.snapshot.canary_share == 0.2)
    with gw.http() as http:
        assert chat(http, model="canary").headers["x-flywheel-model-version"] == "v3"
        on_canary = next(u for u in (f"h{i}" for i in range(1000)) if bucket(u, "v3") < 0.2)
        response = http.post(
            "/v1/chat/completions",
            json={"model": "champion", "messages": [{"role": "user", "content": "x"}]},
            headers={"x-flywheel-user": on_canary},
        )
        assert response.headers["x-flywheel-model-version"] == "v3"
    gw.settle()
    stored = interaction_repo.get(store, response.headers["x-flywheel-interaction-id"])
    assert stored is not None and stored.user_id == on_canary and stored.model_version == "v3"


def test_promotion_and_rollback_during_load_fail_no_request(gw: Running, store: Store) -> None:
    approvals.record_approval(store, "v2", "approved", "alice", "terminal")
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def load(slot: int) -> None:
        with gw.http() as http:
            for i in range(3000):  # bounded; normally stopped much earlier
                if stop.is_set():
                    return
                response = chat(http, user=f"load-{slot}-{i}")
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    seen[slot].append(response.headers["x-flywheel-model-version"])

    workers = [threading.Thread(target=load, args=(slot,)) for slot in range(4)]
    for worker in workers:
        worker.start()
    wait_until(lambda: all(len(s) >= 20 for s in seen))
    approvals.promote(store, store.settings, "v2", actor="ops")
    wait_until(lambda: all(s[-20:] == ["v2"] * 20 for s in seen))
    approvals.rollback(store, actor="ops", reason="drill")
    wait_until(lambda: all(s[-20:] == ["v1"] * 20 for s in seen))
    stop.set()
    for worker in workers:
        worker.join(30)
    assert not failures
    for versions in seen:
        # each client saw v1, then v2, then v1 again: every switch took effect once and stayed
        runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        assert runs == ["v1", "v2", "v1"], runs
    gw.settle()
    assert interaction_repo.count(store) == sum(len(s) for s in seen)


def test_a_tampered_adapter_is_never_served(gw: Running, store: Store, upstream: OpenAIServer) -> None:
    v3 = registry.resolve(store, "v3")
    weights = Path(v3.adapter_path or "") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    approvals.record_approval(store, "v3", "approved", "alice", "terminal")
    approvals.promote(store, store.settings, "v3", actor="ops")
    # the registry says v3, but its weights no longer match: the gateway keeps serving v1 and says why
    wait_until(lambda: "v3" in gw.gateway.router.describe()["unservable"])
    with gw.http() as http:
        assert chat(http).headers["x-flywheel-model-version"] == "v1"
        response = chat(http, model="v3")
        assert response.status_code == 503 and "sha256" in response.json()["error"]["message"]
    assert not any(name.startswith("v3-") for name in upstream.loras)


def test_a_champion_that_cannot_load_is_a_503_not_a_404(store: Store, upstream: OpenAIServer, tmp_path: Path) -> None:
    registry.register_base(store, "tiny-base")
    v2 = candidate(store, tmp_path, seed=2)
    approvals.record_approval(store, "v2", "approved", "alice", "terminal")
    approvals.promote(store, store.settings, "v2", actor="ops")
    weights = Path(v2.adapter_path or "") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with running_gateway(store, ProxyBackend(upstream.base_url)) as gw:  # started with nothing servable
        response = chat(gw.http())
        assert response.status_code == 503
        assert "champion is v2, which cannot be served now" in response.json()["error"]["message"]
        assert gw.http().get("/health").json()["status"] == "degraded"
