"""A line of waiters for one egress budget, kept in that budget's Redis: who asked first gets served first.

Two sorted sets beside the budget's keys: ``waiting_key`` orders the waiters by a score the caller chooses
(when a stream went dark, when a gap opened), ``seen_key`` holds when each last asked. A waiter that
stopped asking for ``ttl_s`` (its process died, its message was lost) no longer counts, and leaves the
line at the next ``join`` that purges. The connection budget's streams and the background history sweeps
each keep one. Every method answers None (no line) while the budget's Redis is not used or does not answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.window import REDIS_ERRORS

if TYPE_CHECKING:
    from kraite_mp.binance.window import SharedWindow


class WaitingLine:
    """Waiters of ``budget`` in order of their score, in the budget's Redis (module doc)."""

    def __init__(
        self, budget: SharedWindow, waiting_key: str, seen_key: str, ttl_s: float, expire_s: int
    ) -> None:
        self.budget = budget
        self.waiting_key = waiting_key
        self.seen_key = seen_key
        self.ttl_s = ttl_s
        self.expire_s = expire_s

    def join(self, who: str, score: float, *, purge: bool = True, expire: bool = True) -> int | None:
        """Join the line, or stay in it with a new score: ``who``'s place, 0 first. ``purge``: waiters
        not seen for ``ttl_s`` leave it first; ``expire``: both keys expire ``expire_s`` after this ask."""
        client = self.budget.shared_client()
        if client is None:
            return None
        now = time.time()
        try:
            stale: Any = client.zrangebyscore(self.seen_key, "-inf", now - self.ttl_s) if purge else None
            pipe = client.pipeline(transaction=False)
            if stale:
                pipe.zrem(self.waiting_key, *stale)
                pipe.zrem(self.seen_key, *stale)
            pipe.zadd(self.waiting_key, {who: score})
            pipe.zadd(self.seen_key, {who: now})
            if expire:
                pipe.expire(self.waiting_key, self.expire_s)
                pipe.expire(self.seen_key, self.expire_s)
            pipe.zrank(self.waiting_key, who)
            place = pipe.execute()[-1]
        except REDIS_ERRORS as e:
            self.budget.redis_answered(e)
            return None
        self.budget.redis_answered()
        return int(place or 0)

    def leave(self, who: str) -> None:
        """Leave the line (served, skipped or given up); nothing without Redis."""
        client = self.budget.shared_client()
        if client is None:
            return
        try:
            pipe = client.pipeline(transaction=False)
            pipe.zrem(self.waiting_key, who)
            pipe.zrem(self.seen_key, who)
            pipe.execute()
        except REDIS_ERRORS as e:
            self.budget.redis_answered(e)
            return
        self.budget.redis_answered()

    def waiting(self) -> int | None:
        """Waiters that asked within ``ttl_s``; None without Redis."""
        client = self.budget.shared_client()
        if client is None:
            return None
        try:
            count: Any = client.zcount(self.seen_key, time.time() - self.ttl_s, "+inf")
        except REDIS_ERRORS as e:
            self.budget.redis_answered(e)
            return None
        self.budget.redis_answered()
        return int(count)
