"""LLM plumbing shared by the judge, the corrector, the verifier and the supervisor's LLM policy.

Two things live here:

* `chat_model(settings, model_name)`: a langchain-openai `ChatOpenAI` for the configured
  OpenAI-compatible endpoint. Its own retries are off (`max_retries=0`) because `run_bounded` retries,
  with one policy for every caller. Async callers use `async with async_chat_model(...)`: it gives the
  model an HTTP client owned by the running event loop (langchain-openai otherwise shares one cached
  async client process-wide, which breaks on the second `asyncio.run`).

* `run_bounded(items, fn, limits)`: calls `fn(item)` for every item with at most
  `limits.max_in_flight` calls at once, retrying transient errors (429 honouring Retry-After, 408,
  5xx, timeouts, connection errors) with exponential backoff and jitter. Other errors (a 400, a bug,
  an unparsable answer the caller chose to raise) are not retried. Every item comes back, in input
  order, as an `ItemResult`: its value, or its error in one line. Nothing is lost.
  `run_bounded_sync` is the same for synchronous callers.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from flywheel.errors import SettingsError

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

    from flywheel.settings import Settings

T = TypeVar("T")
R = TypeVar("R")

RETRY_AFTER_CAP_S = 120.0  # a server asking for longer than this is treated as down, not waited for


# --- the chat model -------------------------------------------------------------------------------------


def chat_model(settings: "Settings", model_name: str | None = None, *, temperature: float | None = None, **kwargs: Any) -> "ChatOpenAI":
    """A ChatOpenAI for `settings.llm.base_url`. Raises SettingsError when no endpoint is configured."""
    from langchain_openai import ChatOpenAI

    llm = settings.llm
    if not llm.enabled:
        raise SettingsError("llm.base_url", "no LLM endpoint is configured (set llm.base_url to an OpenAI-compatible /v1 URL)")
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
async def async_chat_model(settings: "Settings", model_name: str | None = None, **kwargs: Any) -> AsyncIterator["ChatOpenAI"]:
    """`chat_model` with an async HTTP client that belongs to the current event loop and is closed after."""
    import openai

    http = openai.DefaultAsyncHttpxClient()
    try:
        yield chat_model(settings, model_name, http_async_client=http, **kwargs)
    finally:
        await http.aclose()


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
    def from_settings(cls, settings: "Settings", **overrides: Any) -> "Limits":
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


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


async def _attempt(fn: Callable[[T], Any], item: T, timeout_s: float | None) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
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


async def _run_one(index: int, item: T, fn: Callable[[T], Any], limits: Limits, sleep: Callable[[float], Awaitable[Any]], rng: random.Random) -> ItemResult:
    result: ItemResult = ItemResult(index=index, item=item)
    for attempt in range(limits.retries + 1):
        result.attempts = attempt + 1
        try:
            value = await _attempt(fn, item, limits.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes this item's record
            retryable, retry_after = classify(exc)
            result.error, result.error_type, result.transient, result.exception = one_line(exc), type(exc).__name__, retryable, exc
            if isinstance(exc, asyncio.TimeoutError) and not str(exc):
                result.error = f"TimeoutError: no answer within {limits.timeout_s:g} s"
            if not retryable or attempt == limits.retries:
                return result
            await sleep(limits.backoff(attempt + 1, retry_after, rng))
            continue
        result.value, result.error, result.error_type, result.transient, result.exception = value, None, None, False, None
        return result
    return result  # pragma: no cover - the loop always returns


async def run_bounded(
    items: Iterable[T],
    fn: Callable[[T], Awaitable[R]] | Callable[[T], R],
    limits: Limits | None = None,
    *,
    on_result: Callable[[ItemResult], Any] | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    seed: int | None = None,
) -> list[ItemResult]:
    """Run `fn` over `items` with at most `limits.max_in_flight` at once; results in input order.

    `fn` may be async (preferred) or blocking (run in threads). A worker waiting out a backoff keeps
    its slot: a rate-limited endpoint sees fewer requests, not a burst when the wait ends.
    `on_result` is called in the event loop as each item finishes (progress, incremental saving).
    """
    limits = limits or Limits()
    if limits.max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    work: Sequence[T] = items if isinstance(items, Sequence) else list(items)
    results: list[ItemResult | None] = [None] * len(work)
    queue = iter(enumerate(work))  # shared by the workers; next() never awaits, so no lock is needed
    rng = random.Random(seed)

    async def worker() -> None:
        for index, item in queue:
            result = await _run_one(index, item, fn, limits, sleep, rng)
            results[index] = result
            if on_result is not None:
                on_result(result)

    await asyncio.gather(*(worker() for _ in range(min(limits.max_in_flight, len(work)))))
    return [r for r in results if r is not None]


def run_bounded_sync(items: Iterable[T], fn: Callable[[T], Any], limits: Limits | None = None, **kwargs: Any) -> list[ItemResult]:
    """`run_bounded` for synchronous callers."""
    return run_sync(lambda: run_bounded(items, fn, limits, **kwargs))


def run_sync(make_coro: Callable[[], Awaitable[R]]) -> R:
    """Run a coroutine to completion from synchronous code. Inside a running event loop (a notebook,
    an async caller) it runs on a fresh loop in a worker thread, since asyncio cannot nest loops."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()  # type: ignore[arg-type]
