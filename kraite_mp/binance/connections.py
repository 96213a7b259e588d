"""WebSocket connection attempts of one egress IP, shared by every kraite-mp process behind it.

``ConnectionBudget``: Binance allows 300 per 5 minutes per IP and counts
every attempt (first connects, reconnects, planned rollovers). Every stream takes one token of
``binance.connection_share`` x ``binance.connection_limit`` per ``binance.connection_window_s`` right
before its handshake, from the same kind of moving window under ``<ns>:egress:<egress_id>:<WS host>:ws``
(``:LIMITER/connections/...``, ``:peers``); without a token it connects nothing and tries again when the
oldest attempt leaves the window; the user-data children leave the last attempt of
the window to the mark-price stream (``MARK_PRICE_RESERVE``).
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kraite_mp.binance.budget import (
    FALLBACK_SHARE_RATIO,
    REDIS_ERRORS,
    EgressBudget,
    budget_key,
    cached_budget,
    egress_id,
)

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

    def take(self, reserve: int = 0) -> float:
        """Take one attempt now: 0.0, or the seconds until the next try (the stream connects nothing).

        ``reserve``: leave that many attempts of the shared window to streams that ask without one (the
        user-data children leave ``MARK_PRICE_RESERVE`` to the mark-price stream, which every account's
        trading depends on, so that it never queues behind hundreds of accounts after a mass drop). The
        check and the take are two steps: a race can only spend the reserve, never exceed the window.
        """
        reserve = min(max(0, reserve), self.limit - 1)
        if reserve:
            room, retry_in = self._room(1 + reserve)
            if not room:
                return self._next_try_s(retry_in)
        taken, retry_in = self.try_take(1)
        return 0.0 if taken else self._next_try_s(retry_in)

    @staticmethod
    def _next_try_s(retry_in: float) -> float:
        return max(retry_in, CONNECT_POLL_MIN_S) + random.uniform(0.0, CONNECT_POLL_JITTER_S)

    def _room(self, cost: int) -> tuple[bool, float]:
        """Whether ``cost`` attempts fit the shared window now (True without Redis: the local share
        decides), and the seconds until its oldest attempt leaves it."""
        self._check_process()
        shared = self._redis()
        if shared is None:
            return True, 0.0
        try:
            if shared[1].test(self._item, self.resource, cost=cost):
                return True, 0.0
            stats = shared[1].get_window_stats(self._item, self.resource)
            return False, max(0.0, stats.reset_time - time.time())
        except REDIS_ERRORS as e:
            self._redis_failed(e)
            return True, 0.0

    def _local_window(self) -> tuple[int, int]:
        if not self.shared:
            return self.limit, self.window_s
        return fallback_window(self.limit, self._peers, self.window_s, self.fallback_ratio)

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
