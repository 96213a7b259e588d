"""WebSocket connection attempts of one egress IP, shared by every kraite-mp process behind it.

``ConnectionBudget``: Binance allows 300 per 5 minutes per IP and counts
every attempt (first connects, reconnects, planned rollovers). Every stream takes one token of
``binance.connection_share`` x ``binance.connection_limit`` per ``binance.connection_window_s`` right
before its handshake, from the same kind of moving window under ``<ns>:egress:<egress_id>:<WS host>:ws``
(``:LIMITER/connections/...``, ``:peers``); without a token it connects nothing and tries again when the
oldest attempt leaves the window; the user-data children leave the last attempt of
the window to the mark-price stream (``MARK_PRICE_RESERVE``).

Longest dark first: a stream that asks with ``dark_since`` (when it lost, or never had, its connection)
joins the egress's waiting line (``:ws:waiting``, a sorted set by dark-since time, refreshed by each ask,
forgotten ``WAITER_TTL_S`` after the last one); while attempts are scarce a token goes only to a stream
among the ``remaining`` longest-dark waiters, so that after a mass drop the accounts that have been dark
longest connect first and none starves behind streams that dropped later.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kraite_mp.binance.budget import EgressBudget, budget_key, cached_budget, egress_id
from kraite_mp.binance.waiting_line import WaitingLine
from kraite_mp.binance.window import FALLBACK_SHARE_RATIO, REDIS_ERRORS, padded_window

if TYPE_CHECKING:
    from kraite_mp.config import Settings

#: Connection attempts: a refused take retries after the oldest attempt leaves the window (at least this),
#: plus up to this random part, so that the waiters of a mass reconnect do not poll together.
CONNECT_POLL_MIN_S = 0.5
CONNECT_POLL_JITTER_S = 2.0
#: A process counts as a peer of the connection budget this long after its last attempt (> the 24 h limit).
CONNECTION_PEER_TTL_S = 25 * 3600.0
#: Connection attempts of the shared window the user-data children leave to the mark-price stream.
MARK_PRICE_RESERVE = 1
#: A waiter that stopped asking this long ago (its process died) leaves the waiting line.
WAITER_TTL_S = 30.0
#: A waiter asks again at least this often, however far back in the line: it stays in it.
WAITER_REFRESH_S = WAITER_TTL_S / 3


class ConnectionBudget(EgressBudget):
    """The WebSocket connection attempts of one egress (Binance: 300 per 5 min per IP, every attempt counts).

    The same moving window in Redis as the weight, one token per attempt, taken right before the handshake.
    ``take()`` never blocks: the stream loop waits (and beats) itself. Without Redis the local share is
    never a burst: when it is less than one attempt per window, the window is stretched instead
    (``fallback_window``).
    """

    resource = "connections"
    unit = "connection attempts"
    #: A stream connects at least once a day (the 24 h limit): a peer stays counted that long.
    peer_ttl_s = CONNECTION_PEER_TTL_S

    def take(self, reserve: int = 0, *, who: str | None = None, dark_since: float | None = None) -> float:
        """Take one attempt now: 0.0, or the seconds until the next try (the stream connects nothing).

        ``reserve``: leave that many attempts of the shared window to streams that ask without one (the
        user-data children leave ``MARK_PRICE_RESERVE`` to the mark-price stream, which every account's
        trading depends on, so that it never queues behind hundreds of accounts after a mass drop). The
        take itself leaves the reserve atomically (``try_take(leave=)``): concurrent takers cannot spend it.
        ``who`` (a stable name of the stream) and ``dark_since`` (wall time it has been without a
        connection since) put it in the egress's waiting line: longest dark first (module doc).
        """
        reserve = min(max(0, reserve), self.limit - 1)
        if reserve:
            room, retry_in, remaining = self._room(1 + reserve)
            if not room:
                if who is not None and dark_since is not None:
                    rank = self._queue(who, dark_since)
                    return self._next_try_s(max(retry_in, self._turn_in_s(rank, reserve, remaining)))
                return self._next_try_s(retry_in)
        if who is not None and dark_since is not None:
            behind = self._rank(who, dark_since, reserve)
            if behind is not None:
                rank, remaining = behind
                return self._next_try_s(self._turn_in_s(rank, reserve, remaining))
        taken, retry_in = self.try_take(1, leave=reserve)
        if taken and who is not None:
            self._leave_queue(who)
        return 0.0 if taken else self._next_try_s(retry_in)

    # -- the waiting line (longest dark first) ---------------------------------------------------
    @property
    def line(self) -> WaitingLine:
        """The egress's streams waiting for a token, by dark-since time (``:waiting``, ``:waiting-seen``)."""
        waiting, seen = f"{self.key_prefix}:waiting", f"{self.key_prefix}:waiting-seen"
        return WaitingLine(self, waiting, seen, WAITER_TTL_S, expire_s=int(WAITER_TTL_S * 4))

    def waiting(self) -> int | None:
        """Streams waiting for a connection token now (asked within ``WAITER_TTL_S``); None without Redis."""
        return self.line.waiting()

    def _queue(self, who: str, dark_since: float) -> int:
        """Join (or stay in) the waiting line: ``who``'s place in it, 0 first (0 without Redis)."""
        return self.line.join(who, dark_since, purge=False) or 0

    def _turn_in_s(self, rank: int, reserve: int, remaining: int) -> float:
        """Seconds until the waiter at ``rank`` can be served, the window holding ``remaining`` free
        attempts: until enough of its attempts have left it that ``rank + 1 + reserve`` are free (its own
        entries say when each leaves); at most ``WAITER_REFRESH_S`` (a waiter must ask again to stay in the
        line), 0 when it is served now or the window cannot be read. Not every waiter at each attempt that
        leaves the window: docs/BENCHMARKS.md has the ask rate at a 1,000-account start."""
        needed = rank + 1 + reserve - remaining  # attempts that must leave the window first
        if needed <= 0:
            return 0.0
        shared = self._redis()
        if shared is None:
            return 0.0
        try:
            count = self.limit - remaining
            # limits' moving window: a list of take times, newest first (index count - 1 is the oldest)
            key = f"{self.key_prefix}:{self._item.key_for(self.resource)}"
            value = shared[0].lindex(key, max(0, count - needed))
            self._redis_ok()
        except REDIS_ERRORS as e:
            self._redis_failed(e)
            return 0.0
        try:
            leaves_at = float(value) + self._item.get_expiry()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return 0.0  # not what this version of limits keeps: the caller's short poll
        return min(max(0.0, leaves_at - time.time()), WAITER_REFRESH_S)

    def _rank(self, who: str, dark_since: float, reserve: int) -> tuple[int, int] | None:
        """``who``'s place in the waiting line and the window's free attempts when those cannot serve it
        yet; None when it may take one now (without Redis too, or when nobody waits before it)."""
        rank = self.line.join(who, dark_since, expire=False)
        if not rank:  # first in line (or the line was lost, or there is none): go
            return None
        shared = self._redis()
        if shared is None:
            return None
        try:
            remaining = int(shared[1].get_window_stats(self._item, self.resource).remaining)
        except REDIS_ERRORS as e:
            self._redis_failed(e)
            return None
        return None if rank < max(1, remaining - reserve) else (rank, remaining)

    def _leave_queue(self, who: str) -> None:
        self.line.leave(who)

    @staticmethod
    def _next_try_s(retry_in: float) -> float:
        return max(retry_in, CONNECT_POLL_MIN_S) + random.uniform(0.0, CONNECT_POLL_JITTER_S)

    def _room(self, cost: int) -> tuple[bool, float, int]:
        """Whether ``cost`` attempts fit the shared window now (True without Redis: the local share
        decides), the seconds until its oldest attempt leaves it and the attempts it has free."""
        self._check_process()
        shared = self._redis()
        if shared is None:
            return True, 0.0, self.limit
        try:
            if shared[1].test(self._item, self.resource, cost=cost):
                return True, 0.0, self.limit
            stats = shared[1].get_window_stats(self._item, self.resource)
            return False, max(0.0, stats.reset_time - time.time()), int(stats.remaining)
        except REDIS_ERRORS as e:
            self._redis_failed(e)
            return True, 0.0, self.limit

    def _local_window(self) -> tuple[int, int]:
        if not self.shared:
            return self.limit, padded_window(self.window_s)
        return fallback_window(self.limit, self._peers, padded_window(self.window_s), self.fallback_ratio)

    def _fallback_text(self) -> str:
        amount, seconds = self._local_window()
        return f"{amount} {self.unit} per {seconds}s (the egress allows {self.limit} per {self.window_s}s)"


