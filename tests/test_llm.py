"""flywheel.llm: the chat model factory and the bounded, retrying runner, against the local server."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import httpx
import openai
import pytest
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401 - fixture

from flywheel.errors import SettingsError
from flywheel.llm import (
    BadReply,
    Limits,
    TransientError,
    ask_until_valid,
    async_chat_model,
    chat_model,
    classify,
    retry_after_seconds,
    run_bounded,
    run_bounded_sync,
)
from flywheel.settings import Settings, load_settings

FAST = Limits(max_in_flight=4, retries=3, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.05)


def llm_settings(project: Path, server: OpenAIServer, **llm) -> Settings:
    return load_settings(project, llm={"base_url": server.base_url, "timeout_s": 5.0, **llm})


class Sleeps:
    """Records the backoff waits instead of sleeping them."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def ask(settings: Settings):
    async def call(question: str) -> str:
        async with async_chat_model(settings, "judge-x") as model:
            return str((await model.ainvoke(question)).content)

    return call


def test_chat_model_needs_an_endpoint(settings: Settings) -> None:
    with pytest.raises(SettingsError) as err:
        chat_model(settings)
    assert str(err.value).startswith("setting llm.base_url")


def test_chat_model_talks_to_the_endpoint_without_its_own_retries(
    project: Path, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_LLM_API_KEY", "sk-test-123")
    settings = llm_settings(project, openai_server)
    model = chat_model(settings, "judge-x")
    assert model.max_retries == 0
    openai_server.push(Reply.server_error(500))
    with pytest.raises(openai.InternalServerError):  # one request, no retry: the 500 comes straight back
        model.invoke("hi")
    assert model.invoke("hi").content == "ok"
    first, second = openai_server.chat_requests
    assert first.model == "judge-x" and first.headers.get("authorization") == "Bearer sk-test-123"
    assert len(openai_server.chat_requests) == 2  # the 500 was not retried inside the client


def test_results_come_back_in_order_and_the_bound_holds(project: Path) -> None:
    with OpenAIServer(handler=lambda req: req.last_user_text.upper(), delay_s=0.05) as server:
        settings = llm_settings(project, server)
        results = run_bounded_sync([f"q{i}" for i in range(20)], ask(settings), FAST)
    assert [r.value for r in results] == [f"Q{i}" for i in range(20)]
    assert all(r.ok and r.attempts == 1 for r in results)
    assert 1 < server.peak_in_flight <= FAST.max_in_flight


def test_429_honours_retry_after_then_succeeds(project: Path, openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.rate_limited(retry_after=0.25), Reply.rate_limited(), "fine")
    sleeps = Sleeps()
    [result] = asyncio.run(run_bounded(["q"], ask(llm_settings(project, openai_server)), FAST, sleep=sleeps))
    assert result.ok and result.value == "fine" and result.attempts == 3
    assert sleeps.waits[0] == 0.25  # the server's Retry-After
    assert 0.005 <= sleeps.waits[1] <= 0.02  # no header: backoff from 0.01 s, second retry, with jitter


def test_5xx_and_timeouts_are_retried(project: Path, openai_server: OpenAIServer) -> None:
    # 1.5 s, not less: on a loaded machine a healthy first request (client set-up included) can take a
    # few tenths of a second, and must not count as the timeout this test is about
    settings = llm_settings(project, openai_server, timeout_s=1.5)
    openai_server.push(Reply.server_error(502), Reply.text("slow").after(4), "recovered")
    [result] = asyncio.run(run_bounded(["q"], ask(settings), FAST, sleep=Sleeps()))
    assert result.ok and result.value == "recovered" and result.attempts == 3


def test_the_runner_timeout_bounds_each_attempt(openai_server: OpenAIServer) -> None:
    async def slow(item: int) -> int:
        if item == 0:
            await asyncio.sleep(10)
        return item

    results = asyncio.run(run_bounded([0, 1], slow, Limits(max_in_flight=2, retries=1, timeout_s=0.1), sleep=Sleeps()))
    assert results[1].value == 1
    assert not results[0].ok and results[0].transient and results[0].attempts == 2 and "within 0.1 s" in results[0].error


def test_a_4xx_other_than_429_is_not_retried(project: Path, openai_server: OpenAIServer) -> None:
    openai_server.push(Reply.client_error(400, "context too long"), "ok")
    [result] = asyncio.run(run_bounded(["q"], ask(llm_settings(project, openai_server)), FAST, sleep=Sleeps()))
    assert not result.ok and result.attempts == 1 and not result.transient
    import openai

    assert isinstance(result.exception, openai.BadRequestError) and "context too long" in result.error


def test_retries_run_out_and_the_item_is_an_error_record_not_lost(project: Path, openai_server: OpenAIServer) -> None:
    openai_server.handler = lambda req: Reply.server_error(503) if req.last_user_text == "bad" else "good"
    results = run_bounded_sync(["a", "bad", "b"], ask(llm_settings(project, openai_server)), FAST, sleep=Sleeps())
    assert [r.item for r in results] == ["a", "bad", "b"]
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].attempts == FAST.retries + 1 and results[1].transient and "503" in results[1].error


