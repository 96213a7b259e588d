"""Binance USD-M Futures REST client: listenKeys and the signed order, position and balance queries
reconciliation needs.

One ``BinanceRest`` per account, one ``requests.Session`` under it, a timeout on every call; errors
are translated at this boundary into ``kraite_mp.binance.errors``. Every request first takes its
weight from the egress's shared budget (``kraite_mp.binance.budget``), which also holds the 429/418
block every process of the egress obeys. Signing, the -1021 time-offset retry and the slow-down near the
weight limit follow docs/PROTOCOL.md. No message ever holds the API secret, a signature or a
listenKey: requests' own exception texts (which quote the signed URL) are never passed on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import requests

from kraite_mp.binance.budget import (
    MAX_WAIT_S,
    BudgetExhausted,
    EgressBudget,
    local_budget,
    shared_budget,
)
from kraite_mp.binance.endpoints import ENDPOINT_WEIGHTS, LISTEN_KEY_PATH
from kraite_mp.binance.errors import (
    TIMESTAMP_ERROR_CODE,
    BinanceError,
    RateLimited,
    TransientError,
    reply_error,
)
from kraite_mp.binance.hosts import host_state
from kraite_mp.binance.tls import SharedContextAdapter, client_context
from kraite_mp.logs import redact, register_secret
from kraite_mp.metrics import series

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)

#: Never sleep longer than this for the weight slowdown (the window is one minute).
MAX_SLOWDOWN_SLEEP_S = 61.0
#: Sleep this much past the minute boundary so that the server's window has surely rolled.
SLOWDOWN_MARGIN_S = 0.25
_QUERY_RE = re.compile(r"\?[^\s'\")]*")


def sign(secret: str, query: str) -> str:
    """HMAC-SHA256 of the query string with the API secret, lower-case hex."""
    return hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()


def _scrub(text: str) -> str:
    """A library error text without its query string (signature, listenKey) or any registered secret."""
    return redact(_QUERY_RE.sub("?...", text))[:300]


class BinanceRest:
    """REST calls for one account. Not thread-safe (one session); cheap to create."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str | None = None,
        *,
        recv_window_ms: int = 5000,
        timeout_s: float = 10.0,
        weight_limit_per_min: int = 2400,
        slowdown_ratio: float = 0.8,
        session: requests.Session | None = None,
        stop: threading.Event | None = None,
        budget: EgressBudget | None = None,
        max_budget_wait_s: float = MAX_WAIT_S,
        ca_file: str = "",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._secret = api_secret
        if api_secret:
            register_secret(api_secret)
        self.recv_window_ms = recv_window_ms
        self.timeout_s = timeout_s
        self.weight_limit_per_min = weight_limit_per_min
        self.slowdown_ratio = slowdown_ratio
        self._own_session = session is None
        self.session = session or requests.Session()
        if self._own_session and self.base_url.lower().startswith("https://"):
            # the process's one TLS context (binance.tls): no CA bundle loaded per connection pool
            self.session.mount("https://", SharedContextAdapter(client_context(ca_file)))
        #: Set it to cut a weight-slowdown sleep short (e.g. the child's stop event).
        self.stop = stop or threading.Event()
        self._host = host_state(self.base_url)
        #: The egress's REST budget; without one (no settings) a process-local budget of the whole limit.
        self.budget = budget if budget is not None else local_budget(self.base_url, weight_limit_per_min)
        self.max_budget_wait_s = max_budget_wait_s
        #: Weight per window this client's calls leave untaken for everyone else (at least the streams'
        #: reserve): a background sweep sets it to part of the budget, so that it runs only where there is room.
        self.background_leave = 0
        #: Weight already taken from the budget for calls still to come (``prepay``): they take none again.
        self.prepaid_weight = 0
        #: Requests sent and their weight (by ENDPOINT_WEIGHTS) by this client: what a caller spent.
        self.requests_sent = 0
        self.weight_spent = 0
        #: Seconds slept for the weight slowdown, and waited for the egress budget, by this client.
        self.slowdown_slept_s = 0.0
        self.budget_waited_s = 0.0
        #: When the last request left, on the server's clock as this client knows it (ms; 0: none yet).
        self.sent_at_ms = 0

    @classmethod
    def for_account(cls, settings: Settings, account: Account, **kwargs: Any) -> BinanceRest:
        """A client with the account's decrypted secret, the settings' URL, timeout and limits, and the
        egress's shared budget (``binance.egress_id`` in ``redis_namespace``)."""
        b = settings.binance
        kwargs.setdefault("budget", shared_budget(settings))
        return cls(
            b.rest_url,
            account.api_key,
            account.secret(settings.secret_key),
            recv_window_ms=b.recv_window_ms,
            timeout_s=b.rest_timeout_s,
            weight_limit_per_min=b.weight_limit_per_min,
            slowdown_ratio=b.weight_slowdown_ratio,
            ca_file=b.ca_file,
            **kwargs,
        )

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> BinanceRest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BinanceRest({self.base_url!r}, api_key={self.api_key[:4]}...)"

    # ------------------------------------------------------------------ shared state
    @property
    def used_weight_1m(self) -> int:
        """The last X-MBX-USED-WEIGHT-1M seen for this host in the current minute (0 once it rolled)."""
        if self._host.used_weight_minute != self._server_minute():
            return 0
        return self._host.used_weight

    @property
    def time_offset_ms(self) -> int:
        return self._host.time_offset_ms

    def blocked_for_s(self) -> float:
        """Seconds left before this host may be called again after a 429/418 (0 = not blocked), whichever
        process of the egress saw it."""
        return self._blocked()[1]

    def _blocked(self) -> tuple[int, float]:
        """(429 or 418, seconds left) of the block in force, (0, 0.0) if none: the budget keeps it (a block
        it already knows costs no Redis round trip)."""
        block = self.budget.blocked()
        return (0, 0.0) if block is None else (block.status, block.left_s)

    def _now_ms(self) -> int:
        return int(time.time() * 1000) + self._host.time_offset_ms

    def _server_minute(self) -> int:
        return self._now_ms() // 60_000

    # ------------------------------------------------------------------ listenKeys (USER_STREAM: key, no signature)
    def create_listen_key(self) -> str:
        """POST /fapi/v1/listenKey: the account's key (the active one, extended, if there is one)."""
        data = self._request("POST", LISTEN_KEY_PATH)
        key = data.get("listenKey") if isinstance(data, dict) else None
        if not isinstance(key, str) or not key:
            raise BinanceError(200, None, "POST /fapi/v1/listenKey: reply without a listenKey")
        register_secret(key)
        return key

    def keepalive_listen_key(self) -> str:
        """PUT /fapi/v1/listenKey: extend by 60 minutes; ListenKeyNotFound (-1125) means create a new one."""
        data = self._request("PUT", LISTEN_KEY_PATH)
        key = data.get("listenKey") if isinstance(data, dict) else None
        if isinstance(key, str) and key:
            register_secret(key)
            return key
        return ""

    def close_listen_key(self) -> None:
        """DELETE /fapi/v1/listenKey."""
        self._request("DELETE", LISTEN_KEY_PATH)

    # ------------------------------------------------------------------ signed queries
    def server_time(self) -> int:
        """GET /fapi/v1/time -> serverTime (ms)."""
        data = self._request("GET", "/fapi/v1/time", auth=False)
        return int(data["serverTime"])

    def sync_time(self) -> int:
        """Measure the server-time offset (ms, server minus local, midpoint of the round trip) and keep it."""
        before = time.time() * 1000
        server = self.server_time()
        after = time.time() * 1000
        self._host.time_offset_ms = int(server - (before + after) / 2)
        log.info("server time offset %+d ms (%s)", self._host.time_offset_ms, self.base_url)
        return self._host.time_offset_ms

    def open_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """GET /fapi/v1/openOrders (weight 1 with symbol, 40 without): open regular orders."""
        data = self._request("GET", "/fapi/v1/openOrders", {"symbol": symbol}, signed=True)
        return self._list(data, "openOrders")

    def order(
        self, symbol: str, order_id: int | None = None, orig_client_order_id: str | None = None
    ) -> dict[str, Any]:
        """GET /fapi/v1/order (weight 1): one regular order by orderId or origClientOrderId."""
        if order_id is None and not orig_client_order_id:
            raise ValueError("order(): give order_id or orig_client_order_id")
        params = {"symbol": symbol, "orderId": order_id, "origClientOrderId": orig_client_order_id}
        return self._dict(self._request("GET", "/fapi/v1/order", params, signed=True), "order")

    def open_algo_orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """GET /fapi/v1/openAlgoOrders (weight 1 with symbol, 40 without): open conditional orders."""
        data = self._request("GET", "/fapi/v1/openAlgoOrders", {"symbol": symbol}, signed=True)
        return self._list(data, "openAlgoOrders")

    def algo_order(self, algo_id: int | None = None, client_algo_id: str | None = None) -> dict[str, Any]:
        """GET /fapi/v1/algoOrder (weight 1): one conditional order by algoId or clientAlgoId."""
        if algo_id is None and not client_algo_id:
            raise ValueError("algo_order(): give algo_id or client_algo_id")
        params = {"algoId": algo_id, "clientAlgoId": client_algo_id}
        return self._dict(self._request("GET", "/fapi/v1/algoOrder", params, signed=True), "algoOrder")

    def all_orders(
        self,
        symbol: str,
        *,
        start_time_ms: int | None = None,
        end_time_ms: int | None = None,
        order_id: int | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """GET /fapi/v1/allOrders (weight 5): a symbol's orders (window under 7 days, at most ``limit``)."""
        params = {
            "symbol": symbol,
            "orderId": order_id,
            "startTime": start_time_ms,
            "endTime": end_time_ms,
            "limit": limit,
        }
        return self._list(self._request("GET", "/fapi/v1/allOrders", params, signed=True), "allOrders")

    def all_algo_orders(
        self,
        symbol: str,
        *,
        start_time_ms: int | None = None,
        end_time_ms: int | None = None,
        algo_id: int | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """GET /fapi/v1/allAlgoOrders (weight 5): a symbol's conditional orders (window at most 7 days,
        the last 7 by default; at most ``limit``, 1000 at most)."""
        params = {
            "symbol": symbol,
            "algoId": algo_id,
            "startTime": start_time_ms,
            "endTime": end_time_ms,
            "limit": limit,
        }
        data = self._request("GET", "/fapi/v1/allAlgoOrders", params, signed=True)
        return self._list(data, "allAlgoOrders")

    def position_risk(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """GET /fapi/v3/positionRisk (weight 5): the account's positions. Without ``symbol`` only the
        symbols holding a position or an open order are listed (a closed position is simply absent);
        in hedge mode one item per side. ``sent_at_ms`` is when it was asked."""
        data = self._request("GET", "/fapi/v3/positionRisk", {"symbol": symbol}, signed=True)
        return self._list(data, "positionRisk")

    def balances(self) -> list[dict[str, Any]]:
        """GET /fapi/v3/balance (weight 5): one item per asset of the futures wallet."""
        return self._list(self._request("GET", "/fapi/v3/balance", signed=True), "balance")

    def account(self) -> dict[str, Any]:
        """GET /fapi/v3/account (weight 5): totals, ``assets`` (one per asset: ``walletBalance``,
        ``crossWalletBalance``, ``updateTime``, ...) and ``positions`` (only the symbols holding a position or
        an open order, one item per side; ``positionAmt`` and ``updateTime`` but no entry price)."""
        return self._dict(self._request("GET", "/fapi/v3/account", signed=True), "account")

    @staticmethod
    def _list(data: Any, what: str) -> list[dict[str, Any]]:
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise BinanceError(200, None, f"{what}: expected a JSON array of objects")
        return data

    @staticmethod
    def _dict(data: Any, what: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise BinanceError(200, None, f"{what}: expected a JSON object")
        return data

    # ------------------------------------------------------------------ transport
    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        signed: bool = False,
        auth: bool = True,
    ) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            return self._send(method, path, clean, signed=signed, auth=auth)
        except BinanceError as e:
            if e.code != TIMESTAMP_ERROR_CODE or not signed:
                raise
            log.warning(
                "%s %s: timestamp outside recvWindow (-1021): re-measuring the server time", method, path
            )
        self.sync_time()
        return self._send(method, path, clean, signed=signed, auth=auth)

    def _check_blocked(self, method: str, path: str) -> None:
        status, left = self._blocked()
        if left > 0:
            what = "IP banned by Binance (418)" if status == 418 else "rate limited by Binance (429)"
            raise RateLimited(status, None, f"{method} {path} not sent: {what}, {left:.0f}s left", left)

    def _throttle(self) -> bool:
        """Near the weight limit: wait for the minute window to roll instead of earning a 429 (True if it
        did). The IP's own count (X-MBX-USED-WEIGHT-1M) includes what the trading back end on the same IP
        spent, which the egress budget does not see."""
        used = self.used_weight_1m
        if used < self.slowdown_ratio * self.weight_limit_per_min:
            return False
        now_ms = self._now_ms()
        wait_s = min(MAX_SLOWDOWN_SLEEP_S, (60_000 - now_ms % 60_000) / 1000 + SLOWDOWN_MARGIN_S)
        log.warning(
            "used weight %d of %d per minute: pausing %.1fs until the window rolls",
            used,
            self.weight_limit_per_min,
            wait_s,
        )
        self.slowdown_slept_s += wait_s
        self.stop.wait(wait_s)
        return True

    def _note_weight(self, resp: requests.Response) -> None:
        raw = resp.headers.get("X-MBX-USED-WEIGHT-1M")
        if raw is None:
            return
        try:
            used = int(raw)
        except ValueError:
            return
        self._host.used_weight = used
        self._host.used_weight_minute = self._server_minute()
        series().REST_WEIGHT_USED.labels(self.budget.name.split("@", 1)[0]).set(used)

    @property
    def _bulk_leave(self) -> int:
        """What a call other than a listenKey's leaves in the window: the streams' reserve, or more."""
        return max(self.budget.stream_reserve, self.background_leave)

    def prepay(self, weight: int) -> tuple[bool, float]:
        """Take ``weight`` for the calls to come in one atomic step, leaving ``background_leave`` (at least the
        streams' reserve) free, or nothing: (taken, seconds until the budget's oldest entry leaves the window).
        A sweep that knows its calls takes them all or none, so that it never stops halfway having spent
        weight on what it must read again."""
        taken, retry_in = self.budget.try_take(weight, self._bulk_leave)
        if taken:
            self.prepaid_weight += weight
        return taken, retry_in

    def _take_budget(self, method: str, path: str, weight: int) -> None:
        """Take the call's weight from the egress budget before it is sent (waiting while it is spent)."""
        if path != LISTEN_KEY_PATH and self.prepaid_weight >= weight:
            self.prepaid_weight -= weight
            return
        try:
            # a listenKey call (a stream waits on it) may take the reserve every other call leaves
            leave = 0 if path == LISTEN_KEY_PATH else self._bulk_leave
            waited = self.budget.acquire(weight, self.stop, self.max_budget_wait_s, leave)
        except BudgetExhausted as e:
            raise RateLimited(429, None, f"{method} {path} not sent: {e}", e.retry_after_s) from None
        if waited > 0:
            self.budget_waited_s += waited
            if waited >= 1.0:
                log.info(
                    "%s %s waited %.1fs for the egress REST budget (%s)",
                    method,
                    path,
                    waited,
                    self.budget.name,
                )
            self._check_blocked(method, path)  # another process may have met a 429 meanwhile

    def _send(self, method: str, path: str, params: dict[str, Any], *, signed: bool, auth: bool) -> Any:
        self._check_blocked(method, path)
        if self._throttle():
            self._check_blocked(method, path)
        weight = ENDPOINT_WEIGHTS.get((method, path, "symbol" in params), 1)
        self._take_budget(method, path, weight)
        headers = {}
        if auth:
            headers["X-MBX-APIKEY"] = self.api_key
        query = urlencode(params)
        if signed:
            if not self._secret:
                raise ValueError(f"{method} {path} is a signed endpoint: this client has no API secret")
            extra = urlencode({"recvWindow": self.recv_window_ms, "timestamp": self._now_ms()})
            query = f"{query}&{extra}" if query else extra
            query = f"{query}&signature={sign(self._secret, query)}"
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        self.requests_sent += 1
        self.weight_spent += weight
        self.sent_at_ms = self._now_ms()
        try:
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout_s)
        except requests.Timeout as e:
            raise TransientError(
                0, None, f"{method} {path}: timed out after {self.timeout_s}s ({_scrub(str(e))})"
            ) from None
        except requests.RequestException as e:
            raise TransientError(0, None, f"{method} {path}: {type(e).__name__}: {_scrub(str(e))}") from None
        try:
            self._note_weight(resp)
            return self._handle(method, path, resp)
        finally:
            resp.close()

    def _handle(self, method: str, path: str, resp: requests.Response) -> Any:
        status = resp.status_code
        series().REST_RESPONSES.labels(str(status)).inc()
        try:
            data: Any = json.loads(resp.content, parse_float=Decimal) if resp.content else None
        except ValueError:
            data = None
        code = msg = None
        if isinstance(data, dict) and isinstance(data.get("code"), int) and "msg" in data:
            code, msg = int(data["code"]), str(data["msg"])
        if status < 400 and (code is None or code >= 0):
            if data is None and status != 200:
                raise BinanceError(status, None, f"{method} {path}: unexpected reply")
            return data if data is not None else {}
        where = f"{method} {path}"
        text = _scrub(msg or (resp.text[:200] if data is None else "error"))
        error = reply_error(where, status, code, text, resp.headers.get("Retry-After"))
        if isinstance(error, RateLimited):
            # every process of the egress learns it (through Redis); each resumes a little after the deadline
            self.budget.block(status, error.retry_after_s)
            log.error(
                "%s: %s by Binance for %.0fs: no requests to %s until then",
                where,
                "IP banned" if error.banned else "rate limited",
                error.retry_after_s,
                self.base_url,
            )
        raise error
