"""A moving window shared by every kraite-mp process of one egress, in Redis (``limits``), with a local fallback.

The engine under both egress budgets: the REST weight (``kraite_mp.binance.budget``) and the WebSocket
connection attempts (``kraite_mp.binance.connections``). One ``limits`` moving window under
``<key_prefix>:LIMITER/<resource>/...`` and the processes that spent from it lately (``:peers``).

While Redis is unreachable a process keeps to a conservative local share: the shared window divided by
the number of processes last seen using it (at most ``FALLBACK_SHARE_RATIO`` of it), in an in-memory
window. It says so once when it falls back and once when Redis is back; it never bursts.

Nothing connects before it is used: the Redis client is built in the process that first needs it, and
rebuilt when the object finds itself in a forked child, so no socket crosses a fork.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from typing import cast

import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, MovingWindowSupport, RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from kraite_mp.logs import redact
from kraite_mp.messages import redis_driver_info

log = logging.getLogger(__name__)

#: Every window is kept this share longer than the exchange's (60 s -> 62 s, 300 s -> 310 s): a unit is
#: taken a little before the exchange counts it (the request's way there), so with an exact window two
#: bursts one window apart could land in one of the exchange's (measured: 1,288 of a 1,200 share in a
#: rolling minute, calls 59.98 s apart). Costs 3 % of the sustained rate.
WINDOW_MARGIN_RATIO = 1 / 30


def padded_window(window_s: int) -> int:
    """The window (whole seconds) kraite-mp keeps to for an exchange window of ``window_s``."""
    return window_s + math.floor(window_s * WINDOW_MARGIN_RATIO + 0.5)  # half up: 15 s -> 16 s


#: Without Redis a process allows itself at most this share of the egress budget (less with many peers).
FALLBACK_SHARE_RATIO = 0.05
#: While Redis is unreachable, try it again this often (not on every call: a connect timeout per call).
REDIS_RETRY_S = 5.0
#: Socket timeouts of the budget's Redis client: an unreachable Redis must not stall every REST call.
REDIS_TIMEOUT_S = 0.5
#: A process counts as a peer of the budget this long after its last call (covers the 30 min keepalive).
PEER_TTL_S = 3600.0
#: Refresh this process's entry in the peer set at most this often.
PEER_REFRESH_S = 60.0

#: What an unreachable or failing Redis raises through redis-py and ``limits``: the local share decides.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)


def fallback_limit(limit: int, peers: int, ratio: float = FALLBACK_SHARE_RATIO) -> int:
    """Weight per window one process allows itself without Redis: its share among ``peers``, at most
    ``ratio`` of the egress budget, never nothing."""
    return max(1, math.floor(limit * min(ratio, 1.0 / max(1, peers))))


#: The Redis connection pools of this process, by URL: every budget of a process (its REST weight, its
#: connection attempts) shares one, so a child holds one Redis connection for both, not one per budget.
_pools: dict[str, redis.ConnectionPool] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:  # pragma: no cover - runs in a forked child
    global _pools_lock
    _pools.clear()  # the parent's connections are the parent's: a child connects its own
    _pools_lock = threading.Lock()  # a parent's thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_pools)


def process_pool(redis_url: str) -> redis.ConnectionPool:
    """This process's pool for the budgets at ``redis_url``: short timeouts and no retries inside redis-py
    (a failed call means "fall back now", not seconds of backoff)."""
    with _pools_lock:
        pool = _pools.get(redis_url)
        if pool is None:
            pool = _pools[redis_url] = redis.ConnectionPool.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
                driver_info=redis_driver_info(),
            )
        return pool


def disconnect_pools() -> None:
    """Close and forget every pool of this process (tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.disconnect()


class SharedWindow:
    """A moving window of ``limit`` units per ``window_s`` for every process of one egress. Thread-safe;
    one per process, egress and resource.

    ``redis_url=None``: a process-local window (clients built without settings, tests): the whole
    ``limit`` in memory.
    """

    #: The ``limits`` identifier of the window (its Redis key ``<prefix>:LIMITER/<resource>/...``).
    resource = "weight"
    #: What one unit of the window is, in log lines.
    unit = "weight"
    #: A process counts as a peer of the window this long after it last took from it.
    peer_ttl_s = PEER_TTL_S

    def __init__(
        self,
        name: str,
        limit: int,
        *,
        redis_url: str | None,
        key_prefix: str,
        fallback_ratio: float,
        window_s: int,
    ) -> None:
        if redis_url is not None and not key_prefix:
            raise ValueError("a shared budget needs a key prefix")
        self.name = name
        self.limit = max(1, int(limit))
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.fallback_ratio = fallback_ratio
        self.window_s = window_s
        self._pid = -1
        self._lock = threading.Lock()
        self._reinit()

    def _reinit(self) -> None:
        """Per-process state: built lazily in the process that uses it (again after a fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a lock held by a thread of the parent would never be released here
        self._client: redis.Redis | None = None
        self._shared: MovingWindowRateLimiter | None = None
        self._item: RateLimitItem = RateLimitItemPerSecond(self.limit, padded_window(self.window_s))
        self._local: MovingWindowRateLimiter | None = None
        self._local_item: RateLimitItem | None = None
        #: Redis failed and has not answered since: the local fallback decides.
        self.fallback = False
        self._fallback_limit = self.limit
        self._retry_redis_at = 0.0
        self._peers = 1
        self._peers_at = -math.inf

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._reinit()

    @property
    def shared(self) -> bool:
        return self.redis_url is not None

    # ------------------------------------------------------------------ Redis, lazily, with a fallback
    def _redis(self) -> tuple[redis.Redis, MovingWindowRateLimiter] | None:
        """The shared client and limiter, or None while Redis is known to be down (or not used)."""
        if self.redis_url is None:
            return None
        with self._lock:
            if self.fallback and time.monotonic() < self._retry_redis_at:
                return None
            if self._client is None or self._shared is None:
                # no retries inside redis-py: a failed call means "fall back now", not seconds of backoff
                pool = process_pool(self.redis_url)
                storage = RedisStorage(self.redis_url, connection_pool=pool, key_prefix=self.key_prefix)
                client = cast(redis.Redis, storage.get_connection())
                self._connected(client)
                self._client, self._shared = client, MovingWindowRateLimiter(storage)
            return self._client, self._shared

    def _connected(self, client: redis.Redis) -> None:
        """The process's client of the window's Redis was just built (register scripts on it here)."""

    def shared_client(self) -> redis.Redis | None:
        """This process's client of the budget's Redis, None while Redis is known to be down (or not
        used): for state kept beside the budget's keys (``<key_prefix>:...``). Report how a call on it
        went with ``redis_answered``, so that the budget's fallback follows it."""
        self._check_process()
        shared = self._redis()
        return None if shared is None else shared[0]

    def redis_answered(self, error: BaseException | None = None) -> None:
        """A call on ``shared_client()`` answered (``error`` None) or failed with ``error``."""
        if error is None:
            self._redis_ok()
        else:
            self._redis_failed(error)

    def disconnect(self) -> None:
        """Close this process's Redis connection (the supervisor, before it forks: no socket crosses a
        fork); the next call connects again."""
        with self._lock:
            client, self._client, self._shared = self._client, None, None
        if client is not None:
            client.connection_pool.disconnect()

    def _redis_failed(self, error: BaseException) -> None:
        with self._lock:
            self._retry_redis_at = time.monotonic() + REDIS_RETRY_S
            if self.fallback:
                return
            self.fallback = True
            self._fallback_limit = fallback_limit(self.limit, self._peers, self.fallback_ratio)
        log.warning(
            "egress budget %s: Redis unreachable (%s: %s): this process keeps to a local share of %s"
            " until Redis answers again",
            self.name,
            type(error).__name__,
            redact(str(error))[:200],
            self._fallback_text(),
        )

    def _redis_ok(self) -> None:
        if not self.fallback:
            return
        with self._lock:
            if not self.fallback:
                return
            self.fallback = False
        log.info(
            "egress budget %s: Redis answers again: back to the shared budget of %d", self.name, self.limit
        )

    def _fallback_text(self) -> str:
        return (
            f"{self._fallback_limit} {self.unit} per {self.window_s}s"
            f" (1/{max(1, round(self.limit / self._fallback_limit))} of {self.limit})"
        )

    def _local_window(self) -> tuple[int, int]:
        """(amount, seconds) of the in-memory window: the whole budget, or the fallback share."""
        return (self._fallback_limit if self.shared else self.limit), padded_window(self.window_s)

    def _local_limiter(self) -> tuple[MovingWindowRateLimiter, RateLimitItem]:
        amount, seconds = self._local_window()
        with self._lock:
            item = self._local_item
            if self._local is None or item is None or (item.amount, item.multiples) != (amount, seconds):
                item = RateLimitItemPerSecond(amount, seconds)
                self._local, self._local_item = MovingWindowRateLimiter(MemoryStorage()), item
            return self._local, item

    def _note_peer(self, client: redis.Redis) -> None:
        now = time.monotonic()
        if now < self._peers_at + PEER_REFRESH_S:
            return
        self._peers_at = now
        key, wall = f"{self.key_prefix}:peers", time.time()
        pipe = client.pipeline(transaction=False)
        pipe.zadd(key, {f"{socket.gethostname()}:{os.getpid()}": wall})
        pipe.zremrangebyscore(key, "-inf", wall - self.peer_ttl_s)
        pipe.expire(key, int(self.peer_ttl_s))
        pipe.zcard(key)
        self._peers = max(1, int(pipe.execute()[-1]))

    # ------------------------------------------------------------------ taking from the window
    def try_take(self, weight: int, leave: int = 0) -> tuple[bool, float]:
        """Take ``weight`` now if the window has room: (taken, seconds until the oldest entry frees).

        ``leave``: take only if that much more would still fit, in the same atomic step (the moving
        window's own script, run with the limit less ``leave``): what is left is for callers without it."""
        self._check_process()
        shared = self._redis()
        if shared is not None:
            client, limiter = shared
            try:
                if self._acquire(limiter, self._item, weight, leave):
                    self._redis_ok()
                    try:
                        self._note_peer(client)
                    except REDIS_ERRORS as e:  # the weight is taken: never take it again locally
                        self._redis_failed(e)
                    return True, 0.0
                stats = limiter.get_window_stats(self._item, self.resource)
                self._redis_ok()
                return False, max(0.0, stats.reset_time - time.time())
            except REDIS_ERRORS as e:
                self._redis_failed(e)
        local, item = self._local_limiter()
        if self._acquire(local, item, weight, leave):
            return True, 0.0
        return False, max(0.0, local.get_window_stats(item, self.resource).reset_time - time.time())

    def _acquire(
        self, limiter: MovingWindowRateLimiter, item: RateLimitItem, weight: int, leave: int
    ) -> bool:
        """What ``limiter.hit`` runs, with the window's amount less ``leave``: the shared window's, or the local
        one's (``leave`` in its own terms: it may be the fallback share). A call heavier than the window takes
        all of it."""
        cost = min(max(1, weight), item.amount)
        leave = min(max(0, leave) * item.amount // self.limit, item.amount - cost)
        storage = cast(MovingWindowSupport, limiter.storage)
        return bool(
            storage.acquire_entry(
                item.key_for(self.resource), item.amount - leave, item.get_expiry(), amount=cost
            )
        )

    def remaining(self) -> int | None:
        """Units left in the current window (shared if Redis answers), None if unknown."""
        self._check_process()
        shared = self._redis()
        if shared is not None:
            try:
                return int(shared[1].get_window_stats(self._item, self.resource).remaining)
            except REDIS_ERRORS as e:
                self._redis_failed(e)
        local, item = self._local_limiter()
        return int(local.get_window_stats(item, self.resource).remaining)

    def clear_local(self) -> None:
        """Forget this process's local window (tests)."""
        with self._lock:
            self._local = None
            self._local_item = None