def test_connection_refused_is_transient(project: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings(project, llm={"base_url": f"http://127.0.0.1:{port}/v1"})
    [result] = run_bounded_sync(["q"], ask(settings), Limits(retries=1, backoff_base_s=0.01), sleep=Sleeps())
    assert not result.ok and result.transient and result.attempts == 2 and "Connection error" in result.error


def test_sync_functions_run_in_threads_and_other_errors_are_kept(openai_server: OpenAIServer) -> None:
    def work(item: int) -> int:
        if item == 2:
            raise KeyError("no such thing")
        return item * 10

    results = run_bounded_sync(range(4), work, Limits(max_in_flight=2))
    assert [r.value for r in results] == [0, 10, None, 30]
    assert results[2].error == "KeyError: 'no such thing'" and results[2].attempts == 1 and isinstance(results[2].exception, KeyError)


def test_run_bounded_sync_works_inside_a_running_loop() -> None:
    async def inner() -> list[int]:
        async def double(x: int) -> int:
            return 2 * x

        return [r.value for r in run_bounded_sync([1, 2, 3], double)]

    assert asyncio.run(inner()) == [2, 4, 6]


def test_on_result_sees_each_item_and_a_transient_error_can_be_raised_by_hand() -> None:
    seen: list[int] = []
    calls = {"n": 0}

    async def flaky(item: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransientError("busy", retry_after=0.0)
        return item

    results = asyncio.run(run_bounded([7], flaky, FAST, on_result=lambda r: seen.append(r.value), sleep=Sleeps()))
    assert seen == [7] and results[0].attempts == 2


def test_backoff_grows_caps_and_jitters() -> None:
    limits = Limits(backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        waits = [limits.backoff(attempt, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits) and len(set(waits)) > 1
    assert limits.backoff(3, retry_after=0.7) == 0.7
    assert limits.backoff(1, retry_after=10_000) == 120.0


def test_retry_after_forms_and_classification() -> None:
    import openai

    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert 0 <= retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({}) is None
    assert classify(TimeoutError()) == (True, None)
    assert classify(ValueError("x")) == (False, None)
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    assert classify(openai.APIConnectionError(request=request)) == (True, None)
    assert classify(openai.APITimeoutError(request=request)) == (True, None)
    limited = httpx.Response(429, headers={"retry-after": "3"}, request=request)
    assert classify(openai.RateLimitError("slow down", response=limited, body=None)) == (True, 3.0)
    refused = httpx.Response(400, request=request)
    assert classify(openai.BadRequestError("bad", response=refused, body=None))[0] is False


def test_limits_from_settings(project: Path) -> None:
    settings = load_settings(project, llm={"max_in_flight": 3, "max_retries": 5, "timeout_s": 9, "backoff_base_s": 0.1, "backoff_max_s": 2})
    assert Limits.from_settings(settings) == Limits(3, 5, 9.0, 0.1, 2.0)
    assert Limits.from_settings(settings, max_in_flight=16).max_in_flight == 16


# --- the shared re-ask loop ------------------------------------------------------------------------------


class Replies:
    """A stand-in runnable: answers `ainvoke` from a list (an exception in it is raised), keeps what it got."""

    def __init__(self, *replies: object) -> None:
        self.replies = list(replies)
        self.asked: list[list] = []

    async def ainvoke(self, messages: list) -> object:
        self.asked.append(list(messages))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


def positive(reply: object) -> int:
    number = int(str(reply))  # ValueError for words
    if number <= 0:
        raise BadReply("the number is not positive")
    return number


def describe_value_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ValueError):
        return f"detail of {type(exc).__name__}", f"kind {type(exc).__name__}"
    raise exc


def test_ask_until_valid_re_asks_by_kind_and_counts_calls() -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    first = [SystemMessage("system"), HumanMessage("question")]
    model = Replies("words", "-3", "7")
    assert asyncio.run(ask_until_valid(model, first, 2, positive, describe_value_error, "number object")) == (7, "", 3)
    assert model.asked[0] == first
    assert (
        model.asked[1][:2] == first
        and model.asked[1][2].content
        == "Your reply was not a valid number object (kind ValueError). Reply again with only the number object."
    )
    assert model.asked[2][:2] == first and len(model.asked[2]) == 3  # one re-ask message, never a pile of them
    assert (
        model.asked[2][2].content
        == "Your reply was not a valid number object (the number is not positive). Reply again with only the number object."
    )


def test_ask_until_valid_gives_up_with_the_last_detail_and_lets_other_errors_through() -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    first = [SystemMessage("system"), HumanMessage("question")]
    assert asyncio.run(ask_until_valid(Replies("-1", "words"), first, 1, positive, describe_value_error, "number object")) == (
        None,
        "detail of ValueError",
        2,
    )
    assert asyncio.run(ask_until_valid(Replies("0"), first, 0, positive, describe_value_error, "number object")) == (
        None,
        "the number is not positive",
        1,
    )
    boom = Replies(TransientError("endpoint busy"), "5")
    with pytest.raises(TransientError, match="endpoint busy"):  # endpoint errors are run_bounded's, not re-asked here
        asyncio.run(ask_until_valid(boom, first, 3, positive, describe_value_error, "number object"))
    assert len(boom.asked) == 1


def test_retries_run_out_on_a_transient_error_raised_by_hand_and_every_wait_is_the_backoff() -> None:
    calls = {"n": 0}

    async def always_busy(item: int) -> int:
        calls["n"] += 1
        raise TransientError("busy", retry_after=None if calls["n"] % 2 else 0.3)

    sleeps = Sleeps()
    limits = Limits(max_in_flight=1, retries=3, timeout_s=None, backoff_base_s=1.0, backoff_max_s=2.0)
    [result] = asyncio.run(run_bounded([1], always_busy, limits, sleep=sleeps, seed=5))
    assert not result.ok and result.transient and result.attempts == 4 and calls["n"] == 4
    assert result.error == "TransientError: busy" and isinstance(result.exception, TransientError)
    assert len(sleeps.waits) == 3  # between the attempts only, none after the last
    assert 0.5 <= sleeps.waits[0] <= 1.0 and sleeps.waits[1] == 0.3 and 1.0 <= sleeps.waits[2] <= 2.0
