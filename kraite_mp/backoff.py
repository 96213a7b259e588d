"""Capped exponential backoff: one pure function, used by the supervisor and every reconnect loop."""

from __future__ import annotations

import random

#: 2^5 = 32 s: the longest regular restart delay.
DEFAULT_CAP_EXPONENT = 5


def backoff_delay(
    attempt: int,
    *,
    base_s: float = 1.0,
    cap_exponent: int = DEFAULT_CAP_EXPONENT,
    jitter_ratio: float = 0.1,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number ``attempt`` (0-based): ``base * 2**min(attempt, cap)`` plus jitter.

    attempt 0..6 -> 1, 2, 4, 8, 16, 32, 32 s (base 1, cap 5), each plus up to ``jitter_ratio``
    of itself so that many processes that failed together do not retry together.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    delay = base_s * (2 ** min(attempt, cap_exponent))
    if jitter_ratio > 0:
        delay += delay * jitter_ratio * (rng or random).random()
    return delay
