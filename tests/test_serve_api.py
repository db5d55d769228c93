"""The gateway's OpenAI-compatible API through the proxy backend: the official openai client and
langchain-openai against it over real HTTP, what every answer records, and bad input in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langchain_openai import ChatOpenAI
from openai_server import OpenAIServer, Reply
from release_helpers import candidate
from serve_helpers import Running, chat, running_gateway, wait_until

from flywheel.release import registry
from flywheel.serve import keys
from flywheel.serve.backends import ProxyBackend, lora_name
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store

PII_TEXT = "I am jane.doe@example.com, card 4111 1111 1111 1111, call +44 20 7946 0958"


@pytest.fixture
def upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(models=("tiny-base",), strict_models=True, default="Refunds take five days.") as server:
        yield server


@pytest.fixture
def gw(store: Store, upstream: OpenAIServer, tmp_path: Path) -> Iterator[Running]:
    registry.register_base(store, "tiny-base")  # v1, champion
    candidate(store, tmp_path, seed=2)  # v2, gate passed, not routed
    with running_gateway(store, ProxyBackend(upstream.base_url)) as running:
        yield running


def test_openai_client_plain_and_streamed(gw: Running, store: Store, upstream: OpenAIServer) -> None:
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model="champion", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PII_TEXT}], user="user-1"
    )
    answer = raw.parse()
    interaction_id = raw.headers["x-flywheel-interaction-id"]
    assert raw.headers["x-flywheel-model-version"] == "v1"
    assert answer.id == interaction_id and answer.model == "v1"
    assert answer.choices[0].message.content == "Refunds take five days."
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens == 4
    assert upstream.chat_requests[-1].model == "tiny-base"  # the upstream got its own name for the base model

    pieces, usage, ids = [], None, set()
    with client.chat.completions.with_streaming_response.create(
        model="champion",
        messages=[{"role": "user", "content": "when is my refund?"}],
        stream=True,
        stream_options={"include_usage": True},
        user="user-2",
    ) as response:
        streamed_id = response.headers["x-flywheel-interaction-id"]
        for chunk in response.parse():
            ids.add(chunk.id)
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
    assert "".join(pieces) == "Refunds take five days." and ids == {streamed_id}
    assert usage is not None and usage.completion_tokens == 4

    gw.settle()
    stored = interaction_repo.get(store, interaction_id)
    assert stored is not None and stored.model_version == "v1" and stored.user_id == "user-1"
    assert stored.source.startswith("gateway:test-")
    assert stored.latency_ms is not None and stored.latency_ms > 0
    assert (stored.prompt_tokens, stored.completion_tokens) == (answer.usage.prompt_tokens, 4)
    user_text = stored.last_user_text()
    assert "jane.doe@example.com" not in user_text and "4111" not in user_text and "7946" not in user_text
    assert "[EMAIL]" in user_text and "[CARD]" in user_text and "[PHONE]" in user_text
    assert stored.messages[-1].role == "assistant" and stored.messages[-1].content == "Refunds take five days."
    streamed = interaction_repo.get(store, streamed_id)
    assert streamed is not None and streamed.messages[-1].content == "Refunds take five days." and streamed.completion_tokens == 4


def test_stream_without_usage_option_sends_no_usage_chunk(gw: Running) -> None:
    chunks = list(gw.client().chat.completions.create(model="champion", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_langchain_chat_openai(gw: Running, store: Store) -> None:
    model = ChatOpenAI(base_url=gw.base_url, api_key=gw.key, model="champion", max_retries=0, timeout=30)
    reply = model.invoke("Where is my refund?")
    assert reply.content == "Refunds take five days."
    assert reply.response_metadata["model_name"] == "v1"
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] == 4
    streamed = list(model.stream("Where is my refund?"))
    assert "".join(str(c.content) for c in streamed) == "Refunds take five days."
    gw.settle()
    assert interaction_repo.count(store) == 2


def test_models_listing_and_versions_by_id(gw: Running, store: Store, upstream: OpenAIServer) -> None:
    client = gw.client()
    assert [m.id for m in client.models.list()] == ["champion", "v1"]
    assert client.models.retrieve("champion").version == "v1"
    answer = client.chat.completions.create(model="v2", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "v2"
    v2 = registry.resolve(store, "v2")
    assert upstream.loras == {lora_name(v2): v2.adapter_path}  # loaded at the upstream when first routed
    assert upstream.chat_requests[-1].model == lora_name(v2)
    assert [m.id for m in client.models.list()] == ["champion", "v1", "v2"]
    with pytest.raises(openai.NotFoundError, match="no version is canary"):
        client.chat.completions.create(model="canary", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="v99", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


def test_the_upstream_losing_an_adapter_reloads_it(gw: Running, upstream: OpenAIServer) -> None:
    client = gw.client()
    assert client.chat.completions.create(model="v2", messages=[{"role": "user", "content": "hi"}]).model == "v2"
    upstream.unload_all_loras()  # vLLM restarted
    assert client.chat.completions.create(model="v2", messages=[{"role": "user", "content": "again"}]).model == "v2"
    loads = [r for r in upstream.requests if r.path.endswith("/load_lora_adapter")]
    assert len(loads) == 2


def test_missing_invalid_and_revoked_keys_get_401(gw: Running, store: Store) -> None:
    for key in ("", "fw-not-a-key"):
        with gw.http(key) as http:
            for method, path in (
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("POST", "/v1/feedback"),
                ("GET", "/health"),
                ("GET", "/nowhere"),
            ):
                response = http.request(method, path, json={"model": "champion"})
                assert response.status_code == 401, (key, path)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
                # the body says how to get a key: the first 401 is often where people learn keys exist
                assert "flywheel keys create NAME" in error["message"] and "Authorization: Bearer <key>" in error["message"], error
    with pytest.raises(openai.AuthenticationError) as refused:
        gw.client("fw-wrong").models.list()
    assert "flywheel keys create" in str(refused.value)

    fresh = keys.create_key(store, "fresh-client")  # works at once: an unknown key re-reads the table
    assert gw.client(fresh).models.list().data
    keys.revoke_key(store, "fresh-client")

    def refused() -> bool:
        return gw.http(fresh).get("/v1/models").status_code == 401

    wait_until(refused)


def test_bad_input_answers_in_openai_shape(gw: Running) -> None:
    http = gw.http()
    cases = [
        (http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json", None),
        (http.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json", None),
        (http.post("/v1/chat/completions", content=b""), 400, "invalid_json", None),
        (
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}),
            400,
            "missing_required_parameter",
            "model",
        ),
        (http.post("/v1/chat/completions", json={"model": "champion", "messages": []}), 400, "invalid_value", "messages"),
        (chat(http, stream="yes"), 400, "invalid_value", "stream"),
        (
            http.post("/v1/chat/completions", json={"model": "champion", "messages": [{"role": "user", "content": 5}]}),
            400,
            "invalid_value",
            "messages[0].content",
        ),
        (
            http.post("/v1/chat/completions", json={"model": "champion", "messages": [{"role": "robot", "content": "x"}]}),
            400,
            "invalid_value",
            "messages[0].role",
        ),
        (chat(http, max_tokens="5"), 400, "invalid_value", "max_tokens"),
        (chat(http, model="gpt-4o"), 404, "model_not_found", "model"),
        (http.post("/v1/chat/completions", content=b"{" + b" " * 1_100_000 + b"}"), 413, "request_too_large", None),
        (http.get("/v1/nowhere"), 404, "unknown_url", None),
        (http.get("/v1/chat/completions"), 405, "method_not_allowed", None),
        (
            http.post(
                "/v1/chat/completions",
                json={"model": "champion", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-flywheel-user-tier": "x" * 500},
            ),
            400,
            "invalid_value",
            "x-flywheel-user-tier",
        ),
    ]
    for response, status, code, param in cases:
        assert response.status_code == status, (response.status_code, response.text[:200])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == code and error["param"] == param and error["message"], error
    # the official client raises its usual types
    client = gw.client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="champion", messages=[{"role": "user", "content": 5}])  # type: ignore[list-item]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="champion", messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert too_big.value.status_code == 413


def test_upstream_failures_become_gateway_errors(gw: Running, upstream: OpenAIServer) -> None:
    http = gw.http()
    upstream.push(Reply.server_error(500, "engine crashed"))
    response = chat(http)
    assert response.status_code == 502 and "engine crashed" in response.json()["error"]["message"]
    upstream.push(Reply.client_error(400, "max_tokens is too large"))
    response = chat(http)
    assert response.status_code == 400 and response.json()["error"]["message"] == "max_tokens is too large"
    upstream.push(Reply.rate_limited(retry_after=3))
    response = chat(http)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    upstream.push(Reply.garbage())
    assert chat(http).status_code == 502
    upstream.push(Reply.server_error(503, "overloaded"))
    streamed = chat(http, stream=True)
    assert streamed.status_code == 502  # before the first byte: a real status, not an event
    assert chat(http).status_code == 200


def test_an_unreachable_upstream_is_a_502(store: Store) -> None:
    registry.register_base(store, "tiny-base")
    with running_gateway(store, ProxyBackend("http://127.0.0.1:9/v1")) as gw:
        response = chat(gw.http())
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unavailable"
        gw.settle()
    assert interaction_repo.count(store) == 0  # nothing was answered, nothing is stored


def test_health_reports_routing_and_capture(gw: Running) -> None:
    health = gw.http().get("/health").json()
    assert health["status"] == "ok" and health["routing"]["champion"] == "v1" and health["backend"]["kind"] == "proxy"
    assert health["capture"]["lost"] == 0


def test_without_a_champion_requests_get_404(store: Store, upstream: OpenAIServer) -> None:
    with running_gateway(store, ProxyBackend(upstream.base_url)) as gw:
        response = chat(gw.http())
        assert response.status_code == 404 and "no version is champion" in response.json()["error"]["message"]
        registry.register_base(store, "tiny-base")  # the registry gets a champion: no restart needed
        wait_until(lambda: chat(gw.http()).status_code == 200)


def test_proxy_rejects_a_bad_upstream_url() -> None:
    from flywheel.errors import UserInputError

    with pytest.raises(UserInputError, match="upstream URL"):
        ProxyBackend("127.0.0.1:8000")
    assert ProxyBackend("http://127.0.0.1:8000").base_url == "http://127.0.0.1:8000/v1"


def test_closed_versions_are_not_served(gw: Running, store: Store) -> None:
    from flywheel.release import approvals

    approvals.reject(store, "v2", "alice", "worse on refunds")
    response = chat(gw.http(), model="v2")
    assert response.status_code == 404 and "rejected" in response.json()["error"]["message"]