def fallback_window(
    limit: int, peers: int, window_s: int, ratio: float = FALLBACK_SHARE_RATIO
) -> tuple[int, int]:
    """(attempts, seconds) one process allows itself without Redis: its share among ``peers`` (at most
    ``ratio``) of ``limit`` per ``window_s``; below one per window the window grows instead, so that
    ``peers`` processes together still keep to ``limit``."""
    share = limit * min(ratio, 1.0 / max(1, peers))
    if share >= 1:
        return math.floor(share), window_s
    return 1, math.ceil(window_s / share)


def connection_budget(settings: Settings) -> ConnectionBudget:
    """The connection attempts every process of this egress shares through Redis (one object per process):
    ``binance.connection_share`` x ``binance.connection_limit`` per ``binance.connection_window_s``, keyed
    ``<ns>:egress:<egress_id>:<WS host>:ws`` (the WebSocket host is its own limit pool)."""
    b = settings.binance
    limit = max(1, math.floor(b.connection_limit * b.connection_share))
    window_s = max(1, math.ceil(b.connection_window_s))
    egress = egress_id(settings)
    key = budget_key(settings.redis_namespace, egress, b.ws_url) + ":ws"
    host = urlsplit(b.ws_url).netloc or b.ws_url
    budget = cached_budget(
        ("redis-ws", settings.redis_url, key, limit, window_s),
        lambda: ConnectionBudget(
            f"{egress}@{host} (connections)",
            limit,
            redis_url=settings.redis_url,
            key_prefix=key,
            window_s=window_s,
        ),
    )
    assert isinstance(budget, ConnectionBudget)
    return budget
