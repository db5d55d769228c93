"""LLM plumbing shared by the judge, the corrector, the verifier and the supervisor's LLM policy.

Three things live here:

* `chat_model(settings, model_name)`: a langchain-openai `ChatOpenAI` for the configured
  OpenAI-compatible endpoint. Its own retries are off (`max_retries=0`) because `run_bounded` retries,
  with one policy for every caller. Async callers use `async with async_chat_model(...)`: it gives the
  model an HTTP client owned by the running event loop (langchain-openai otherwise shares one cached
  async client process-wide, which breaks on the second `asyncio.run`).

* `run_bounded(items, fn, limits)`: calls `fn(item)` for every item with at most
  `limits.max_in_flight` calls at once (an asyncio.Semaphore), retrying transient errors (429 honouring
  Retry-After, 408, 5xx, timeouts, connection errors) with tenacity: exponential backoff with jitter,
  or the server's Retry-After. Other errors (a 400, a bug, an unparsable answer the caller chose to
  raise) are not retried. Every item comes back, in input order, as an `ItemResult`: its value, or its
  error in one line. Nothing is lost. `run_bounded_sync` is the same for synchronous callers;
  `endpoint_failed(result)` tells an item the endpoint failed from one that hit a bug.

* `ask_until_valid(model, messages, retries, parse, describe, what)`: the one "re-ask until the reply
  parses" loop the judge, the corrector and the verifier share. It re-asks for unusable replies only;
  endpoint errors propagate to `run_bounded`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import inspect
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from flywheel.errors import SettingsError

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

    from flywheel.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

RETRY_AFTER_CAP_S = 120.0  # a server asking for longer than this is treated as down, not waited for


# --- the chat model -------------------------------------------------------------------------------------


def chat_model(settings: Settings, model_name: str | None = None, *, temperature: float | None = None, **kwargs: Any) -> ChatOpenAI:
    """A ChatOpenAI for `settings.llm.base_url`. Raises SettingsError when no endpoint is configured."""
    from langchain_openai import ChatOpenAI

    llm = settings.llm
    if not llm.enabled:
        raise SettingsError("llm.base_url", "no LLM endpoint is configured (set llm.base_url to an OpenAI-compatible /v1 URL)")
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _usage_counter()]  # every call counts (see `usage`)
    return ChatOpenAI(
        model=model_name or llm.judge_model,
        base_url=llm.base_url,
        api_key=settings.llm_api_key,
        timeout=llm.timeout_s,
        max_retries=0,  # run_bounded retries, once, with one policy
        temperature=llm.temperature if temperature is None else temperature,
        # Chat Completions is what every OpenAI-compatible server speaks; never switch to Responses by name.
        use_responses_api=False,
        **kwargs,
    )


@asynccontextmanager
async def async_chat_model(settings: Settings, model_name: str | None = None, **kwargs: Any) -> AsyncIterator[ChatOpenAI]:
    """`chat_model` with an async HTTP client that belongs to the current event loop and is closed after."""
    import openai

    http = openai.DefaultAsyncHttpxClient()
    try:
        yield chat_model(settings, model_name, http_async_client=http, **kwargs)
    finally:
        await http.aclose()


# --- usage counters -------------------------------------------------------------------------------------
# Calls and tokens of every chat model built by `chat_model`, in this process: the eval report's cost
# block takes the difference across an evaluation; a caller can do the same across a cycle.

_USAGE = {"calls": 0, "tokens": 0}
_USAGE_LOCK = threading.Lock()


def usage() -> dict[str, int]:
    """{"calls", "tokens"} counted in this process so far (a failed call counts, with no tokens)."""
    with _USAGE_LOCK:
        return dict(_USAGE)


def _count(tokens: int) -> None:
    with _USAGE_LOCK:
        _USAGE["calls"] += 1
        _USAGE["tokens"] += tokens


@functools.cache
def _usage_counter() -> Any:
    from langchain_core.callbacks import BaseCallbackHandler

    class UsageCounter(BaseCallbackHandler):
        run_inline = True  # count in the caller's thread, not an executor's

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            message = getattr(response.generations[0][0], "message", None) if response.generations and response.generations[0] else None
            metadata = getattr(message, "usage_metadata", None) or {}
            fallback = ((response.llm_output or {}).get("token_usage") or {}).get("total_tokens", 0)
            _count(int(metadata.get("total_tokens") or fallback or 0))

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            _count(0)

    return UsageCounter()


# --- limits and retry classification --------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How hard to push an endpoint: concurrency, retries, per-attempt timeout, backoff."""

    max_in_flight: int = 8
    retries: int = 3  # extra attempts after the first, for transient errors only
    timeout_s: float | None = 60.0  # per attempt; None: no limit here (the client's own still applies)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Limits:
        llm = settings.llm
        limits = cls(llm.max_in_flight, llm.max_retries, llm.timeout_s, llm.backoff_base_s, llm.backoff_max_s)
        return replace(limits, **overrides) if overrides else limits

    def backoff(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based).

        A server's Retry-After wins (capped); otherwise exponential growth from backoff_base_s up to
        backoff_max_s with "equal jitter" (half fixed, half random) so that many workers rate-limited
        together do not all come back at the same instant.
        """
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, RETRY_AFTER_CAP_S)
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempt - 1)))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class TransientError(Exception):
    """Raise from `fn` to ask `run_bounded` for a retry (for clients other than openai's)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(headers: Any) -> float | None:
    """Retry-After as seconds: `retry-after-ms`, `retry-after` in seconds, or an HTTP date."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def classify(exc: BaseException) -> tuple[bool, float | None]:
    """(retryable, retry_after_seconds) for an error raised by one attempt."""
    if isinstance(exc, TransientError):
        return True, exc.retry_after
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True, None
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        return False, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429 or status == 408 or status >= 500:
            return True, retry_after_seconds(getattr(exc.response, "headers", None))
        return False, None  # any other 4xx: asking again gives the same answer
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True, None
    for lib in _httpx_modules():
        if isinstance(exc, (lib.TimeoutException, lib.TransportError)):
            return True, None
    return False, None


def _httpx_modules() -> list[Any]:
    mods = []
    for name in ("httpx", "httpx2"):
        try:
            mods.append(__import__(name))
        except ImportError:
            pass
    return mods


# --- the bounded runner ---------------------------------------------------------------------------------


@dataclass
class ItemResult(Generic[T, R]):
    """What happened to one item: its value, or the last error in one line."""

    index: int
    item: T
    value: R | None = None
    error: str | None = None
    error_type: str | None = None
    transient: bool = False  # the last error was retryable: retries ran out
    attempts: int = 0
    exception: BaseException | None = field(default=None, repr=False)  # the last error itself

    @property
    def ok(self) -> bool:
        return self.error is None


def endpoint_failed(result: ItemResult) -> bool:
    """Whether a failed item failed at the endpoint (down, rate-limited past the retries, refused or
    misconfigured: any openai.APIError) rather than in the caller's code, which is a bug to raise."""
    import openai

    return result.transient or isinstance(result.exception, openai.APIError)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


async def _attempt(fn: Callable[[T], Any], item: T, timeout_s: float | None) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004 - an object whose __call__ is async
        call: Awaitable[Any] = fn(item)
    else:
        # A blocking fn runs in a worker thread; on timeout the thread finishes on its own (Python
        # cannot cancel it), but its result is dropped and the slot is released.
        call = _threaded(fn, item)
    if timeout_s is None:
        return await call
    return await asyncio.wait_for(call, timeout_s)


async def _threaded(fn: Callable[[T], Any], item: T) -> Any:
    value = await asyncio.to_thread(fn, item)
    return await value if inspect.isawaitable(value) else value  # a plain function returning a coroutine


async def _run_one(
    index: int, item: T, fn: Callable[[T], Any], limits: Limits, sleep: Callable[[float], Awaitable[Any]], rng: random.Random
) -> ItemResult:
    result: ItemResult = ItemResult(index=index, item=item)

    async def attempt() -> Any:
        result.attempts += 1
        return await _attempt(fn, item, limits.timeout_s)

    def wait(state: RetryCallState) -> float:
        if state.attempt_number > limits.retries:  # the last attempt: stop_after_attempt ends it, no wait follows
            return 0.0
        exc = state.outcome.exception() if state.outcome is not None else None
        return limits.backoff(state.attempt_number, classify(exc)[1] if exc is not None else None, rng)

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: classify(exc)[0]),
        stop=stop_after_attempt(limits.retries + 1),
        wait=wait,
        sleep=sleep,
        reraise=True,  # the last error itself, not tenacity's RetryError
    )
    try:
        result.value = await retrying(attempt)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        result.error, result.error_type, result.transient, result.exception = (one_line(exc), type(exc).__name__, classify(exc)[0], exc)
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            result.error = f"TimeoutError: no answer within {limits.timeout_s:g} s"
    return result


