"""The scripted OpenAI-compatible server, exercised through the real `openai` client and langchain-openai."""

from __future__ import annotations

import json
import threading
import time
from typing import Literal

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai_server import ChatRequest, OpenAIServer, Reply, openai_server  # noqa: F401 - fixture
from pydantic import BaseModel

USER = [{"role": "user", "content": "hello"}]


def client(server: OpenAIServer, timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=timeout)


def chat(server: OpenAIServer, **kw) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.base_url, api_key="x", model="test-model", max_retries=0, timeout=5, **kw)


class Verdict(BaseModel):
    is_failure: bool
    severity: Literal["low", "high"]


# --- the openai client ---------------------------------------------------------------------------------------


def test_plain_text_and_the_request_is_recorded(openai_server: OpenAIServer) -> None:
    openai_server.push("first", Reply.text("second"))
    c = client(openai_server)
    a = c.chat.completions.create(model="m1", messages=USER)
    b = c.chat.completions.create(model="m2", messages=[{"role": "system", "content": "sys"}, *USER])
    third = c.chat.completions.create(model="m3", messages=USER)
    assert [a.choices[0].message.content, b.choices[0].message.content, third.choices[0].message.content] == ["first", "second", "ok"]
    reqs = openai_server.chat_requests
    assert [r.model for r in reqs] == ["m1", "m2", "m3"]
    assert reqs[1].system_text == "sys" and reqs[1].last_user_text == "hello"
    assert a.usage is not None and a.usage.total_tokens >= 1


