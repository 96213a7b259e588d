"""REST side of the simulator: listenKey, signed reconciliation endpoints, weights and limits.

Matches Binance USD-M: errors are ``{"code": <int>, "msg": <str>}`` with Binance's HTTP status,
every ``/fapi`` reply carries ``X-MBX-USED-WEIGHT-1M`` (rolling 60 s sum for the client IP),
over ``weight_limit_1m`` -> 429 -1003 with ``Retry-After``; requests sent while told to wait
earn a 418 ban. Signed requests are checked with real HMAC-SHA256 over the query string
(plus body) without the ``signature`` parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from kraite_mp.simulator.engine import ApiError, Engine

log = logging.getLogger(__name__)

#: Request weight allowed per IP per rolling minute (production: 2400).
DEFAULT_WEIGHT_LIMIT_1M = 2400
#: Length of the rolling window that weight limit applies to.
WEIGHT_WINDOW_S = 60.0
#: recvWindow of a request that sends none, in ms.
DEFAULT_RECV_WINDOW_MS = 5000
#: Largest accepted recvWindow, in ms.
MAX_RECV_WINDOW_MS = 60000
#: Requests made while a 429 Retry-After runs, before the IP is banned (418).
STRIKES_BEFORE_BAN = 3
#: Length of a 418 ban earned by ignoring 429s.
DEFAULT_BAN_S = 120.0
#: Allowed clock lead of a request timestamp over the server, in ms (Binance: 1000).
MAX_CLOCK_LEAD_MS = 1000
#: Longest startTime..endTime window of allOrders and allAlgoOrders, in ms (7 days).
SEARCH_WINDOW_MS = 7 * 86_400_000
#: The request log keeps this many of the latest /fapi requests.
REQUEST_LOG_MAX = 100_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _with_symbol(light: int, heavy: int) -> Callable[[web.Request], int]:
    return lambda request: light if request.query.get("symbol") else heavy


#: (method, path) -> weight, or a function of the request.
WEIGHTS: dict[tuple[str, str], int | Callable[[web.Request], int]] = {
    ("GET", "/fapi/v1/openOrders"): _with_symbol(1, 40),
    ("GET", "/fapi/v1/openAlgoOrders"): _with_symbol(1, 40),
    ("GET", "/fapi/v1/order"): 1,
    ("GET", "/fapi/v1/algoOrder"): 1,
    ("GET", "/fapi/v1/allOrders"): 5,
    ("GET", "/fapi/v1/allAlgoOrders"): 5,
    ("GET", "/fapi/v3/positionRisk"): 5,
    ("GET", "/fapi/v3/balance"): 5,
    ("GET", "/fapi/v3/account"): 5,
    ("GET", "/fapi/v1/time"): 1,
    ("GET", "/fapi/v1/ping"): 1,
    ("GET", "/fapi/v1/exchangeInfo"): 1,
    ("POST", "/fapi/v1/listenKey"): 1,
    ("PUT", "/fapi/v1/listenKey"): 1,
    ("DELETE", "/fapi/v1/listenKey"): 1,
}


def weight_of(request: web.Request) -> int:
    weight = WEIGHTS.get((request.method, request.path), 1)
    return weight if isinstance(weight, int) else weight(request)


def error(status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)


def sign(secret: str, payload: str) -> str:
    """Hex HMAC-SHA256 of ``payload``: what a client appends as ``signature``."""
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


class LoggedRequest(NamedTuple):
    """One /fapi request as it arrived: ``at`` is wall-clock seconds (comparable across local processes)."""

    at: float
    method: str
    path: str
    status: int
    weight: int
    api_key: str


@dataclass
class _IpState:
    weights: deque[tuple[float, int]] = field(default_factory=deque)
    used: int = 0
    wait_until: float = 0.0
    strikes: int = 0
    banned_until: float = 0.0


class RateLimiter:
    """Rolling per-IP weight accounting, 429/418 answers and injected failures."""

    def __init__(self, limit: int = DEFAULT_WEIGHT_LIMIT_1M, ban_s: float = DEFAULT_BAN_S) -> None:
        self.limit = limit
        self.ban_s = ban_s
        self._ips: dict[str, _IpState] = {}
        self.injected_status = 429
        self.injected_left = 0
        self.injected_retry_after_s = 1.0
        #: Report, per IP (kept across ``reset``): 429/418 replies sent, and the highest rolling
        #: one-minute weight ever accepted.
        self.sent: dict[str, dict[int, int]] = {}
        self.peak_weight: dict[str, int] = {}

    def report(self) -> dict[str, object]:
        """429s and 418s sent and the peak accepted weight in any rolling minute, in total and per IP
        (the total peak is the highest of any one IP, since the limit is per IP)."""
        per_ip: dict[str, dict[str, int]] = {}
        for ip in sorted(set(self.sent) | set(self.peak_weight)):
            sent = self.sent.get(ip, {})
            per_ip[ip] = {
                "sent_429": sent.get(429, 0),
                "sent_418": sent.get(418, 0),
                "peak_weight_1m": self.peak_weight.get(ip, 0),
            }
        return {
            "sent_429": sum(c["sent_429"] for c in per_ip.values()),
            "sent_418": sum(c["sent_418"] for c in per_ip.values()),
            "peak_weight_1m": max((c["peak_weight_1m"] for c in per_ip.values()), default=0),
            "per_ip": per_ip,
        }

    def reset(self) -> None:
        self._ips.clear()
        self.injected_left = 0

    def inject(self, status: int, count: int, retry_after_s: float) -> None:
        if status not in (429, 418):
            raise ValueError("status must be 429 or 418")
        self.injected_status = status
        self.injected_left = count
        self.injected_retry_after_s = retry_after_s

    def _state(self, ip: str, now: float) -> _IpState:
        state = self._ips.setdefault(ip, _IpState())
        while state.weights and now - state.weights[0][0] >= WEIGHT_WINDOW_S:
            state.used -= state.weights.popleft()[1]
        return state

    def used(self, ip: str) -> int:
        return self._state(ip, time.monotonic()).used

    def check(self, ip: str, weight: int) -> web.Response | None:
        """Count the request, or return the 429/418 reply that replaces it."""
        now = time.monotonic()
        state = self._state(ip, now)
        if now < state.banned_until:
            return self._reply(418, state.banned_until - now, state.used, ip)
        if self.injected_left > 0:
            self.injected_left -= 1
            return self._reply(self.injected_status, self.injected_retry_after_s, state.used, ip)
        if now < state.wait_until:  # told to wait and did not: every such request is a strike
            state.strikes += 1
            if state.strikes >= STRIKES_BEFORE_BAN:
                state.banned_until = now + self.ban_s
                state.wait_until = 0.0
                state.strikes = 0
                log.warning(
                    "ip=%s ignored Retry-After %d times: banned for %.0fs", ip, STRIKES_BEFORE_BAN, self.ban_s
                )
                return self._reply(418, self.ban_s, state.used, ip)
            return self._reply(429, state.wait_until - now, state.used, ip)
        if state.used + weight > self.limit:
            retry = self._retry_after(state, weight, now)
            state.wait_until = now + retry
            return self._reply(429, retry, state.used, ip)
        state.strikes = 0
        state.weights.append((now, weight))
        state.used += weight
        if state.used > self.peak_weight.get(ip, 0):
            self.peak_weight[ip] = state.used
        return None

    def _retry_after(self, state: _IpState, weight: int, now: float) -> float:
        need = state.used + weight - self.limit
        freed = 0
        for at, w in state.weights:
            freed += w
            if freed >= need:
                return max(0.001, WEIGHT_WINDOW_S - (now - at))
        return WEIGHT_WINDOW_S

    def _reply(self, status: int, retry_after_s: float, used: int, ip: str) -> web.Response:
        sent = self.sent.setdefault(ip, {})
        sent[status] = sent.get(status, 0) + 1
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))), "X-MBX-USED-WEIGHT-1M": str(used)}
        if status == 418:
            until_ms = int((time.time() + retry_after_s) * 1000)
            msg = f"Way too many requests; IP({ip}) banned until {until_ms}. Please use the websocket for live updates to avoid bans."
        else:
            msg = (
                f"Too many requests; current limit of IP({ip}) request weight per minute is {self.limit}. "
                "Please use WebSocket Streams for live updates to avoid polling the API."
            )
        return error(status, -1003, msg, headers)


class RestApi:
    """The ``/fapi`` routes. ``stats`` counts requests per path."""

    def __init__(
        self, engine: Engine, limiter: RateLimiter, on_listen_key_deleted: Callable[[str], None]
    ) -> None:
        self.engine = engine
        self.limiter = limiter
        self.on_listen_key_deleted = on_listen_key_deleted
        self.requests: dict[str, int] = {}
        self._log: deque[LoggedRequest] = deque(maxlen=REQUEST_LOG_MAX)
        self._log_lock = threading.Lock()

    def request_log(self, since: float = 0.0) -> list[LoggedRequest]:
        """The /fapi requests that arrived at or after ``since`` (wall clock), oldest first (thread-safe)."""
        with self._log_lock:
            return [r for r in self._log if r.at >= since]

    def _logged(self, at: float, request: web.Request, status: int, weight: int) -> None:
        record = LoggedRequest(
            at, request.method, request.path, status, weight, request.headers.get("X-MBX-APIKEY", "")
        )
        with self._log_lock:
            self._log.append(record)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("POST", "/fapi/v1/listenKey", self.listen_key_post)
        app.router.add_route("PUT", "/fapi/v1/listenKey", self.listen_key_put)
        app.router.add_route("DELETE", "/fapi/v1/listenKey", self.listen_key_delete)
        app.router.add_get("/fapi/v1/time", self.server_time)
        app.router.add_get("/fapi/v1/ping", self.ping)
        app.router.add_get("/fapi/v1/exchangeInfo", self.exchange_info)
        app.router.add_get("/fapi/v1/openOrders", self.open_orders)
        app.router.add_get("/fapi/v1/order", self.query_order)
        app.router.add_get("/fapi/v1/allOrders", self.all_orders)
        app.router.add_get("/fapi/v1/openAlgoOrders", self.open_algo_orders)
        app.router.add_get("/fapi/v1/algoOrder", self.query_algo_order)
        app.router.add_get("/fapi/v1/allAlgoOrders", self.all_algo_orders)
        app.router.add_get("/fapi/v3/positionRisk", self.position_risk)
        app.router.add_get("/fapi/v3/balance", self.balance)
        app.router.add_get("/fapi/v3/account", self.account)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/fapi/"):
            return await handler(request)
        arrived = time.time()
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        ip = request.remote or "127.0.0.1"
        weight = weight_of(request)
        refused = self.limiter.check(ip, weight)
        if refused is not None:
            self._logged(arrived, request, refused.status, weight)
            return refused
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error(exc.status, exc.code, exc.msg)
        except web.HTTPNotFound:
            response = error(404, -1000, "Not found.")
        except web.HTTPMethodNotAllowed:
            response = error(405, -1000, "Method not allowed.")
        response.headers["X-MBX-USED-WEIGHT-1M"] = str(self.limiter.used(ip))
        self._logged(arrived, request, response.status, weight)
        return response

    # ------------------------------------------------------------------ auth
    def _api_key(self, request: web.Request) -> str:
        api_key = request.headers.get("X-MBX-APIKEY", "")
        self.engine.secret_for(api_key)  # raises -2015
        return api_key

    async def _signed(self, request: web.Request) -> tuple[str, dict[str, str]]:
        """Check key, signature and timestamp; return (api_key, params)."""
        api_key = request.headers.get("X-MBX-APIKEY", "")
        secret = self.engine.secret_for(api_key)
        raw_query = request.raw_path.partition("?")[2]
        body = (await request.text()) if request.can_read_body else ""
        query, sig_q = _strip_signature(raw_query)
        body_part, sig_b = _strip_signature(body)
        signature = sig_q or sig_b
        params = dict(parse_qsl(query, keep_blank_values=True))
        params.update(parse_qsl(body_part, keep_blank_values=True))
        if "timestamp" not in params or not params["timestamp"].lstrip("-").isdigit():
            raise _missing("timestamp")
        if not signature:
            raise _missing("signature")
        expected = sign(secret, query + body_part)
        if not hmac.compare_digest(expected, signature.lower()):
            raise ApiError(400, -1022, "Signature for this request is not valid.")
        recv_window = params.get("recvWindow", str(DEFAULT_RECV_WINDOW_MS))
        if not recv_window.isdigit() or int(recv_window) > MAX_RECV_WINDOW_MS:
            raise ApiError(400, -1130, "Data sent for parameter 'recvWindow' is not valid.")
        timestamp = int(params["timestamp"])
        server_ms = self.engine.now_ms()
        if timestamp > server_ms + MAX_CLOCK_LEAD_MS or server_ms - timestamp > int(recv_window):
            raise ApiError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        return api_key, params

    # ------------------------------------------------------------------ listenKey (USER_STREAM)
    async def listen_key_post(self, request: web.Request) -> web.Response:
        api_key = request.headers.get("X-MBX-APIKEY", "")
        return web.json_response({"listenKey": self.engine.listen_key_create(api_key)})

    async def listen_key_put(self, request: web.Request) -> web.Response:
        api_key = request.headers.get("X-MBX-APIKEY", "")
        given = request.query.get("listenKey") or (await request.post()).get("listenKey")
        key = self.engine.listen_key_keepalive(api_key, str(given) if given else None)
        return web.json_response({"listenKey": key})

    async def listen_key_delete(self, request: web.Request) -> web.Response:
        api_key = request.headers.get("X-MBX-APIKEY", "")
        given = request.query.get("listenKey") or (await request.post()).get("listenKey")
        key = self.engine.listen_key_delete(api_key, str(given) if given else None)
        if key is not None:
            self.on_listen_key_deleted(key)
        return web.json_response({})

    # ------------------------------------------------------------------ public
    async def server_time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": self.engine.now_ms()})

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def exchange_info(self, request: web.Request) -> web.Response:
        symbols = []
        for sym in self.engine.market.usdm_symbols():
            symbols.append(
                {
                    "symbol": sym.symbol,
                    "pair": sym.symbol,
                    "contractType": "PERPETUAL",
                    "deliveryDate": 4133404800000,
                    "onboardDate": 1569398400000,
                    "status": "TRADING",
                    "baseAsset": sym.base_asset,
                    "quoteAsset": sym.quote_asset,
                    "marginAsset": sym.quote_asset,
                    "pricePrecision": sym.price_precision,
                    "quantityPrecision": sym.qty_precision,
                    "baseAssetPrecision": 8,
                    "quotePrecision": 8,
                    "underlyingType": "COIN",
                    "triggerProtect": "0.0500",
                    "filters": [
                        {
                            "filterType": "PRICE_FILTER",
                            "tickSize": str(sym.tick),
                            "minPrice": str(sym.tick),
                            "maxPrice": "1000000",
                        },
                        {
                            "filterType": "LOT_SIZE",
                            "stepSize": str(sym.step),
                            "minQty": str(sym.step),
                            "maxQty": "1000000",
                        },
                    ],
                    "orderTypes": [
                        "LIMIT",
                        "MARKET",
                        "STOP",
                        "STOP_MARKET",
                        "TAKE_PROFIT",
                        "TAKE_PROFIT_MARKET",
                        "TRAILING_STOP_MARKET",
                    ],
                    "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
                }
            )
        return web.json_response(
            {
                "timezone": "UTC",
                "serverTime": self.engine.now_ms(),
                "futuresType": "U_MARGINED",
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.limiter.limit,
                    },
                    {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                ],
                "exchangeFilters": [],
                "assets": [
                    {"asset": a, "marginAvailable": True, "autoAssetExchange": "0"} for a in ("USDT", "USDC")
                ],
                "symbols": symbols,
            }
        )

    # ------------------------------------------------------------------ signed (USER_DATA)
    async def open_orders(self, request: web.Request) -> web.Response:
        api_key, params = await self._signed(request)
        return web.json_response(self.engine.open_orders(api_key, params.get("symbol") or None))

    async def query_order(self, request: web.Request) -> web.Response:
        api_key, params = await self._signed(request)
        symbol = _required(params, "symbol")
        order_id = _int_param(params, "orderId")
        client_id = params.get("origClientOrderId") or None
        if order_id is None and client_id is None:
            raise ApiError(
                400, -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!"
            )
        return web.json_response(self.engine.get_order(api_key, symbol, order_id, client_id))

    async def all_orders(self, request: web.Request) -> web.Response:
        api_key, params = await self._signed(request)
        symbol = _required(params, "symbol")
        limit = _int_param(params, "limit") or 500
        if not 1 <= limit <= 1000:
            raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        start, end = _int_param(params, "startTime"), _int_param(params, "endTime")
        if start is not None and end is not None and end - start > SEARCH_WINDOW_MS:
            raise ApiError(400, -4166, "Search window is restricted to recent 7 days only.")
        orders = self.engine.all_orders(api_key, symbol, _int_param(params, "orderId"), start, end, limit)
        return web.json_response(orders)

    async def open_algo_orders(self, request: web.Request) -> web.Response:
        api_key, params = await self._signed(request)
        return web.json_response(self.engine.open_algos(api_key, params.get("symbol") or None))

    async def query_algo_order(self, request: web.Request) -> web.Response:
        api_key, params = await self._signed(request)
        algo_id = _int_param(params, "algoId")
        client_id = params.get("clientAlgoId") or None
        if algo_id is None and client_id is None:
            raise ApiError(
                400, -1102, "Param 'clientAlgoId' or 'algoId' must be sent, but both were empty/null!"
            )
        return web.json_response(self.engine.get_algo(api_key, algo_id, client_id))

    async def all_algo_orders(self, request: web.Request) -> web.Response:
        """``symbol`` required; ``algoId``, ``startTime``, ``endTime``, ``limit`` (default 500, max 1000);
        the window is at most 7 days: the last 7 without times, 7 from the one time given."""
        api_key, params = await self._signed(request)
        symbol = _required(params, "symbol")
        limit = _int_param(params, "limit")
        limit = 500 if limit is None else limit
        if not 1 <= limit <= 1000:
            raise ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        start, end = _int_param(params, "startTime"), _int_param(params, "endTime")
        if start is None:
            # the last 7 days up to now (and the account's event times, which may run a few ms ahead)
            start = (self.engine.now_ms() if end is None else end) - SEARCH_WINDOW_MS
        elif end is None:
            end = start + SEARCH_WINDOW_MS
        if end is not None and end < start:
            raise ApiError(400, -1130, "Data sent for parameter 'endTime' is not valid.")
        if end is not None and end - start > SEARCH_WINDOW_MS:
            raise ApiError(400, -4166, "Search window is restricted to recent 7 days only.")
        algos = self.engine.all_algos(api_key, symbol, _int_param(params, "algoId"), start, end, limit)
        return web.json_response(algos)

    async def position_risk(self, request: web.Request) -> web.Response:
        """Without ``symbol`` only the symbols with a position or an open order; with it, that one."""
        api_key, params = await self._signed(request)
        return web.json_response(self.engine.position_risk(api_key, params.get("symbol") or None))

    async def balance(self, request: web.Request) -> web.Response:
        api_key, _ = await self._signed(request)
        return web.json_response(self.engine.balances(api_key))

    async def account(self, request: web.Request) -> web.Response:
        api_key, _ = await self._signed(request)
        return web.json_response(self.engine.account_info(api_key))


def _strip_signature(raw: str) -> tuple[str, str | None]:
    """Split ``a=1&b=2&signature=xx`` into ("a=1&b=2", "xx")."""
    if not raw:
        return "", None
    kept: list[str] = []
    signature: str | None = None
    for part in raw.split("&"):
        if part.startswith("signature="):
            signature = part[len("signature=") :]
        else:
            kept.append(part)
    return "&".join(kept), signature


def _int_param(params: dict[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _missing(name) from None


def _required(params: dict[str, str], name: str) -> str:
    """A mandatory, non-empty parameter (-1102 otherwise)."""
    value = params.get(name)
    if not value:
        raise _missing(name)
    return value


def _missing(name: str) -> ApiError:
    return ApiError(400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


__all__ = ["LoggedRequest", "RateLimiter", "RestApi", "sign"]