async def run_bounded(
    items: Iterable[T],
    fn: Callable[[T], Any],  # async or blocking; its values land in ItemResult.value
    limits: Limits | None = None,
    *,
    on_result: Callable[[ItemResult], Any] | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    seed: int | None = None,
) -> list[ItemResult]:
    """Run `fn` over `items` with at most `limits.max_in_flight` at once; results in input order.

    `fn` may be async (preferred) or blocking (run in threads). An item waiting out a backoff keeps
    its slot: a rate-limited endpoint sees fewer requests, not a burst when the wait ends.
    `on_result` is called in the event loop as each item finishes (progress, incremental saving).
    """
    limits = limits or Limits()
    if limits.max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    slots = asyncio.Semaphore(limits.max_in_flight)
    rng = random.Random(seed)

    async def one(index: int, item: T) -> ItemResult:
        async with slots:
            result = await _run_one(index, item, fn, limits, sleep, rng)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(items))))


def run_bounded_sync(items: Iterable[T], fn: Callable[[T], Any], limits: Limits | None = None, **kwargs: Any) -> list[ItemResult]:
    """`run_bounded` for synchronous callers."""
    return run_sync(lambda: run_bounded(items, fn, limits, **kwargs))


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, R]]) -> R:
    """Run a coroutine to completion from synchronous code. Inside a running event loop (a notebook,
    an async caller) it runs on a fresh loop in a worker thread, since asyncio cannot nest loops."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


# --- re-asking for a usable reply -----------------------------------------------------------------------


class BadReply(ValueError):
    """A reply that parsed but cannot be used. Its message says why in our words, never with the reply's
    text, so it may go back to the model in the re-ask."""


async def ask_until_valid(
    model: Any,
    messages: list[Any],
    retries: int,
    parse: Callable[[Any], R],
    describe: Callable[[BaseException], tuple[str, str]],
    what: str,
) -> tuple[R | None, str, int]:
    """Ask `model` (a runnable, e.g. a chat model with structured output) and `parse` its reply,
    re-asking up to `retries` times while the reply is unusable. Returns (value, "", calls) or
    (None, why the last reply was unusable, calls).

    `parse(reply)` returns the value or raises: `BadReply` (its message is both the detail and what the
    model is told), or another error, which `describe(exc)` turns into (detail, kind) when it means the
    reply was unusable and re-raises otherwise: endpoint errors and bugs propagate (run_bounded retries
    the transient ones). The re-ask keeps the system and first user message and says what was wrong by
    kind only (`what` names the object wanted): the reply may carry injected text, which must not come
    back to the model outside a fence.
    """
    from langchain_core.messages import HumanMessage

    last = ""
    for calls in range(1, retries + 2):
        try:
            return parse(await model.ainvoke(messages)), "", calls
        except BadReply as exc:
            last = kind = str(exc)
        except Exception as exc:
            last, kind = describe(exc)
        messages = [*messages[:2], HumanMessage(f"Your reply was not a valid {what} ({kind}). Reply again with only the {what}.")]
    return None, last, retries + 1
