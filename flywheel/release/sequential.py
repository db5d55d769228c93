"""The statistics of the sequential canary test (flywheel.release.canary): mixture likelihood ratios
for two binomial proportions, one for "the canary's rate is above the champion's" and one for "it is
not above by the harm margin or more". Pure functions of the counts; the canary module's docstring says
what the thresholds guarantee and under which assumptions.
"""

from __future__ import annotations

import math

PRIOR = 0.5  # Jeffreys Beta(1/2, 1/2) on each version's rate: the mixture Q of the canary module's docstring


def _xlogy(x: float, y: float) -> float:
    """x * log(y), with 0 * log(0) = 0: a rate of 0 explains no failures perfectly."""
    if x == 0:
        return 0.0
    return x * math.log(y) if y > 0 else -math.inf


def _loglik(failures: int, n: int, p: float) -> float:
    """log-likelihood of a rate p for `failures` of `n` requests (of the ordered requests: no binomial coefficient)."""
    return _xlogy(failures, p) + _xlogy(n - failures, 1.0 - p)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _log_mixture(failures: int, n: int) -> float:
    """log of the likelihood averaged over the Beta(PRIOR, PRIOR) prior on the rate."""
    return _log_beta(failures + PRIOR, n - failures + PRIOR) - _log_beta(PRIOR, PRIOR)


def _max_on_line(x0: int, n0: int, x1: int, n1: int, shift: float) -> float:
    """The largest log-likelihood of both versions with p1 = p0 + shift: where a null's maximum lies when
    the unrestricted one is outside the null. Concave in p0, so the root of its slope is bisected."""

    def slope(p: float) -> float:
        return x0 / p - (n0 - x0) / (1 - p) + x1 / (p + shift) - (n1 - x1) / (1 - p - shift)

    lo, hi = 0.0, 1.0 - shift
    for _ in range(80):  # every midpoint lies strictly inside, where the slope is finite
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return max(_loglik(x0, n0, p) + _loglik(x1, n1, p + shift) for p in (0.0, (lo + hi) / 2, 1.0 - shift))


def _log_lr(x0: int, n0: int, x1: int, n1: int, shift: float, null_above: bool) -> float:
    """log of Q / (the largest likelihood in the null): the null is p1 - p0 >= shift (`null_above`) or
    p1 - p0 <= shift. When the unrestricted maximum lies in the null, the statistic is at most 1."""
    if n0 == 0 or n1 == 0:
        return 0.0
    mixture = _log_mixture(x0, n0) + _log_mixture(x1, n1)
    observed = x1 / n1 - x0 / n0
    if (observed >= shift) == null_above or observed == shift:
        return mixture - (_loglik(x0, n0, x0 / n0) + _loglik(x1, n1, x1 / n1))
    return mixture - _max_on_line(x0, n0, x1, n1, shift)


def log_lr_harm(x0: int, n0: int, x1: int, n1: int) -> float:
    """log E_harm: evidence that the canary's rate (x1 of n1) is above the champion's (x0 of n0)."""
    return _log_lr(x0, n0, x1, n1, 0.0, null_above=False)


def log_lr_no_harm(x0: int, n0: int, x1: int, n1: int, margin: float) -> float:
    """log E_safe: evidence that the canary's rate is not above the champion's by `margin` or more."""
    return _log_lr(x0, n0, x1, n1, margin, null_above=True)
