"""One REST weight budget per egress IP, shared by every kraite-mp process behind it (Redis + ``limits``).

The WebSocket connection budget (``kraite_mp.binance.connections``) is built on the same engine.

Binance counts request weight per IP (2,400/min, shared by USD-M and COIN-M, and the trading back end on
the same IP spends from it too). Every kraite-mp process of one egress (user-data children, mark-price,
the sync child, the reconcile workers; hosts behind one NAT name the same ``binance.egress_id``) takes
the weight of a call from one moving window of ``binance.weight_share`` x ``binance.weight_limit_per_min``
before sending it, and waits (bounded, cut short by the caller's stop event) while the window is full.

A 429/418 seen by any process is written to Redis as a deadline (a key whose TTL is the Retry-After,
only ever lengthened): every process of the egress then refuses calls until it passed, plus a random
delay per process so that they do not all resume in the same instant.

While Redis is unreachable a process keeps to a conservative local share: the shared budget divided by
the number of processes last seen using it (at most ``FALLBACK_SHARE_RATIO`` of it), in an in-memory
window. It says so once when it falls back and once when Redis is back; it never bursts.

Keys, under the deployment's ``redis_namespace``: ``<ns>:egress:<egress_id>:<REST host>`` + ``:LIMITER/...``
(the ``limits`` moving window), ``:ban`` (``"<status>:<Retry-After ms>"``, TTL = the deadline) and
``:peers`` (processes that spent from the budget lately). The REST host is part of the key because each
exchange endpoint (production, testnet, a simulator) is its own limit pool.

Nothing connects before it is used: the Redis client is built in the process that first needs it, and
rebuilt when the object finds itself in a forked child, so no socket crosses a fork.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, MovingWindowSupport, RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from kraite_mp.logs import redact
from kraite_mp.messages import redis_driver_info

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: Length of the weight window (Binance: X-MBX-USED-WEIGHT-1M); a moving window is never looser than theirs.
WINDOW_S = 60
#: Every window is kept this share longer than the exchange's (60 s -> 62 s, 300 s -> 310 s): a unit is
#: taken a little before the exchange counts it (the request's way there), so with an exact window two
#: bursts one window apart could land in one of the exchange's (measured: 1,288 of a 1,200 share in a
#: rolling minute, calls 59.98 s apart). Costs 3 % of the sustained rate.
WINDOW_MARGIN_RATIO = 1 / 30


def padded_window(window_s: int) -> int:
    """The window (whole seconds) kraite-mp keeps to for an exchange window of ``window_s``."""
    return window_s + math.floor(window_s * WINDOW_MARGIN_RATIO + 0.5)  # half up: 15 s -> 16 s


#: Longest a call waits for budget before it is refused (a full window frees within one minute).
MAX_WAIT_S = 61.0
#: Shortest pause between two tries of a full window, plus up to this random part (spreads the waiters).
MIN_POLL_S = 0.05
POLL_JITTER_S = 0.25
#: After a 429/418 each process resumes at the deadline plus a random delay of up to this share of the
#: Retry-After, kept within [RESUME_SPREAD_MIN_S, RESUME_SPREAD_MAX_S].
RESUME_SPREAD_RATIO = 0.1
RESUME_SPREAD_MIN_S = 1.0
RESUME_SPREAD_MAX_S = 10.0
#: Without Redis a process allows itself at most this share of the egress budget (less with many peers).
FALLBACK_SHARE_RATIO = 0.05
#: Share of the REST budget that every call but the streams' own (listenKey create/keepalive/close) leaves
#: free: a fleet-wide sync or the reconciliations after a mass drop never keep a stream from (re)connecting.
#: 120 weight a minute of 1,200: the listenKeys of ~2,000 accounts (connects paced at 150 per 310 s,
#: keepalives every 30 min).
STREAM_RESERVE_RATIO = 0.1
#: While Redis is unreachable, try it again this often (not on every call: a connect timeout per call).
REDIS_RETRY_S = 5.0
#: Socket timeouts of the budget's Redis client: an unreachable Redis must not stall every REST call.
REDIS_TIMEOUT_S = 0.5
#: A process counts as a peer of the budget this long after its last call (covers the 30 min keepalive).
PEER_TTL_S = 3600.0
#: Refresh this process's entry in the peer set at most this often.
PEER_REFRESH_S = 60.0

#: A 429/418 deadline that only ever grows; a 418 (ban) stays a 418 while it lasts.
_BAN_SCRIPT = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[2])
local current = redis.call('GET', KEYS[1])
local value = ARGV[1]
if current and string.sub(current, 1, 4) == '418:' and string.sub(value, 1, 4) ~= '418:' then
  value = current
end
if left < want then
  redis.call('SET', KEYS[1], value, 'PX', want)
elseif value ~= current then
  redis.call('SET', KEYS[1], value, 'KEEPTTL')
end
return 1
"""