def test_streaming_text_and_tool_calls(openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.text("a longer answer that arrives in several pieces"), Reply.tool("lookup_order", {"order_id": "A-17"}))
    c = client(openai_server)
    chunks = list(c.chat.completions.create(model="m", messages=USER, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "a longer answer that arrives in several pieces"
    assert len([ch for ch in chunks if ch.choices]) > 3
    assert chunks[-1].usage is not None and not chunks[-1].choices
    chunks = list(c.chat.completions.create(model="m", messages=USER, stream=True))
    args = "".join(
        ch.choices[0].delta.tool_calls[0].function.arguments or "" for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls
    )
    assert json.loads(args) == {"order_id": "A-17"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert openai_server.chat_requests[0].stream


def test_models_listing(openai_server: OpenAIServer) -> None:
    assert [m.id for m in client(openai_server).models.list()] == ["test-model"]


def test_failures_rate_limit_server_error_garbage_timeout(openai_server: OpenAIServer) -> None:
    c = client(openai_server)
    openai_server.push(Reply.rate_limited(retry_after=1.5), Reply.server_error(503), Reply.garbage(), Reply.text("late").after(2))
    with pytest.raises(openai.RateLimitError) as rate:
        c.chat.completions.create(model="m", messages=USER)
    assert rate.value.response.headers["retry-after"] == "1.5"
    with pytest.raises(openai.InternalServerError) as server_error:
        c.chat.completions.create(model="m", messages=USER)
    assert server_error.value.status_code == 503
    with pytest.raises(json.JSONDecodeError):  # the client trusts the content type and fails to parse
        c.chat.completions.create(model="m", messages=USER)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="m", messages=USER, timeout=0.3)
    assert len(openai_server.chat_requests) == 4
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content == "ok"


def test_a_structured_output_refusal(openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.refuse("not allowed"))
    message = client(openai_server).chat.completions.create(model="m", messages=USER).choices[0].message
    assert message.refusal == "not allowed" and message.content is None


def test_bad_json_body_and_unknown_route_are_clear_errors(openai_server: OpenAIServer) -> None:
    r = httpx.post(openai_server.base_url + "/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    assert httpx.get(openai_server.base_url + "/nothing").status_code == 404


def test_a_broken_handler_is_a_500_naming_it() -> None:
    def handler(req: ChatRequest) -> str:
        raise RuntimeError("oops in the test script")

    with OpenAIServer(handler=handler) as server, pytest.raises(openai.InternalServerError) as err:
        client(server).chat.completions.create(model="m", messages=USER)
    assert "oops in the test script" in str(err.value)


# --- langchain-openai ---------------------------------------------------------------------------------------


def test_langchain_invoke_and_stream(openai_server: OpenAIServer) -> None:
    openai_server.push("hi there", "streamed reply text")
    model = chat(openai_server)
    assert model.invoke([SystemMessage("be brief"), HumanMessage("hello")]).content == "hi there"
    assert "".join(str(c.content) for c in model.stream("hello")) == "streamed reply text"
    first, second = openai_server.chat_requests
    assert first.messages[0] == {"role": "system", "content": "be brief"} and not first.stream
    assert second.stream


def test_structured_output_json_schema_sees_the_schema() -> None:
    seen: list[ChatRequest] = []

    def handler(req: ChatRequest) -> dict:
        seen.append(req)
        return {"is_failure": True, "severity": "high"}

    with OpenAIServer(handler=handler) as server:
        out = chat(server).with_structured_output(Verdict, method="json_schema").invoke("judge this")
    assert out == Verdict(is_failure=True, severity="high")
    fmt = seen[0].response_format
    assert fmt is not None and fmt["type"] == "json_schema"
    assert seen[0].output_schema["properties"]["severity"]["enum"] == ["low", "high"]
    assert not seen[0].tools


def test_structured_output_function_calling_uses_the_forced_tool(openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.json({"is_failure": False, "severity": "low"}))
    out = chat(openai_server).with_structured_output(Verdict, method="function_calling").invoke("judge this")
    assert out == Verdict(is_failure=False, severity="low")
    req = openai_server.chat_requests[0]
    assert req.forced_tool == "Verdict" and req.response_format is None
    assert set(req.output_schema["properties"]) == {"is_failure", "severity"}


def test_structured_output_include_raw_reports_an_out_of_schema_reply(openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.json({"is_failure": "maybe", "severity": "apocalyptic"}))
    runnable = chat(openai_server).with_structured_output(Verdict, method="function_calling", include_raw=True)
    out = runnable.invoke("judge this")
    assert out["parsed"] is None and out["parsing_error"] is not None


def test_bind_tools_tool_calls(openai_server: OpenAIServer) -> None:
    @tool
    def lookup_order(order_id: str) -> str:
        """Look up an order."""
        return order_id

    openai_server.push(
        Reply.tools(
            {"name": "lookup_order", "arguments": {"order_id": "A-1"}}, {"name": "lookup_order", "arguments": '{"order_id": "B-2"}'}
        )
    )
    message = chat(openai_server).bind_tools([lookup_order]).invoke("where is my order")
    assert [c["args"] for c in message.tool_calls] == [{"order_id": "A-1"}, {"order_id": "B-2"}]
    assert openai_server.chat_requests[0].tool_names == ["lookup_order"]


async def _ainvoke_many(model: ChatOpenAI, n: int) -> list[str]:
    import asyncio

    results = await asyncio.gather(*(model.ainvoke(f"q{i}") for i in range(n)))
    return [str(r.content) for r in results]


def test_fixed_delay_mode_serves_requests_concurrently() -> None:
    import asyncio

    with OpenAIServer(handler=lambda req: "echo " + req.last_user_text, delay_s=0.5) as server:
        answers = asyncio.run(_ainvoke_many(chat(server), 8))
    assert sorted(answers) == sorted(f"echo q{i}" for i in range(8))
    assert server.peak_in_flight > 1  # the delay holds requests open side by side, not one after another


def test_requests_are_served_side_by_side() -> None:
    barrier = threading.Barrier(4, timeout=10)  # each reply waits until all four requests are in

    def handler(req: ChatRequest) -> str:
        barrier.wait()
        return "together"

    with OpenAIServer(handler=handler) as server:
        threads = [
            threading.Thread(target=client(server).chat.completions.create, kwargs={"model": "m", "messages": USER}) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)
    assert server.peak_in_flight == 4 and not barrier.broken


def test_stop_releases_a_delayed_request_quickly() -> None:
    server = OpenAIServer(default=Reply.text("never").after(30)).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client(server, timeout=20).chat.completions.create(model="m", messages=USER)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 20
    while not server.chat_requests:
        assert time.monotonic() < deadline, "the delayed request never reached the server"
        time.sleep(0.01)
    server.stop()
    worker.join(timeout=10)
    assert not worker.is_alive() and errors and isinstance(errors[0], openai.APIConnectionError)
