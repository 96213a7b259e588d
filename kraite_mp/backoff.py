"""Capped exponential backoff: one pure function and the attempt counter every retry loop keeps."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kraite_mp.config import SupervisorSettings

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
    delay = base_s * 2.0 ** min(attempt, cap_exponent)
    if jitter_ratio > 0:
        delay += delay * jitter_ratio * (rng.random() if rng is not None else random.random())
    return delay


@dataclass
class Attempts:
    """Consecutive failures of one retry loop; the delay grows with them and starts over after a healthy run.

    A run is healthy once it lasted ``healthy_after_s`` (supervisor's ``startsecs``): a peer that
    accepts and drops us at once keeps backing off instead of getting a hot retry loop.
    """

    base_s: float = 1.0
    cap_exponent: int = DEFAULT_CAP_EXPONENT
    jitter_ratio: float = 0.1
    healthy_after_s: float = 60.0
    rng: random.Random | None = None
    #: Failures since the last success (or the last healthy run).
    count: int = 0

    @classmethod
    def from_settings(cls, supervisor: SupervisorSettings) -> Attempts:
        """The supervisor's backoff and healthy-after settings, shared by every loop of the daemon."""
        return cls(
            base_s=supervisor.backoff_base_s,
            cap_exponent=supervisor.backoff_cap_exponent,
            jitter_ratio=supervisor.backoff_jitter_ratio,
            healthy_after_s=supervisor.healthy_after_s,
        )

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        delay = backoff_delay(
            self.count,
            base_s=self.base_s,
            cap_exponent=self.cap_exponent,
            jitter_ratio=self.jitter_ratio,
            rng=self.rng,
        )
        self.count += 1
        return delay

    def reset(self) -> None:
        self.count = 0

    def healthy(self, uptime_s: float | None) -> bool:
        """True (and the counter starts over) if a run lasted ``healthy_after_s``; None: it never started."""
        if uptime_s is None or uptime_s < self.healthy_after_s:
            return False
        self.reset()
        return True
