"""How fast a model answered during evaluation: first-token latency and tokens per second.

Measured around the generate function, never inside the answers: the same items get the same answers
whether or not anyone times them. Timing changes from run to run, so it goes into the report's `timing`
block, which the report hash leaves out (flywheel.evals.report).

  seconds         wall time spent inside the generate function, summed over its calls
  tokens          generated tokens, when the model reports them (LocalModel's Generation.tokens)
  tokens_per_s    tokens / seconds
  first_token_s   mean over items of the time from the call to the first generated token. Generation is
                  batched: every item of a batch gets its first token when the batch's prefill pass
                  ends, so each item counts that batch's time. Only a generate function that can see
                  its model's forward passes knows it (`FirstTokenProbe`); for others it stays None.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict


class GenerationTiming(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: int = 0
    seconds: float = 0.0
    tokens: int | None = None
    tokens_per_s: float | None = None
    first_token_s: float | None = None


class Stopwatch:
    """Adds up the calls of one generate function over one set (or several: `total`)."""

    def __init__(self) -> None:
        self.items = 0
        self.seconds = 0.0
        self.tokens: int | None = None
        self._first_token_weighted = 0.0  # sum over calls of latency x items
        self._first_token_items = 0

    def add(self, items: int, seconds: float, answers: Sequence[Any], first_token_s: float | None) -> None:
        self.items += items
        self.seconds += seconds
        counts = [getattr(a, "tokens", None) for a in answers]
        if counts and all(isinstance(c, int) for c in counts):
            self.tokens = (self.tokens or 0) + sum(c for c in counts if isinstance(c, int))
        if first_token_s is not None:
            self._first_token_weighted += first_token_s * items
            self._first_token_items += items

    def merge(self, other: Stopwatch) -> None:
        self.items += other.items
        self.seconds += other.seconds
        if other.tokens is not None:
            self.tokens = (self.tokens or 0) + other.tokens
        self._first_token_weighted += other._first_token_weighted
        self._first_token_items += other._first_token_items

    def result(self) -> GenerationTiming:
        return GenerationTiming(
            items=self.items,
            seconds=round(self.seconds, 6),
            tokens=self.tokens,
            tokens_per_s=round(self.tokens / self.seconds, 3) if self.tokens is not None and self.seconds > 0 else None,
            first_token_s=round(self._first_token_weighted / self._first_token_items, 6) if self._first_token_items else None,
        )


def total(watches: Sequence[Stopwatch]) -> GenerationTiming:
    summed = Stopwatch()
    for watch in watches:
        summed.merge(watch)
    return summed.result()


class FirstTokenProbe:
    """A forward hook on a transformers model that notes when the first forward pass after `arm()` ends.

    In greedy generation that first pass is the prefill over the prompt, whose logits give the first new
    token: the time from `arm()` to its end is the time to the first token. The hook returns nothing, so
    the model's outputs are untouched."""

    def __init__(self, module: Any) -> None:
        self._armed_at: float | None = None
        self._first_at: float | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: Any, _args: Any, _output: Any) -> None:
        if self._armed_at is not None and self._first_at is None:
            self._first_at = time.perf_counter()

    def arm(self) -> None:
        self._armed_at, self._first_at = time.perf_counter(), None

    def latency(self) -> float | None:
        """Seconds from `arm()` to the end of the first forward pass, None if none ran since."""
        if self._armed_at is None or self._first_at is None:
            return None
        return self._first_at - self._armed_at

    def remove(self) -> None:
        self._handle.remove()
