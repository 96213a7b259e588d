"""One REST weight budget per egress IP, shared by every kraite-mp process behind it (Redis + ``limits``).

Binance counts request weight per IP (2,400/min, shared by USD-M and COIN-M, and the trading back end on
the same IP spends from it too). Every kraite-mp process of one egress (user-data children, mark-price,
the sync child, the reconcile workers; hosts behind one NAT name the same ``binance.egress_id``) takes
the weight of a call from one moving window (``kraite_mp.binance.window``, with its local fallback while
Redis is unreachable) of ``binance.weight_share`` x ``binance.weight_limit_per_min`` before sending it,
and waits (bounded, cut short by the caller's stop event) while the window is full.

A 429/418 seen by any process is written to Redis as a deadline (a key whose TTL is the Retry-After,
only ever lengthened): every process of the egress then refuses calls until it passed, plus a random
delay per process so that they do not all resume in the same instant.

Keys, under the deployment's ``redis_namespace``: ``<ns>:egress:<egress_id>:<REST host>`` + ``:LIMITER/...``
(the ``limits`` moving window), ``:ban`` (``"<status>:<Retry-After ms>"``, TTL = the deadline) and
``:peers`` (processes that spent from the budget lately). The REST host is part of the key because each
exchange endpoint (production, testnet, a simulator) is its own limit pool.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis

from kraite_mp.binance.window import (
    FALLBACK_SHARE_RATIO,
    REDIS_ERRORS,
    SharedWindow,
    disconnect_pools,
)

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: Length of the weight window (Binance: X-MBX-USED-WEIGHT-1M); a moving window is never looser than theirs.
WINDOW_S = 60

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
#: Share of the REST budget that every call but the streams' own (listenKey create/keepalive/close) leaves
#: free: a fleet-wide sync or the reconciliations after a mass drop never keep a stream from (re)connecting.
#: 120 weight a minute of 1,200: the listenKeys of ~2,000 accounts (connects paced at 150 per 310 s,
#: keepalives every 30 min).
STREAM_RESERVE_RATIO = 0.1

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


class EgressBudget(SharedWindow):
    """The REST weight budget and the 429/418 state of one egress. Thread-safe; one per process and egress.

    ``redis_url=None``: a process-local budget (clients built without settings, tests): the whole
    ``weight_per_window`` in memory, bans known to this process only.
    """

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
        self._blocked_until = 0.0
        self._blocked_status = 0
        super().__init__(
            name,
            weight_per_window,
            redis_url=redis_url,
            key_prefix=key_prefix,
            fallback_ratio=fallback_ratio,
            window_s=window_s,
        )

    def _reinit(self) -> None:
        super()._reinit()
        self._ban_script: Any = None

    def _connected(self, client: redis.Redis) -> None:
        self._ban_script = client.register_script(_BAN_SCRIPT)

    def __repr__(self) -> str:
        where = "redis" if self.shared else "local"
        return f"EgressBudget({self.name!r}, {self.limit}/{self.window_s}s, {where})"

    # ------------------------------------------------------------------ weight
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
        super().clear_local()
        with self._lock:
            self._blocked_until = 0.0
            self._blocked_status = 0


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
    disconnect_pools()