#: What an unreachable or failing Redis raises through redis-py and ``limits``: the local share decides.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)


class BudgetExhausted(Exception):
    """No weight freed within the wait bound, or the process is stopping: ``retry_after_s`` until some may."""

    def __init__(self, weight: int, limit: int, retry_after_s: float, *, stopping: bool) -> None:
        self.weight = weight
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.stopping = stopping
        why = "the process is stopping" if stopping else "no weight freed in time"
        super().__init__(
            f"egress REST budget of {limit}/min spent ({why}); {retry_after_s:.0f}s until it frees"
        )


@dataclass(frozen=True)
class Block:
    """An active 429/418 as this process sees it: ``left_s`` includes this process's resume delay."""

    status: int
    left_s: float


def resume_spread_s(retry_after_s: float) -> float:
    """The largest random delay added to a Retry-After deadline, so that processes resume spread out."""
    return min(RESUME_SPREAD_MAX_S, max(RESUME_SPREAD_MIN_S, RESUME_SPREAD_RATIO * retry_after_s))


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


class EgressBudget:
    """The REST weight budget and the 429/418 state of one egress. Thread-safe; one per process and egress.

    ``redis_url=None``: a process-local budget (clients built without settings, tests): the whole
    ``weight_per_window`` in memory, bans known to this process only.
    """

    #: The ``limits`` identifier of the window (its Redis key ``<prefix>:LIMITER/<resource>/...``).
    resource = "weight"
    #: What one unit of the window is, in log lines.
    unit = "weight"
    #: A process counts as a peer of the budget this long after it last took from it.
    peer_ttl_s = PEER_TTL_S

    def __init__(
        self,
        name: str,
        weight_per_window: int,
        *,
        redis_url: str | None = None,
        key_prefix: str = "",
        fallback_ratio: float = FALLBACK_SHARE_RATIO,
        window_s: int = WINDOW_S,
    ) -> None:
        if redis_url is not None and not key_prefix:
            raise ValueError("a shared budget needs a key prefix")
        self.name = name
        self.limit = max(1, int(weight_per_window))
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.fallback_ratio = fallback_ratio
        self.window_s = window_s
        self._pid = -1
        self._lock = threading.Lock()
        self._blocked_until = 0.0
        self._blocked_status = 0
        self._reinit()

    def _reinit(self) -> None:
        """Per-process state: built lazily in the process that uses it (again after a fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a lock held by a thread of the parent would never be released here
        self._client: redis.Redis | None = None
        self._shared: MovingWindowRateLimiter | None = None
        self._ban_script: Any = None
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

    def __repr__(self) -> str:
        where = "redis" if self.shared else "local"
        return f"EgressBudget({self.name!r}, {self.limit}/{self.window_s}s, {where})"

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
                self._ban_script = client.register_script(_BAN_SCRIPT)
                self._client, self._shared = client, MovingWindowRateLimiter(storage)
            return self._client, self._shared

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

    # ------------------------------------------------------------------ weight
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

    @property
    def stream_reserve(self) -> int:
        """The weight per window that bulk calls leave to the streams' listenKey calls (``leave``)."""
        return max(1, int(self.limit * STREAM_RESERVE_RATIO)) if self.limit > 1 else 0

    def acquire(
        self, weight: int, stop: threading.Event, max_wait_s: float = MAX_WAIT_S, leave: int = 0
    ) -> float:
        """Take ``weight`` before a call is sent, waiting while the window is full: the seconds waited.
        ``leave``: as in ``try_take``, wait until that much more would still fit.

        Raises ``BudgetExhausted`` when nothing freed within ``max_wait_s`` or ``stop`` is set meanwhile.
        """
        start = time.monotonic()
        deadline = start + max_wait_s
        while True:
            taken, retry_in = self.try_take(weight, leave)
            if taken:
                return time.monotonic() - start
            now = time.monotonic()
            if stop.is_set() or now >= deadline:
                raise BudgetExhausted(weight, self.current_limit, retry_in, stopping=stop.is_set())
            pause = min(max(retry_in, MIN_POLL_S) + random.uniform(0.0, POLL_JITTER_S), deadline - now)
            if stop.wait(pause):
                raise BudgetExhausted(weight, self.current_limit, retry_in, stopping=True)

    @property
    def current_limit(self) -> int:
        """The weight per window this process keeps to now (the local share while Redis is down)."""
        return self._fallback_limit if self.shared and self.fallback else self.limit

    def remaining(self) -> int | None:
        """Weight left in the current window (shared if Redis answers), None if unknown."""
        self._check_process()
        shared = self._redis()
        if shared is not None:
            try:
                return int(shared[1].get_window_stats(self._item, self.resource).remaining)
            except REDIS_ERRORS as e:
                self._redis_failed(e)
        local, item = self._local_limiter()
        return int(local.get_window_stats(item, self.resource).remaining)

    # ------------------------------------------------------------------ 429 / 418
    def block(self, status: int, retry_after_s: float) -> float:
        """Record a 429/418 for every process of the egress: the seconds this process now waits."""
        self._check_process()
        now = time.monotonic()
        left = retry_after_s + random.uniform(0.0, resume_spread_s(retry_after_s))
        with self._lock:
            if status == 418 or self._blocked_status != 418 or self._blocked_until <= now:
                self._blocked_status = status  # a ban in force stays a ban
            if now + left > self._blocked_until:
                self._blocked_until = now + left
        shared = self._redis()
        if shared is not None and retry_after_s > 0:
            ms = max(1, int(retry_after_s * 1000))
            try:
                self._ban_script(keys=[f"{self.key_prefix}:ban"], args=[f"{status}:{ms}", ms])
                self._redis_ok()
            except REDIS_ERRORS as e:
                self._redis_failed(e)
        return max(0.0, self._blocked_until - now)

    def blocked(self) -> Block | None:
        """The 429/418 in force for this egress (its own or another process's), or None."""
        self._check_process()
        now = time.monotonic()
        with self._lock:
            if self._blocked_until > now:
                return Block(self._blocked_status or 429, self._blocked_until - now)
        shared = self._redis()
        if shared is None:
            return None
        try:
            pipe = shared[0].pipeline(transaction=False)
            pipe.get(f"{self.key_prefix}:ban")
            pipe.pttl(f"{self.key_prefix}:ban")
            value, ttl_ms = pipe.execute()
            self._redis_ok()
        except REDIS_ERRORS as e:
            self._redis_failed(e)
            return None
        if value is None or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            return None
        status, retry_ms = _parse_ban(value)
        left = ttl_ms / 1000 + random.uniform(
            0.0, resume_spread_s(retry_ms / 1000 if retry_ms else ttl_ms / 1000)
        )
        with self._lock:
            if now + left > self._blocked_until:
                self._blocked_until = now + left
                self._blocked_status = status
            return Block(self._blocked_status, self._blocked_until - now)

    def clear_local(self) -> None:
        """Forget this process's view of a ban and its local window (tests)."""
        with self._lock:
            self._blocked_until = 0.0
            self._blocked_status = 0
            self._local = None
            self._local_item = None


