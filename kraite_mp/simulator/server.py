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
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from kraite_mp.simulator.engine import (
    DEFAULT_LISTEN_KEY_TTL_SECS,
    DEFAULT_MAX_OPEN_ORDERS,
    Engine,
    SimAccount,
    SimulatorError,
)
from kraite_mp.simulator.market import DEFAULT_SYMBOL_COUNT, Market
from kraite_mp.simulator.rest import DEFAULT_BAN_SECS, DEFAULT_WEIGHT_LIMIT_1M, RateLimiter, RestApi
from kraite_mp.simulator.streams import StreamHub

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long start() waits for the server to listen, and stop() for it to finish.
START_TIMEOUT_SECS = 10.0
STOP_TIMEOUT_SECS = 10.0
#: Upper bound of scenario steps run per account per scheduler tick (when the loop lags).
MAX_STEPS_PER_TICK = 1000
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
        "truth",
        "drop_connections",
        "go_silent",
        "send_raw",
        "send_market_raw",
        "expire_listen_key",
        "set_max_connection_age",
        "set_lose_while_disconnected",
        "invalidate_api_key",
        "restore_api_key",
        "rate_limit",
        "reset_rate_limits",
        "set_symbols",
        "set_mark_price_override",
        "set_clock_offset",
        "stats",
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
        listen_key_ttl_s: float = DEFAULT_LISTEN_KEY_TTL_SECS,
        lose_while_disconnected: bool = True,
        max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS,
        weight_limit_1m: int = DEFAULT_WEIGHT_LIMIT_1M,
        ban_s: float = DEFAULT_BAN_SECS,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"the simulator binds loopback only, not {host!r}")
        self.host = host
        self.port = port
        self.market = Market(symbols, seed)
        self.engine = Engine(accounts, self.market, seed, listen_key_ttl_s, max_open_orders)
        self.hub = StreamHub(
            self.engine, ping_interval_s, pong_timeout_s, max_connection_age_s, mark_price_interval_s
        )
        self.hub.lose_while_disconnected = lose_while_disconnected
        self.limiter = RateLimiter(weight_limit_1m, ban_s)
        self.rest = RestApi(self.engine, self.limiter, self.hub.close_listen_key)
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

    # ------------------------------------------------------------------ lifecycle
    @property
    def rest_url(self) -> str:
        return f"http://{self._url_host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self._url_host}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://{self._url_host}:{self.port}/_sim"

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
        if not self._ready.wait(START_TIMEOUT_SECS):
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
            thread.join(STOP_TIMEOUT_SECS)
            if thread.is_alive():
                log.error("simulator thread did not stop within %.0fs", STOP_TIMEOUT_SECS)
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
        app.router.add_get("/market/ws/{stream}", self.hub.handle_market_ws)
        app.router.add_get("/market/stream", self.hub.handle_market_stream)
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
            site = web.TCPSite(runner, self.host, self.port)
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
                self.hub.publish_market(self.market.tick(self.engine.now_ms()))
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

        return asyncio.run_coroutine_threadsafe(call(), loop).result(STOP_TIMEOUT_SECS)

    # ------------------------------------------------------------------ scenario / state
    def set_rate(self, events_per_s: float) -> None:
        """Scenario steps per second per account (0 = manual only)."""

        def apply() -> None:
            self._rate = float(events_per_s)
            self._rate_since = time.monotonic()
            self._rate_done = 0

        self._on_loop(apply)

    def step(self, api_key: str, n: int = 1) -> None:
        self.engine.step(api_key, n)

    def place_order(
        self,
        api_key: str,
        symbol: str = "BTCUSDT",
        side: str = "BUY",
        type: str = "LIMIT",
        quantity: str = "0.010",
        price: str = "86000.10",
        client_order_id: str | None = None,
        time_in_force: str | None = None,
        reduce_only: bool = False,
    ) -> int:
        return self.engine.place_order(
            api_key, symbol, side, type, quantity, price, client_order_id, time_in_force, reduce_only
        )

    def fill(self, api_key: str, order_id: int, qty: str | None = None, price: str | None = None) -> None:
        self.engine.fill(api_key, order_id, qty, price)

    def cancel(self, api_key: str, order_id: int) -> None:
        self.engine.cancel(api_key, order_id)

    def expire(self, api_key: str, order_id: int) -> None:
        self.engine.expire(api_key, order_id)

    def amend(
        self, api_key: str, order_id: int, price: str | None = None, quantity: str | None = None
    ) -> None:
        self.engine.amend(api_key, order_id, price, quantity)

    def place_algo(
        self,
        api_key: str,
        symbol: str = "BTCUSDT",
        side: str = "SELL",
        type: str = "STOP_MARKET",
        quantity: str = "0.010",
        trigger_price: str = "80000.00",
        price: str = "0",
        client_algo_id: str | None = None,
        reduce_only: bool = False,
    ) -> int:
        return self.engine.place_algo(
            api_key, symbol, side, type, quantity, trigger_price, price, client_algo_id, reduce_only
        )

    def trigger_algo(self, api_key: str, algo_id: int, fill: bool = True) -> int:
        return self.engine.trigger_algo(api_key, algo_id, fill)

    def cancel_algo(self, api_key: str, algo_id: int) -> None:
        self.engine.cancel_algo(api_key, algo_id)

    def reject_algo(self, api_key: str, algo_id: int, reason: str = "Reduce Only reject") -> None:
        self.engine.reject_algo(api_key, algo_id, reason)

    def expire_algo(self, api_key: str, algo_id: int) -> None:
        self.engine.expire_algo(api_key, algo_id)

    def account_config_update(self, api_key: str, symbol: str = "BTCUSDT", leverage: int = 20) -> None:
        self.engine.account_config_update(api_key, symbol, leverage)

    def truth(self, api_key: str) -> dict[str, Any]:
        return self.engine.truth(api_key)

    # ------------------------------------------------------------------ faults
    def drop_connections(self, api_key: str | None = None, abrupt: bool = False) -> int:
        """Close that account's user-data connections (None: every connection, market included;
        "market" / "retired": those). Frames queued before the call are still sent first unless
        ``abrupt`` (TCP dropped without a close frame). Returns how many were closed."""
        return self._on_loop(lambda: self.hub.drop(api_key, abrupt))

    def go_silent(self, target: str, seconds: float) -> int:
        """Make the current connections of an api_key (or "market") half-open for ``seconds``."""
        return self._on_loop(lambda: self.hub.go_silent(target, seconds))

    def send_raw(self, api_key: str, text: str) -> int:
        return self._on_loop(lambda: self.hub.send_raw(api_key, text))

    def send_market_raw(self, text: str) -> int:
        return self._on_loop(lambda: self.hub.send_raw("market", text))

    def expire_listen_key(self, api_key: str) -> str | None:
        """Send listenKeyExpired on the account's stream; the key is unknown from now on."""
        return self.engine.expire_listen_key(api_key)

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
        self._on_loop(self.limiter.reset)

    def set_symbols(self, symbols: Sequence[str]) -> None:
        self.market.set_symbols(symbols)

    @property
    def mark_symbols(self) -> list[tuple[str, int]]:
        return self.market.symbols()

    def set_mark_price_override(self, symbol: str, price: str | None) -> None:
        """Pin ``p`` (and ``ap``) of a symbol to ``price`` verbatim; None releases it."""
        self.market.set_override(symbol, price)

    def set_clock_offset(self, ms: int) -> None:
        """Shift the server clock (serverTime, recvWindow checks, event times) by ``ms``."""
        self.engine.clock_offset_ms = int(ms)

    def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:
            out: dict[str, Any] = {
                "requests": dict(self.rest.requests),
                "control_requests": dict(self.control_requests),
            }
            out.update(self.hub.stats())
            return out

        return self._on_loop(collect)

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
