"""A local Binance USD-M Futures compatible exchange, for tests, the demo and benchmarks.

It speaks the protocol described in ``docs/PROTOCOL.md`` over real sockets on 127.0.0.1: REST
(``/fapi/v1/...``, ``/fapi/v3/positionRisk``, ``/fapi/v3/balance``, ``/fapi/v3/account``), user-data streams (``/private/ws``,
``/private/stream`` with several listenKeys, JSON SUBSCRIBE), market streams (``/market/...``: the
mark-price array, one symbol's mark price), public streams (``/public/...``: book ticker, depth), the
retired unrouted forms (``/ws/...``, ``/stream``: public streams only), the WebSocket API
(``/ws-fapi/v1``: ``userDataStream.start/ping/stop``), plus a control API under ``/_sim``. The route
by route details are in ``kraite_mp.simulator.streams`` and ``kraite_mp.simulator.wsapi``.

In-process use::

    from kraite_mp.simulator import Simulator, SimAccount

    with Simulator(accounts=3, symbols=570, rate=0.0, ping_interval_s=180.0, pong_timeout_s=600.0,
                   max_connection_age_s=86400.0, mark_price_interval_s=1.0, seed=1) as sim:
        sim.rest_url      # "http://127.0.0.1:PORT"  (like https://fapi.binance.com)
        sim.ws_url        # "ws://127.0.0.1:PORT"    (like wss://fstream.binance.com)
        sim.control_url   # "http://127.0.0.1:PORT/_sim"
        sim.ws_api_url    # "ws://127.0.0.1:PORT/ws-fapi/v1" (like wss://ws-fapi.binance.com/ws-fapi/v1)
        sim.accounts      # list[SimAccount(api_key, api_secret)], deterministic for a seed

``start()`` binds 127.0.0.1:0 in a background thread and returns once listening; ``stop()`` is
idempotent. More constructor keywords: ``listen_key_ttl_s=3600``, ``lose_while_disconnected=True``,
``max_open_orders=20``, ``weight_limit_1m=2400``, ``ban_s=120``, ``connection_limit=300``,
``connection_window_s=300.0``, ``host``, ``port``, ``tradfi_symbols=()`` (TradFi perpetuals such as
``XAUUSDT``: each tick sends them as a second array, as Binance does; ``sim.set_tradfi_symbols([...])``
changes them). ``symbols`` may also be a list of names.

Limits per client IP, as Binance: REST weight over ``weight_limit_1m`` in a rolling minute -> 429
-1003 with ``Retry-After``; requests sent while told to wait get 429 again, the third of them a
418 and a ban of ``ban_s`` (every request answers 418 until it ends). WebSocket
handshake attempts on every route (``/private``, ``/market``, retired), counted before anything
else (refused ones and those with an unknown listenKey too): beyond ``connection_limit`` in the
rolling ``connection_window_s`` the handshake is refused with HTTP 429 ``{"code":-1003,...}`` and
``Retry-After`` before the upgrade (PROTOCOL.md gives no status; 429 is this simulator's choice).

Scenario and state (all thread-safe; every change emits the user-data events at once, whether or
not a client is connected; E and T strictly increase per account)::

    sim.set_rate(events_per_s)            # scenario steps per second per account (0 = manual)
    sim.step(api_key, n=1)                # n scenario steps now (deterministic for the seed)
    sim.place_order(api_key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010",
                    price="86000.10", client_order_id=None) -> order id   # MARKET fills at once
    sim.fill(api_key, order_id, qty=None, price=None)   # TRADE_LITE, ORDER_TRADE_UPDATE x=TRADE,
                                                        # ACCOUNT_UPDATE (qty None = the rest)
    sim.cancel / sim.expire (api_key, order_id); sim.amend(api_key, order_id, price=, quantity=)
    sim.place_algo(api_key, symbol=, side=, type="STOP_MARKET", quantity=, trigger_price=,
                   price="0", client_algo_id=None) -> algo id
    sim.trigger_algo(api_key, algo_id, fill=True) -> regular order id
        # ALGO_UPDATE TRIGGERING, ORDER_TRADE_UPDATE NEW (ot=<algo type>, c=clientAlgoId),
        # ALGO_UPDATE TRIGGERED (ai=order id), the fill, ALGO_UPDATE FINISHED (aq, ap).
        # fill=False leaves the order open; FINISHED follows when it fills/cancels/expires.
    sim.cancel_algo / sim.expire_algo (api_key, algo_id)
    sim.reject_algo(api_key, algo_id, reason="Reduce Only reject")   # TRIGGERING, REJECTED
    sim.account_config_update(api_key, symbol="BTCUSDT", leverage=20)   # ac (leverage)
    sim.multi_assets_mode(api_key, enabled=True)   # ACCOUNT_CONFIG_UPDATE with ai
    sim.amend(api_key, order_id, price=, quantity=, modify_id="m-1")   # o.M on the AMENDMENT
    sim.expire_in_match(api_key, order_id)   # x=EXPIRED, X=EXPIRED_IN_MATCH (self-trade prevention)
    sim.place_algo(..., type="TRAILING_STOP_MARKET", activation_price=, callback_rate=)
        # the regular order it triggers carries AP/cr (REST activatePrice/priceRate); ALGO_UPDATE has ia
    sim.start_triggering(api_key, algo_id)   # NEW -> TRIGGERING, stuck there: still open, a cancel
        # is refused (-2011); trigger_algo or reject_algo ends it
    sim.set_position_mode(api_key, dual_side=True)   # hedge mode: place_order(position_side=LONG|SHORT)
    sim.set_margin_type(api_key, symbol, "ISOLATED")  # mt=isolated, iw = entry notional / leverage
    sim.liquidate(api_key, symbol, position_side="BOTH") -> order id   # x=CALCULATED, type
        # LIQUIDATION, c=autoclose-..., FILLED; no TRADE_LITE
    sim.deposit(api_key, amount="100")        # ACCOUNT_UPDATE m=DEPOSIT (negative: WITHDRAW), bc
    sim.funding_fee(api_key, symbol, amount="-0.12345678")   # ACCOUNT_UPDATE m=FUNDING_FEE with a.S
    sim.margin_call(api_key); sim.strategy_update(api_key, strategy_id=, status=, symbol=)
    sim.grid_update(api_key, strategy_id=, symbol=)
    sim.conditional_order_trigger_reject(api_key, symbol=, order_id=, reason=)
    sim.truth(api_key) -> {"orders": [GET /fapi/v1/order dicts, every order ever, by id],
                           "algo_orders": [GET /fapi/v1/algoOrder dicts],
                           "positions": [ACCOUNT_UPDATE "P" dicts, non-zero only],
                           "wallet_balance": str, "listen_key": str | None, "steps": int}

Faults (thread-safe)::

    sim.drop_connections(api_key=None, abrupt=False)  # that account's user-data connections;
                                   # None = every connection now (user data, market, retired):
                                   # the "mass disconnect"; "market"/"retired" = those
    sim.refuse_connections(seconds, drop=False)  # maintenance window: every handshake on every
                                   # route answers HTTP 503 {"code":-1001,..} with Retry-After
                                   # until it ends (0 ends it early); drop=True also drops every
                                   # connection in the same step. Returns the number dropped
    sim.set_connection_limit(limit=None, window_s=None)   # change the handshake-attempt limit
    sim.go_silent(target, seconds) # api_key or "market": TCP stays open, nothing is sent, pings
                                   # are not answered; user-data events of that time are lost
    sim.delay_pongs(target, seconds)   # api_key or "market": client pings are answered that
                                   # late while frames flow on (pongs queued behind a burst)
    sim.send_raw(api_key, text); sim.send_market_raw(text)    # arbitrary text frames
    sim.expire_listen_key(api_key) # listenKeyExpired (E as a string, like Binance), then the
                                   # key is unknown (-1125) and that connection gets nothing more;
                                   # DELETE /fapi/v1/listenKey does the same, then closes (1000)
    sim.set_listen_key_expired_e(as_string=True)  # False: E as an int (the SDK's schema)
    sim.set_max_connection_age(seconds); sim.set_ping(interval_s=, pong_timeout_s=)
    sim.set_lose_while_disconnected(True)   # default, as production: events generated while the
                                   # account has no live connection are never delivered;
                                   # False buffers them for the next connection
    sim.invalidate_api_key(api_key) / sim.restore_api_key(api_key)   # REST -> 401 -2015
    sim.rate_limit(status=429, count=N, retry_after_s=1.0)           # next N /fapi requests
    sim.reset_rate_limits()        # forgets REST weight, waits, bans and the handshake attempts
                                   # in the current windows; the counts in stats() stay
    sim.set_symbols([...]); sim.mark_symbols -> [(symbol, st)]
    sim.set_mark_price_override(symbol, "86000.12")  # p/ap verbatim; None releases
    sim.set_clock_offset(ms)
    sim.stats() -> {"requests": {path: n}, "control_requests": {method: n},
                    "ws_opened": {api_key | "private" | "market" | "public" | "retired" | "wsapi": n},
                    "frames_sent": {same keys: n}, "events_lost": {api_key: n},
                    "current_connections": {same keys: n}, "closed": {reason: n},
                    "rest_limits": {"sent_429": n, "sent_418": n, "peak_weight_1m": n,
                                    "per_ip": {ip: {the same three}}},
                    "ws_handshakes": {"attempts": n, "refused": n, "refused_limit": n,
                                      "refused_maintenance": n, "peak_attempts": n,
                                      "limit": n, "window_s": s, "per_ip": {ip: {the first five}}}}
        # peak_weight_1m: the most weight accepted in any rolling 60 s; peak_attempts: the most
        # handshake attempts in any rolling connection_window_s (totals: the highest of any IP,
        # as the limits are per IP). 429s/418s count every one sent, injected ones included.
        # A private connection counts under each api_key it carries ("private" while it has none).
    sim.handshake_log(since=None) -> [{"t": time.monotonic() of the attempt, "ip": str,
                                       "route": "private" | "market" | "public" | "retired" | "wsapi",
                                       "refused": 429 | 503 | None}]
        # every WebSocket handshake attempt at or after ``since`` (the latest 100,000), oldest first,
        # as admission counted it: to count attempts per window (CLOCK_MONOTONIC is host-wide)
    sim.wait_for_connections(target, count=1, timeout=5.0) -> bool

Control API for other processes (loopback only): ``POST {control_url}/<method>`` with a JSON
object of keyword arguments (api_key first where the method takes one) answers
``{"result": ...}`` or 400 ``{"error": ...}``; ``GET {control_url}/truth?api_key=..``,
``GET {control_url}/stats`` and ``GET {control_url}/accounts``.

Command line: ``kraite-mp simulate`` or ``python -m kraite_mp.simulator`` prints one JSON line
``{"rest_url", "ws_url", "control_url", "ws_api_url", "accounts": [{"api_key", "api_secret"}]}`` once
listening and serves until SIGTERM/SIGINT.

Notes on protocol choices where sources disagree: ``events`` on ``/private/ws`` is an
allow-list applied to every event including ``listenKeyExpired``; without it all events are
delivered. An unknown listenKey is refused with HTTP 400 before the upgrade. Average prices
(``ap``, ``avgPrice``, ``actualPrice``) are cumQuote / executedQty rounded half-even to 8
decimals; ``cumQuote`` and ``z`` are exact sums. Algo orders over REST (``algoOrder``,
``openAlgoOrders``, ``allAlgoOrders``) have the schema of 2026-06-09: ``actualType`` and
``actualQty`` (the filled quantity of the regular order it created, kept current as it fills) only
once triggered, no ``tp*``/``sl*`` fields. ``allAlgoOrders`` (weight 5) selects by ``createTime``
in a window of at most 7 days: the last 7 without ``startTime``/``endTime``, 7 from the one given.
``GET /fapi/v3/positionRisk`` (weight 5) lists, without ``symbol``, only the symbols holding a position
or an open order (a closed position is absent), with ``symbol`` that symbol even when flat;
``GET /fapi/v3/balance`` (weight 5) lists USDT (the wallet every fill moves) and USDC/BNB at zero. Both
carry ``updateTime`` (the last fill that changed the item) and agree with ``truth()``;
``GET /fapi/v3/account`` (weight 5) holds the same assets and positions with the account's totals.
"""

from __future__ import annotations

import click

#: Why ``import kraite_mp.simulator`` (and so ``kraite-mp simulate``) fails without aiohttp, in one line.
MISSING_AIOHTTP = (
    "the simulator needs aiohttp, which the 'simulator' extra installs: pip install 'kraite-mp[simulator]'"
)


class SimulatorUnavailable(ImportError, click.ClickException):
    """aiohttp is not installed. An ImportError to code that imports the simulator, and a
    ClickException so that ``kraite-mp simulate`` prints the one line, not a traceback."""

    def __init__(self) -> None:
        ImportError.__init__(self, MISSING_AIOHTTP, name="aiohttp")
        click.ClickException.__init__(self, MISSING_AIOHTTP)


try:
    import aiohttp  # noqa: F401 - aiohttp is the simulator's only dependency the product does not have
except ModuleNotFoundError as exc:
    if exc.name != "aiohttp":
        raise
    raise SimulatorUnavailable() from None

from kraite_mp.simulator.engine import SimAccount, SimulatorError  # noqa: E402
from kraite_mp.simulator.server import Simulator  # noqa: E402

__all__ = ["MISSING_AIOHTTP", "SimAccount", "Simulator", "SimulatorError", "SimulatorUnavailable"]