def _parse_ban(value: Any) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else str(value)
    status_s, _, ms_s = text.partition(":")
    try:
        status = int(status_s)
    except ValueError:
        status = 429
    try:
        ms = int(ms_s)
    except ValueError:
        ms = 0
    return (status if status in (429, 418) else 429), ms


# ---------------------------------------------------------------------- one budget per process and egress
_budgets: dict[tuple[Any, ...], EgressBudget] = {}
_budgets_lock = threading.Lock()


def egress_id(settings: Settings) -> str:
    """``binance.egress_id``, or this host's name when it is empty (the default)."""
    return settings.binance.egress_id.strip() or socket.gethostname()


def budget_key(namespace: str, egress: str, rest_url: str) -> str:
    """``<ns>:egress:<egress_id>:<REST host>``: the Redis key prefix of one egress's budget."""
    return f"{namespace}:egress:{egress}:{urlsplit(rest_url).netloc or rest_url}"


def cached_budget(key: tuple[Any, ...], build: Callable[[], EgressBudget]) -> EgressBudget:
    """The one budget object of this process for ``key`` (built on first use)."""
    with _budgets_lock:
        budget = _budgets.get(key)
        if budget is None:
            budget = _budgets[key] = build()
        return budget


def shared_budget(settings: Settings) -> EgressBudget:
    """The budget every process of this egress shares through Redis (one object per process)."""
    b = settings.binance
    limit = max(1, math.floor(b.weight_limit_per_min * b.weight_share))
    egress = egress_id(settings)
    key = budget_key(settings.redis_namespace, egress, b.rest_url)
    host = urlsplit(b.rest_url).netloc or b.rest_url
    return cached_budget(
        ("redis", settings.redis_url, key, limit),
        lambda: EgressBudget(f"{egress}@{host}", limit, redis_url=settings.redis_url, key_prefix=key),
    )


def local_budget(base_url: str, weight_per_min: int) -> EgressBudget:
    """A process-local budget for clients built without settings (the whole ``weight_per_min``)."""
    return cached_budget(("local", base_url, weight_per_min), lambda: EgressBudget(base_url, weight_per_min))


def reset_budgets() -> None:
    """Forget every budget object of this process (tests); Redis keeps what it holds."""
    with _budgets_lock:
        budgets = list(_budgets.values())
        _budgets.clear()
    for budget in budgets:
        budget.clear_local()
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.disconnect()
