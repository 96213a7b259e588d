"""The ``Simulator``: an aiohttp server on its own event loop in a background thread.

It wires the engine (exchange state), the market (mark prices), the REST API, the stream hub
and the control API (``POST /_sim/<method>`` with JSON kwargs), and exposes the same control
calls as thread-safe methods. See the package docstring for the full public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from kraite_mp.simulator.engine import (
    DEFAULT_LISTEN_KEY_TTL_S,
    DEFAULT_MAX_OPEN_ORDERS,
    Engine,
    SimAccount,
    SimulatorError,
)
from kraite_mp.simulator.market import DEFAULT_SYMBOL_COUNT, Market
from kraite_mp.simulator.rest import DEFAULT_BAN_S, DEFAULT_WEIGHT_LIMIT_1M, RateLimiter, RestApi
from kraite_mp.simulator.streams import DEFAULT_CONNECTION_LIMIT, DEFAULT_CONNECTION_WINDOW_S, StreamHub
from kraite_mp.simulator.wsapi import WsApi

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long start() waits for the server to listen.
START_TIMEOUT_S = 10.0
#: How long stop() waits for the server to finish, and a call waits for the server loop to run it.
STOP_TIMEOUT_S = 10.0
#: Upper bound of scenario steps run per account per scheduler tick (when the loop lags).
MAX_STEPS_PER_TICK = 1000
#: The only hosts the simulator binds: it is a test double, never reachable from the network.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

#: Methods callable through the control API (``POST /_sim/<name>``, JSON body = kwargs).
CONTROL_METHODS = frozenset(
    {
        "set_rate",
        "step",
        "place_order",
        "fill",
        "cancel",
        "expire",
        "amend",
        "place_algo",
        "trigger_algo",
        "cancel_algo",
        "reject_algo",
        "expire_algo",
        "account_config_update",
        "expire_in_match",
        "start_triggering",
        "set_position_mode",
        "set_margin_type",
        "deposit",
        "funding_fee",
        "margin_call",
        "liquidate",
        "multi_assets_mode",
        "strategy_update",
        "grid_update",
        "conditional_order_trigger_reject",
        "truth",
        "drop_connections",
        "go_silent",
        "delay_pongs",
        "send_raw",
        "send_market_raw",
        "expire_listen_key",
        "set_listen_key_expired_e",
        "set_max_connection_age",
        "set_lose_while_disconnected",
        "invalidate_api_key",
        "restore_api_key",
        "rate_limit",
        "reset_rate_limits",
        "refuse_connections",
        "set_connection_limit",
        "set_symbols",
        "set_tradfi_symbols",
        "set_mark_price_override",
        "set_clock_offset",
        "stats",
        "handshake_log",
    }
)


class Simulator:
    """A local Binance USD-M compatible exchange. Thread-safe; ``with Simulator() as sim:``."""

    def __init__(
        self,
        accounts: int = 3,
        symbols: int | Sequence[str] = DEFAULT_SYMBOL_COUNT,
        rate: float = 0.0,
        ping_interval_s: float = 180.0,
        pong_timeout_s: float = 600.0,
        max_connection_age_s: float = 86400.0,
        mark_price_interval_s: float = 1.0,
        seed: int = 1,
        listen_key_ttl_s: float = DEFAULT_LISTEN_KEY_TTL_S,
        lose_while_disconnected: bool = True,
        max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS,
        weight_limit_1m: int = DEFAULT_WEIGHT_LIMIT_1M,
        ban_s: float = DEFAULT_BAN_S,
        connection_limit: int = DEFAULT_CONNECTION_LIMIT,
        connection_window_s: float = DEFAULT_CONNECTION_WINDOW_S,
        host: str = "127.0.0.1",
        port: int = 0,
        tradfi_symbols: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"the simulator binds loopback only, not {host!r}")
        self.host = host
        self.port = port
        #: Serve https:// and wss:// (``simulator.tls.make_test_certificate``); None: plain http/ws.
        self.tls = tls
        self.market = Market(symbols, seed, tradfi_symbols)
        self.engine = Engine(accounts, self.market, seed, listen_key_ttl_s, max_open_orders)
        self.hub = StreamHub(
            self.engine,
            ping_interval_s,
            pong_timeout_s,
            max_connection_age_s,
            mark_price_interval_s,
            connection_limit=connection_limit,
            connection_window_s=connection_window_s,
        )
        self.hub.lose_while_disconnected = lose_while_disconnected
        self.limiter = RateLimiter(weight_limit_1m, ban_s)
        self.rest = RestApi(self.engine, self.limiter, self.hub.close_listen_key)
        self.ws_api = WsApi(self.engine, self.limiter, self.hub)
        self.hub.ws_api = self.ws_api.handle
        self.control_requests: dict[str, int] = {}
        self._rate = float(rate)
        self._rate_since = time.monotonic()
        self._rate_done = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._stop_lock = threading.Lock()
        self.engine.set_sink(self.hub.sink)
        # Scenario and state calls are the engine's (and the market's) own methods, with their
        # signatures and defaults: one declaration each. All of them are thread-safe.
        engine = self.engine
        self.step = engine.step
        self.place_order = engine.place_order
        self.fill = engine.fill
        self.cancel = engine.cancel
        self.expire = engine.expire
        self.amend = engine.amend
        self.place_algo = engine.place_algo
        self.trigger_algo = engine.trigger_algo
        self.cancel_algo = engine.cancel_algo
        self.reject_algo = engine.reject_algo
        self.expire_algo = engine.expire_algo
        self.account_config_update = engine.account_config_update
        self.expire_in_match = engine.expire_in_match
        self.start_triggering = engine.start_triggering
        self.set_position_mode = engine.set_position_mode
        self.set_margin_type = engine.set_margin_type
        self.deposit = engine.deposit
        self.funding_fee = engine.funding_fee
        self.margin_call = engine.margin_call
        self.liquidate = engine.liquidate
        self.multi_assets_mode = engine.multi_assets_mode
        self.strategy_update = engine.strategy_update
        self.grid_update = engine.grid_update
        self.conditional_order_trigger_reject = engine.conditional_order_trigger_reject
        self.truth = engine.truth
        self.expire_listen_key = engine.expire_listen_key
        self.set_listen_key_expired_e = engine.set_listen_key_expired_e
        self.set_symbols = self.market.set_symbols
        self.set_tradfi_symbols = self.market.set_tradfi_symbols
        self.set_mark_price_override = self.market.set_override

    # ------------------------------------------------------------------ lifecycle
    @property
    def rest_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._url_host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self._url_host}:{self.port}"

    @property
    def ws_api_url(self) -> str:
        """The WebSocket API (like wss://ws-fapi.binance.com/ws-fapi/v1)."""
        return f"{self.ws_url}/ws-fapi/v1"

    @property
    def control_url(self) -> str:
        return f"{self.rest_url}/_sim"

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def accounts(self) -> list[SimAccount]:
        return self.engine.accounts

    def start(self) -> Simulator:
        """Bind and serve in a background thread; return once listening."""
        if self._stopped.is_set():
            raise RuntimeError("a stopped simulator cannot be restarted; make a new one")
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="kraite-mp-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError("simulator did not start listening in time")
        if self._start_error is not None:
            self.stop()
            raise RuntimeError(f"simulator failed to start: {self._start_error}") from self._start_error
        log.info("simulator listening on %s (%d accounts)", self.rest_url, len(self.accounts))
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; idempotent."""
        with self._stop_lock:
            thread = self._thread
            if thread is None or self._stopped.is_set():
                return
            loop, stop_event = self._loop, self._stop_event
            if loop is not None and stop_event is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stop_event.set)
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                log.error("simulator thread did not stop within %.0fs", STOP_TIMEOUT_S)
            self._stopped.set()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            log.exception("simulator loop crashed")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        self.hub.loop = asyncio.get_running_loop()
        app = web.Application(middlewares=[self.rest.middleware], client_max_size=1 << 20)
        self.rest.add_routes(app)
        app.router.add_get("/private/ws", self.hub.handle_private)
        app.router.add_get("/private/ws/{key}", self.hub.handle_dead)
        app.router.add_get("/private/stream", self.hub.handle_private_stream)
        app.router.add_get("/market/ws", self.hub.handle_market_ws)
        app.router.add_get("/market/ws/{stream}", self.hub.handle_market_ws)
        app.router.add_get("/market/stream", self.hub.handle_market_stream)
        app.router.add_get("/public/ws", self.hub.handle_public_ws)
        app.router.add_get("/public/ws/{stream}", self.hub.handle_public_ws)
        app.router.add_get("/public/stream", self.hub.handle_public_stream)
        app.router.add_get("/ws-fapi/v1", self.hub.handle_ws_api)
        app.router.add_get("/ws", self.hub.handle_retired)
        app.router.add_get("/ws/{tail:.*}", self.hub.handle_retired)
        app.router.add_get("/stream", self.hub.handle_retired)
        app.router.add_get("/_sim/truth", self._control_truth)
        app.router.add_get("/_sim/stats", self._control_stats)
        app.router.add_get("/_sim/accounts", self._control_accounts)
        app.router.add_post("/_sim/{method}", self._control_call)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        tasks: list[asyncio.Task[None]] = []
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self._rate_since, self._rate_done = time.monotonic(), 0
            tasks = [
                asyncio.create_task(self._mark_price_loop(), name="sim-mark-price"),
                asyncio.create_task(self._housekeeping_loop(), name="sim-housekeeping"),
                asyncio.create_task(self._scenario_loop(), name="sim-scenario"),
            ]
            self._ready.set()
            await self._stop_event.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.hub.close_all()
            await runner.cleanup()
            self.hub.loop = None

    # ------------------------------------------------------------------ background loops
    async def _mark_price_loop(self) -> None:
        interval = self.hub.mark_price_interval_s
        deadline = time.monotonic()
        while True:
            deadline += interval
            delay = deadline - time.monotonic()
            if delay < -interval:  # fell behind (suspended?): do not burst to catch up
                deadline = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))
            try:
                self.hub.publish_market(self.market.tick_messages(self.engine.now_ms()))
            except Exception:
                log.exception("mark price tick failed")

    async def _housekeeping_loop(self) -> None:
        while True:
            hub = self.hub
            shortest = min(
                hub.ping_interval_s,
                hub.pong_timeout_s,
                hub.max_connection_age_s,
                self.engine.listen_key_ttl_s,
            )
            await asyncio.sleep(min(0.25, max(0.01, shortest / 10)))
            try:
                hub.housekeep()
                self.engine.expire_due_listen_keys()
            except Exception:
                log.exception("housekeeping failed")

    async def _scenario_loop(self) -> None:
        while True:
            rate = self._rate
            if rate <= 0:
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(min(0.05, max(0.002, 1.0 / rate)))
            due = int((time.monotonic() - self._rate_since) * rate) - self._rate_done
            if due <= 0:
                continue
            if due > MAX_STEPS_PER_TICK:  # lagging: drop the debt instead of bursting forever
                self._rate_done += due - MAX_STEPS_PER_TICK
                due = MAX_STEPS_PER_TICK
            self._rate_done += due
            for account in self.engine.accounts:
                try:
                    self.engine.step(account.api_key, due)
                except Exception:
                    log.exception("scenario step failed for %s...", account.api_key[:8])

    # ------------------------------------------------------------------ loop helper
    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server loop (where the connections live) and return its result."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return fn()
        if threading.get_ident() == self._loop_thread_id:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(STOP_TIMEOUT_S)

    # ------------------------------------------------------------------ scenario / state
    def set_rate(self, events_per_s: float) -> None:
        """Scenario steps per second per account (0 = manual only)."""

        def apply() -> None:
            self._rate = float(events_per_s)
            self._rate_since = time.monotonic()
            self._rate_done = 0

        self._on_loop(apply)

    # ------------------------------------------------------------------ faults
    def drop_connections(self, api_key: str | None = None, abrupt: bool = False) -> int:
        """Close that account's user-data connections (None: every connection, market included;
        "market" / "retired": those). Frames queued before the call are still sent first unless
        ``abrupt`` (TCP dropped without a close frame). Returns how many were closed."""
        return self._on_loop(lambda: self.hub.drop(api_key, abrupt))

    def go_silent(self, target: str, seconds: float) -> int:
        """Make the current connections of an api_key (or "market") half-open for ``seconds``."""
        return self._on_loop(lambda: self.hub.go_silent(target, seconds))

    def delay_pongs(self, target: str, seconds: float) -> int:
        """Answer the pings of an api_key's (or "market"'s) current connections ``seconds`` late."""
        return self._on_loop(lambda: self.hub.delay_pongs(target, seconds))

    def send_raw(self, api_key: str, text: str) -> int:
        return self._on_loop(lambda: self.hub.send_raw(api_key, text))

    def send_market_raw(self, text: str) -> int:
        return self._on_loop(lambda: self.hub.send_raw("market", text))

    def set_max_connection_age(self, seconds: float) -> None:
        def apply() -> None:
            self.hub.max_connection_age_s = float(seconds)

        self._on_loop(apply)

    def set_ping(self, interval_s: float | None = None, pong_timeout_s: float | None = None) -> None:
        def apply() -> None:
            if interval_s is not None:
                self.hub.ping_interval_s = float(interval_s)
            if pong_timeout_s is not None:
                self.hub.pong_timeout_s = float(pong_timeout_s)

        self._on_loop(apply)

    def set_lose_while_disconnected(self, lose: bool = True) -> None:
        def apply() -> None:
            self.hub.lose_while_disconnected = bool(lose)

        self._on_loop(apply)

    def invalidate_api_key(self, api_key: str) -> None:
        """From now on REST calls with this key answer HTTP 401 -2015."""
        self.engine.set_api_key_valid(api_key, False)

    def restore_api_key(self, api_key: str) -> None:
        self.engine.set_api_key_valid(api_key, True)

    def rate_limit(self, status: int = 429, count: int = 1, retry_after_s: float = 1.0) -> None:
        """The next ``count`` /fapi requests answer ``status`` (429 or 418) with Retry-After."""
        self._on_loop(lambda: self.limiter.inject(status, count, retry_after_s))

    def reset_rate_limits(self) -> None:
        """Forget the REST weight, waits and bans, and the WebSocket handshake attempts inside the
        current windows; the 429/418/refusal counts and peaks in ``stats()`` stay."""

        def apply() -> None:
            self.limiter.reset()
            self.hub.reset_connection_windows()

        self._on_loop(apply)

    def refuse_connections(self, seconds: float, drop: bool = False) -> int:
        """A maintenance window: every WebSocket handshake is refused with HTTP 503 for ``seconds``
        (0 ends one early). ``drop`` also closes every open connection in the same step (no
        reconnect slips in between). Returns how many connections were dropped."""
        seconds = float(seconds)

        def apply() -> int:
            self.hub.refuse_connections(seconds)
            return self.hub.drop(None) if drop else 0

        return self._on_loop(apply)

    def set_connection_limit(self, limit: int | None = None, window_s: float | None = None) -> None:
        """Change the WebSocket handshake-attempt limit per IP and/or its rolling window."""

        def apply() -> None:
            if limit is not None:
                self.hub.connection_limit = int(limit)
            if window_s is not None:
                self.hub.connection_window_s = float(window_s)

        self._on_loop(apply)

    @property
    def mark_symbols(self) -> list[tuple[str, int]]:
        return self.market.symbols()

    def set_clock_offset(self, ms: int) -> None:
        """Shift the server clock (serverTime, recvWindow checks, event times) by ``ms``."""
        self.engine.clock_offset_ms = int(ms)

    def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:
            out: dict[str, Any] = {
                "requests": dict(self.rest.requests),
                "control_requests": dict(self.control_requests),
                "rest_limits": self.limiter.report(),
            }
            out.update(self.hub.stats())
            return out

        return self._on_loop(collect)

    def handshake_log(self, since: float | None = None) -> list[dict[str, Any]]:
        """The WebSocket handshake attempts at or after ``since`` (``time.monotonic()`` of this host;
        None: every one kept), oldest first: ``{"t", "ip", "route", "refused": 429 / 503 / None}``."""
        return self._on_loop(lambda: self.hub.handshake_log(since))

    def wait_for_connections(self, target: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``target`` (api_key / "market" / "retired") has ``count`` open connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["current_connections"].get(target, 0) >= count:
                return True
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ control API
    @staticmethod
    def _loopback_only(request: web.Request) -> None:
        if request.remote not in ("127.0.0.1", "::1"):
            raise web.HTTPForbidden(text="control API is loopback only")

    async def _control_truth(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        try:
            return web.json_response(self.truth(request.query.get("api_key", "")))
        except SimulatorError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _control_stats(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        return web.json_response(self.stats())

    async def _control_accounts(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        return web.json_response([{"api_key": a.api_key, "api_secret": a.api_secret} for a in self.accounts])

    async def _control_call(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        method = request.match_info["method"]
        self.control_requests[method] = self.control_requests.get(method, 0) + 1
        if method not in CONTROL_METHODS:
            return web.json_response({"error": f"unknown control method {method!r}"}, status=404)
        try:
            body = await request.text()
            kwargs = json.loads(body) if body.strip() else {}
            if not isinstance(kwargs, dict):
                raise ValueError("the body must be a JSON object of keyword arguments")
            result = getattr(self, method)(**kwargs)
        except (SimulatorError, TypeError, ValueError, ArithmeticError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        return web.json_response({"result": result})


__all__ = ["CONTROL_METHODS", "Simulator"]
