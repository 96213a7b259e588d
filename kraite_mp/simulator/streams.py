"""WebSocket side of the simulator: user-data, market, public and retired routes, the WebSocket API,
pings, faults.

Every connection has one writer task fed by an outbox queue, so frames, pings, pongs and the
close are written in order by a single task. All methods run on the server's event loop,
except ``sink`` which the engine calls from any thread (it hops onto the loop).

Routes (as production since 2026-04-23), every access style:
- ``/private/ws?listenKey=K&events=A/B``: user data, raw frames. Unknown key -> HTTP 400 before the
  upgrade (body ``{"code":-1125,...}``). ``events`` is an allow-list applied to every event, including
  ``listenKeyExpired``; without ``events`` everything is delivered. Without ``listenKey`` the
  connection starts empty and takes ``SUBSCRIBE ["<listenKey>"]``.
- ``/private/stream?listenKey=A&events=..&listenKey=B&events=..``: several keys on one connection
  (each ``events`` belongs to the key before it), frames wrapped ``{"stream": <listenKey>, "data":
  ...}``; ``SUBSCRIBE`` adds keys (the official SDK's way). The path form ``/private/ws/<key>`` is dead.
- ``/market/ws/<stream>``, ``/market/ws`` + ``SUBSCRIBE``, ``/market/stream?streams=a/b`` (wrapped):
  ``!markPrice@arr@1s`` / ``!markPrice@arr`` (every array of a tick: TradFi symbols come as a
  second one), ``<symbol>@markPrice@1s`` / ``<symbol>@markPrice`` (one object); the forms without
  ``@1s`` send every third tick (3 s at the default ``mark_price_interval_s``).
- ``/public/ws/<stream>``, ``/public/stream?streams=``: ``<symbol>@bookTicker``,
  ``<symbol>@depth<5|10|20>[@100ms|@250ms|@500ms]`` and ``<symbol>@depth[@..ms]``, one frame per
  mark-price tick, built around the mark price.
- ``/ws/<stream>`` and ``/stream?streams=``: the retired unrouted forms, which serve the public
  category only: a listenKey or a market stream there is accepted (even a SUBSCRIBE is acked)
  and never delivers.
- ``/ws-fapi/v1``: the WebSocket API (``userDataStream.start/ping/stop``, ``kraite_mp.simulator.wsapi``).
A SUBSCRIBE of another route's stream, or of one the simulator does not model (aggTrade, kline,
ticker, forceOrder ...), is acked and stays silent; more than ``MAX_STREAMS_PER_CONNECTION``
streams on one connection is refused with an error reply.

Admission, before anything else on every route (so before the listenKey check): each handshake
attempt of a client IP is counted, refused or not; during a maintenance window every attempt is
refused with HTTP 503 (``{"code":-1001,...}``); beyond ``connection_limit`` attempts in the
rolling ``connection_window_s`` it is refused with HTTP 429 (``{"code":-1003,...}``). Both carry
``Retry-After`` (whole seconds). The latest ``ATTEMPT_LOG_SIZE`` attempts are kept in order, with their
time, IP, route and refusal (``handshake_log``), so that a test can count them per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from aiohttp import WSMsgType, web

from kraite_mp.simulator.engine import Engine, EventBatch

log = logging.getLogger(__name__)

#: At most this many incoming frames (data, ping, pong) per second per connection.
MAX_INCOMING_PER_SEC = 10
#: A connection with more than this many bytes waiting to be written is too slow: closed.
MAX_OUTBOX_BYTES = 64 * 1024 * 1024
#: Events buffered per account while nobody listens, when loss is switched off.
MAX_BACKLOG_EVENTS = 100_000
#: How long a close handshake may take before the transport is just dropped.
CLOSE_TIMEOUT_S = 1.0
#: An ordered close (after the queued frames) aborts the transport when a whole period like this
#: passes without one frame written: a client that stopped reading. One that reads slowly (a loaded
#: host) gets every frame queued before the close, as from a real server's TCP close.
ORDERED_CLOSE_DEADLINE_S = 5.0
#: The longest a connection's handler waits for its writer's close (handshake and flush) before cancelling it.
CLOSE_FLUSH_MAX_S = 30.0
#: Stream names of the all-symbols mark-price array (``@1s``, and the 3 s default).
MARK_PRICE_STREAMS = frozenset({"!markPrice@arr@1s", "!markPrice@arr"})
#: One symbol's mark price (``btcusdt@markPrice@1s``): served on /market.
SYMBOL_MARK_PRICE_RE = re.compile(r"^([a-z0-9_]+)@markPrice(@1s)?$")
#: Other market-route streams: accepted, not modelled (silent).
OTHER_MARKET_RE = re.compile(
    r"^(![a-zA-Z]+@arr|[a-z0-9_]+@(aggTrade|kline_\w+|continuousKline_\w+|ticker|miniTicker|forceOrder))$"
)
#: Public-route streams the simulator serves: book ticker, partial and diff depth.
PUBLIC_RE = re.compile(r"^([a-z0-9_]+)@(bookTicker|depth(5|10|20)?(@(100|250|500)ms)?)$")
#: At most this many streams on one connection (USD-M's limit; 1024 is spot's).
MAX_STREAMS_PER_CONNECTION = 200
#: Route category each connection kind delivers (the retired unrouted forms: public only).
SERVES = {"market": "market", "public": "public", "retired": "public"}
#: Half the spread, and the step between depth levels, of the synthetic book (relative to the mark).
BOOK_STEP = Decimal("0.0001")
#: The mark-price streams without ``@1s`` send one tick of this many (3 s at the 1 s default).
SLOW_STREAM_TICKS = 3
#: Depth levels of a diff-depth frame.
DIFF_DEPTH_LEVELS = 10
_EIGHT_DP = Decimal("0.00000001")
#: WebSocket handshake attempts allowed per client IP per window (docs/PROTOCOL.md: 300 / 5 min).
DEFAULT_CONNECTION_LIMIT = 300
#: Length of the rolling window ``DEFAULT_CONNECTION_LIMIT`` applies to.
DEFAULT_CONNECTION_WINDOW_S = 300.0
#: HTTP status of a handshake over the attempt limit, and of one during a maintenance window.
LIMIT_STATUS = 429
MAINTENANCE_STATUS = 503
#: Handshake attempts kept in the attempt log (the oldest are forgotten beyond; the counts stay).
ATTEMPT_LOG_SIZE = 100_000

try:  # orjson is much faster for the 570-element mark-price frames; stdlib json works too
    import orjson

    def dumps(obj: Any) -> str:
        return orjson.dumps(obj).decode()

except ImportError:  # pragma: no cover

    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))


#: Texts remembered per account to count an event written on two overlapping connections once.
RECENT_TEXTS = 4096


def stream_route(name: str) -> str | None:
    """The route category of a stream name ("market", "public"), None for no known stream."""
    if name in MARK_PRICE_STREAMS or SYMBOL_MARK_PRICE_RE.match(name) or OTHER_MARKET_RE.match(name):
        return "market"
    if PUBLIC_RE.match(name) or name == "!bookTicker":
        return "public"
    return None


@dataclass
class Sub:
    """One listenKey on a private connection."""

    api_key: str
    events: frozenset[str] | None = None  #: allow-list; None: every event
    muted: bool = False  #: the key expired: nothing more for it


@dataclass(eq=False)
class Conn:
    """One accepted WebSocket connection."""

    conn_id: int
    kind: str  #: "private", "market", "public", "retired" or "wsapi"
    ws: web.WebSocketResponse
    request: web.Request
    subs: dict[str, Sub] = field(default_factory=dict)  #: private: listenKey -> subscription
    streams: list[str] = field(default_factory=list)  #: market / public / retired, in order
    wrapped: bool = False  #: a /stream route: frames wrapped {"stream","data"}
    opened_at: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    silent_until: float = 0.0
    #: client pings get their pong this much late (data keeps flowing): a server whose pongs queue
    #: behind a burst (``Hub.delay_pongs``)
    pong_delay_s: float = 0.0
    pending_pings: dict[bytes, float] = field(default_factory=dict)
    next_ping_at: float = 0.0
    incoming: deque[float] = field(default_factory=deque)
    closing: bool = False
    close_request: tuple[str, int, str] | None = None
    #: the close frame is written: what is left is the transport's flush (``_flush_and_close``)
    flushing: bool = False
    queued_bytes: int = 0
    written: int = 0  #: frames written (text, ping, pong): the ordered close's sign of progress

    @property
    def targets(self) -> list[str]:
        """What stats and faults name it by: the api_keys of a private connection, else its kind."""
        if self.kind == "private":
            return list(dict.fromkeys(sub.api_key for sub in self.subs.values())) or ["private"]
        return [self.kind]

    @property
    def target(self) -> str:
        return self.targets[0]

    def silent(self, now: float) -> bool:
        return now < self.silent_until


@dataclass
class _Attempts:
    """WebSocket handshake attempts of one client IP."""

    times: deque[float] = field(default_factory=deque)  #: monotonic times inside the window
    attempts: int = 0
    refused_limit: int = 0
    refused_maintenance: int = 0
    peak: int = 0  #: most attempts ever inside one window

    def report(self) -> dict[str, int]:
        return {
            "attempts": self.attempts,
            "refused": self.refused_limit + self.refused_maintenance,
            "refused_limit": self.refused_limit,
            "refused_maintenance": self.refused_maintenance,
            "peak_attempts": self.peak,
        }


class StreamHub:
    """Owns the connections; delivers engine events and mark-price frames; injects faults."""

    def __init__(
        self,
        engine: Engine,
        ping_interval_s: float,
        pong_timeout_s: float,
        max_connection_age_s: float,
        mark_price_interval_s: float,
        connection_limit: int = DEFAULT_CONNECTION_LIMIT,
        connection_window_s: float = DEFAULT_CONNECTION_WINDOW_S,
    ) -> None:
        self.engine = engine
        self.connection_limit = connection_limit  #: handshake attempts per IP per window, refused beyond
        self.connection_window_s = connection_window_s  #: the rolling window of that limit
        #: Every handshake is refused (503) until this monotonic time: a maintenance window.
        self.maintenance_until = 0.0
        self._attempts: dict[str, _Attempts] = {}
        #: Every handshake attempt, oldest first: (monotonic time, IP, route, refusal status or None).
        self._attempt_log: deque[tuple[float, str, str, int | None]] = deque(maxlen=ATTEMPT_LOG_SIZE)
        self.ping_interval_s = ping_interval_s  #: every connection gets a ping frame this often
        self.pong_timeout_s = pong_timeout_s  #: a connection whose ping goes unanswered this long is closed
        self.max_connection_age_s = max_connection_age_s  #: connections are closed at this age
        self.mark_price_interval_s = mark_price_interval_s  #: a mark-price frame this often
        #: Events of an account with no live connection are lost (False: kept in a bounded backlog).
        self.lose_while_disconnected = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conns: set[Conn] = set()
        self._ids = itertools.count(1)
        self._backlog: dict[str, deque[tuple[str, str]]] = {}
        self.opened: dict[str, int] = {}
        self.frames: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        #: Events written to at least one of the account's connections (an event sent on two overlapping
        #: connections counts once here, twice in ``frames``); the recent texts written, per account.
        self.delivered: dict[str, int] = {}
        self._recent: dict[str, tuple[deque[str], set[str]]] = {}
        self.closed_reasons: dict[str, int] = {}
        #: The WebSocket API's request handler (``/ws-fapi/v1``), set by the server.
        self.ws_api: Callable[[Conn, dict[str, Any]], dict[str, Any]] | None = None
        self._book_ids: dict[str, int] = {}
        self._ticks = 0

    # ------------------------------------------------------------------ engine -> connections
    def sink(self, api_key: str, events: EventBatch, expired_key: str | None) -> None:
        """Engine callback (any thread, engine lock held): serialize and hop onto the loop in order."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        items = [(name, dumps(payload)) for name, payload in events]
        with contextlib.suppress(RuntimeError):  # loop closing during shutdown
            loop.call_soon_threadsafe(self._deliver, api_key, items, expired_key)

    def _account_subs(self, api_key: str) -> list[tuple[Conn, str, Sub]]:
        """(connection, listenKey, subscription) of every open private subscription of an account."""
        return [
            (conn, key, sub)
            for conn in self.conns
            if conn.kind == "private" and not conn.closing
            for key, sub in conn.subs.items()
            if sub.api_key == api_key
        ]

    def _deliver(self, api_key: str, items: list[tuple[str, str]], expired_key: str | None) -> None:
        if expired_key is not None:
            for conn, key, sub in self._account_subs(api_key):
                if key == expired_key and not sub.muted:
                    self._send_filtered(conn, key, sub, items)
                    sub.muted = True
            return
        live = [(conn, key, sub) for conn, key, sub in self._account_subs(api_key) if not sub.muted]
        if not live:
            if self.lose_while_disconnected:
                self.lost[api_key] = self.lost.get(api_key, 0) + len(items)
            else:
                backlog = self._backlog.setdefault(api_key, deque(maxlen=MAX_BACKLOG_EVENTS))
                backlog.extend(items)
            return
        for conn, key, sub in live:
            self._send_filtered(conn, key, sub, items)

    def _send_filtered(self, conn: Conn, listen_key: str, sub: Sub, items: Iterable[tuple[str, str]]) -> None:
        for name, text in items:
            if sub.events is None or name in sub.events:
                if conn.wrapped:
                    text = f'{{"stream":{dumps(listen_key)},"data":{text}}}'
                self._enqueue(conn, "text", text)

    def _subscribe_key(self, conn: Conn, listen_key: str, events: frozenset[str] | None) -> bool:
        """Add a listenKey to a private connection (and hand it the account's backlog); False if unknown."""
        api_key = self.engine.account_for_listen_key(listen_key)
        if api_key is None:
            return False
        sub = conn.subs[listen_key] = Sub(api_key, events)
        backlog = self._backlog.pop(api_key, None)
        if backlog:
            self._send_filtered(conn, listen_key, sub, backlog)
        return True

    def _enqueue(self, conn: Conn, kind: str, data: Any) -> None:
        if conn.closing:
            return
        if conn.queued_bytes > MAX_OUTBOX_BYTES:
            log.warning("conn=%d %s: outbox full, closing slow consumer", conn.conn_id, conn.target)
            self.close(conn, 1008, "slow consumer", now=True)
            return
        if kind == "text":
            conn.queued_bytes += len(data)
        conn.outbox.put_nowait((kind, data))

    def publish_market(self, arrays: list[list[dict[str, Any]]]) -> None:
        """One mark-price tick, its arrays (crypto, then TradFi if any), to every subscribed market and
        public stream."""
        self._ticks += 1
        conns = [c for c in self.conns if c.kind in SERVES and not c.closing and c.streams]
        if not conns:
            return
        # the mark-price streams without @1s update every 3 s: every third tick of the 1 s default
        slow_tick = self._ticks % SLOW_STREAM_TICKS == 1
        texts: dict[str, list[str]] = {}
        by_symbol: dict[str, dict[str, Any]] | None = None
        for conn in conns:
            serves = SERVES[conn.kind]
            for name in conn.streams:
                if stream_route(name) != serves:
                    continue  # another route's stream, or none: acked, silent
                if not slow_tick and _is_slow(name):
                    continue
                if name not in texts:
                    if name in MARK_PRICE_STREAMS:
                        texts[name] = [dumps(a) for a in arrays if a]
                    else:
                        if by_symbol is None:
                            by_symbol = {str(item["s"]): item for a in arrays for item in a}
                        texts[name] = self._symbol_stream(name, by_symbol)
                for text in texts[name]:
                    if conn.wrapped:
                        text = f'{{"stream":{dumps(name)},"data":{text}}}'
                    self._enqueue(conn, "text", text)

    def _symbol_stream(self, name: str, by_symbol: dict[str, dict[str, Any]]) -> list[str]:
        """The frames of one symbol stream for this tick (none for a symbol without a mark price)."""
        mark = SYMBOL_MARK_PRICE_RE.match(name)
        if mark:
            item = by_symbol.get(mark.group(1).upper())
            return [dumps(item)] if item is not None else []
        public = PUBLIC_RE.match(name)
        if public is None:
            return []  # modelled nowhere: silent
        symbol = public.group(1).upper()
        item = by_symbol.get(symbol)
        if item is None:
            return []
        price, now_ms = Decimal(str(item["p"])), int(item["E"])
        first = self._book_ids.get(symbol, 0) + 1
        last = self._book_ids[symbol] = first + 2
        if public.group(2) == "bookTicker":
            bid, ask = _book_level(price, -1), _book_level(price, 1)
            body = {"e": "bookTicker", "u": last, "s": symbol, "b": bid, "B": "1.000", "a": ask, "A": "1.000"}
            return [dumps({**body, "T": now_ms, "E": now_ms})]
        levels = int(public.group(3) or DIFF_DEPTH_LEVELS)
        return [
            dumps(
                {
                    "e": "depthUpdate",
                    "E": now_ms,
                    "T": now_ms,
                    "s": symbol,
                    "U": first,
                    "u": last,
                    "pu": first - 1,
                    "b": [[_book_level(price, -i), f"{i}.000"] for i in range(1, levels + 1)],
                    "a": [[_book_level(price, i), f"{i}.000"] for i in range(1, levels + 1)],
                }
            )
        ]

    # ------------------------------------------------------------------ faults
    def close(
        self, conn: Conn, code: int = 1000, reason: str = "", abrupt: bool = False, now: bool = False
    ) -> None:
        """Close after the frames already queued, or ``now`` (dropping them); ``abrupt`` skips
        the close handshake and just drops the TCP connection."""
        if conn.closing:
            return
        conn.closing = True
        self.closed_reasons[reason or str(code)] = self.closed_reasons.get(reason or str(code), 0) + 1
        request = ("abort" if abrupt else "close", code, reason)
        if now or abrupt:
            # jump the queue: the writer checks close_request before every frame it takes
            conn.close_request = request
            conn.outbox.put_nowait(("wake", None))
        else:
            conn.outbox.put_nowait(("close", request))
        if abrupt:
            _abort(conn)
        elif now:
            if self.loop is not None:
                self.loop.call_later(CLOSE_TIMEOUT_S + 0.5, _abort, conn)
        else:
            # a writer stuck on a client that stopped reading would never get to the close
            self._abort_unless_progress(conn, conn.written)

    def _abort_unless_progress(self, conn: Conn, written: int) -> None:
        """In ``ORDERED_CLOSE_DEADLINE_S``: abort ``conn`` if no frame was written since (``written``
        then), else look again, until the transport is closed."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        def look(seen: int) -> None:
            transport = conn.request.transport
            if transport is None or transport.is_closing() or conn.flushing:
                return  # closed, or flushing with a deadline of its own
            if conn.written == seen:
                log.info(
                    "conn=%d %s: nothing written for %.0fs while closing",
                    conn.conn_id,
                    conn.target,
                    ORDERED_CLOSE_DEADLINE_S,
                )
                _abort(conn)
            else:
                loop.call_later(ORDERED_CLOSE_DEADLINE_S, look, conn.written)

        loop.call_later(ORDERED_CLOSE_DEADLINE_S, look, written)

    def select(self, target: str | None) -> list[Conn]:
        """Connections of an api_key, "market", "public", "retired", "wsapi", or all (None)."""
        if target is None:
            return [c for c in self.conns if not c.closing]
        return [c for c in self.conns if target in c.targets and not c.closing]

    def drop(self, target: str | None, abrupt: bool = False) -> int:
        conns = self.select(target)
        for conn in conns:
            self.close(conn, 1001, "dropped by simulator", abrupt)
        return len(conns)

    def go_silent(self, target: str, seconds: float) -> int:
        """Half-open for ``seconds``: send nothing (frames queued after this call are lost), read
        and ignore everything, answer no ping, send no ping, time out nobody."""
        until = time.monotonic() + seconds
        conns = self.select(target)
        for conn in conns:
            conn.silent_until = until
            conn.pending_pings.clear()
            conn.outbox.put_nowait(("silence", until))
        return len(conns)

    def delay_pongs(self, target: str, seconds: float) -> int:
        """Answer the client pings of ``target``'s current connections ``seconds`` late (0: at once again),
        while everything else flows as before; the number of connections."""
        conns = self.select(target)
        for conn in conns:
            conn.pong_delay_s = max(float(seconds), 0.0)
        return len(conns)

    def send_raw(self, target: str, text: str) -> int:
        conns = self.select(target)
        for conn in conns:
            self._enqueue(conn, "text", text)
        return len(conns)

    def close_listen_key(self, listen_key: str) -> None:
        """Close the connections of a deleted key, after its listenKeyExpired (which the engine handed to
        ``sink`` just before: queued on the loop ahead of this). A connection that holds other keys too
        only drops this one."""
        loop = self.loop
        if loop is None or loop.is_closed():
            self._close_listen_key_now(listen_key)
        else:
            loop.call_soon_threadsafe(self._close_listen_key_now, listen_key)

    def _close_listen_key_now(self, listen_key: str) -> None:
        for conn in list(self.conns):
            if conn.kind == "private" and listen_key in conn.subs:
                if set(conn.subs) == {listen_key}:
                    self.close(conn, 1000, "listenKey deleted")
                else:
                    del conn.subs[listen_key]

    # ------------------------------------------------------------------ housekeeping
    def housekeep(self) -> None:
        """Pings, pong timeouts, connection age; called every few tens of ms by the server."""
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.closing:
                continue
            if now - conn.opened_at >= self.max_connection_age_s:
                self.close(conn, 1000, "max connection age")
                continue
            if conn.silent(now):
                continue
            if conn.pending_pings and now - min(conn.pending_pings.values()) > self.pong_timeout_s:
                log.info(
                    "conn=%d %s: no pong within %.1fs, closing",
                    conn.conn_id,
                    conn.target,
                    self.pong_timeout_s,
                )
                self.close(conn, 1008, "pong timeout", now=True)
                continue
            if now >= conn.next_ping_at:
                payload = str(int(time.time() * 1000)).encode()
                conn.pending_pings[payload] = now
                conn.next_ping_at = now + self.ping_interval_s
                self._enqueue(conn, "ping", payload)

    def stats(self) -> dict[str, Any]:
        current: dict[str, int] = {}
        for conn in self.conns:
            if not conn.closing:
                for target in conn.targets:
                    current[target] = current.get(target, 0) + 1
        return {
            "ws_opened": dict(self.opened),
            "frames_sent": dict(self.frames),
            "events_lost": dict(self.lost),
            "events_delivered": dict(self.delivered),
            "current_connections": current,
            "closed": dict(self.closed_reasons),
            "ws_handshakes": self.handshake_report(),
        }

    # ------------------------------------------------------------------ admission
    def admit(self, request: web.Request, route: str) -> web.Response | None:
        """Count this handshake attempt on ``route`` (a ``Conn.kind``); return the refusal (503
        maintenance, 429 over the attempt limit) that replaces the upgrade, or None to go on."""
        now = time.monotonic()
        ip = request.remote or "127.0.0.1"
        state = self._attempts.setdefault(ip, _Attempts())
        window = self.connection_window_s
        while state.times and now - state.times[0] >= window:
            state.times.popleft()
        state.times.append(now)
        state.attempts += 1
        state.peak = max(state.peak, len(state.times))
        if now < self.maintenance_until:
            state.refused_maintenance += 1
            self._attempt_log.append((now, ip, route, MAINTENANCE_STATUS))
            return _refusal(
                MAINTENANCE_STATUS,
                -1001,
                "Internal error; unable to process your request. Please try again.",
                self.maintenance_until - now,
            )
        over = len(state.times) - self.connection_limit
        if over > 0:
            state.refused_limit += 1
            self._attempt_log.append((now, ip, route, LIMIT_STATUS))
            # the attempt after waiting this long is the limit-th in its window
            retry = state.times[over] + window - now if over < len(state.times) else window
            log.debug("ip=%s: %d handshake attempts in %.0fs, refused", ip, len(state.times), window)
            return _refusal(
                LIMIT_STATUS,
                -1003,
                f"Too many connection attempts; current limit of IP({ip}) is "
                f"{self.connection_limit} per {window:g}s.",
                retry,
            )
        self._attempt_log.append((now, ip, route, None))
        return None

    def refuse_connections(self, seconds: float) -> None:
        """Refuse every handshake for ``seconds`` from now (0 or less ends a window early)."""
        self.maintenance_until = time.monotonic() + seconds if seconds > 0 else 0.0

    def reset_connection_windows(self) -> None:
        """Forget the attempts inside the current windows (the counts in the report stay)."""
        for state in self._attempts.values():
            state.times.clear()

    def handshake_log(self, since: float | None = None) -> list[dict[str, Any]]:
        """The logged handshake attempts at or after ``since`` (a ``time.monotonic()`` value of this
        host; None: every one kept), oldest first: ``{"t": monotonic time, "ip", "route", "refused":
        429 / 503 / None}`` (None: admitted; an unknown listenKey's 400 comes after admission)."""
        return [
            {"t": t, "ip": ip, "route": route, "refused": refused}
            for t, ip, route, refused in self._attempt_log
            if since is None or t >= since
        ]

    def handshake_report(self) -> dict[str, Any]:
        per_ip = {ip: state.report() for ip, state in sorted(self._attempts.items())}
        totals = {
            key: sum(c[key] for c in per_ip.values())
            for key in ("attempts", "refused", "refused_limit", "refused_maintenance")
        }
        return {
            **totals,
            "peak_attempts": max((c["peak_attempts"] for c in per_ip.values()), default=0),
            "limit": self.connection_limit,
            "window_s": self.connection_window_s,
            "per_ip": per_ip,
        }

    async def close_all(self) -> None:
        for conn in list(self.conns):
            self.close(conn, 1001, "simulator stopping", now=True)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S + 1.0
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ handlers
    async def handle_private(self, request: web.Request) -> web.StreamResponse:
        """``/private/ws?listenKey=K&events=..``: raw frames; no listenKey: SUBSCRIBE later."""
        refused = self.admit(request, "private")
        if refused is not None:
            return refused
        listen_key = request.query.get("listenKey", "")
        if listen_key and self.engine.account_for_listen_key(listen_key) is None:
            return _unknown_listen_key()
        events = _events(request.query.get("events"))
        return await self._serve(request, "private", keys=[(listen_key, events)] if listen_key else [])

    async def handle_private_stream(self, request: web.Request) -> web.StreamResponse:
        """``/private/stream?listenKey=A&events=..&listenKey=B&events=..``: wrapped frames, several keys."""
        refused = self.admit(request, "private")
        if refused is not None:
            return refused
        keys: list[tuple[str, frozenset[str] | None]] = []
        for name, value in request.query.items():
            if name == "listenKey":
                if self.engine.account_for_listen_key(value) is None:
                    return _unknown_listen_key()
                keys.append((value, None))
            elif name == "events" and keys:
                keys[-1] = (keys[-1][0], _events(value))
        return await self._serve(request, "private", keys=keys, wrapped=True)

    async def handle_dead(self, request: web.Request) -> web.StreamResponse:
        """``/private/ws/<key>``: dead on mainnet: the handshake works, nothing ever arrives."""
        refused = self.admit(request, "retired")
        if refused is not None:
            return refused
        return await self._serve(request, "retired")

    async def handle_market_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._routed(request, "market", wrapped=False)

    async def handle_market_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._routed(request, "market", wrapped=True)

    async def handle_public_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._routed(request, "public", wrapped=False)

    async def handle_public_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._routed(request, "public", wrapped=True)

    async def handle_retired(self, request: web.Request) -> web.StreamResponse:
        """``/ws/<stream>`` and ``/stream?streams=``: the unrouted forms, public streams only."""
        return await self._routed(request, "retired", wrapped=request.path == "/stream")

    async def handle_ws_api(self, request: web.Request) -> web.StreamResponse:
        refused = self.admit(request, "wsapi")
        if refused is not None:
            return refused
        return await self._serve(request, "wsapi")

    async def _routed(self, request: web.Request, kind: str, *, wrapped: bool) -> web.StreamResponse:
        refused = self.admit(request, kind)
        if refused is not None:
            return refused
        if wrapped:
            streams = [s for s in request.query.get("streams", "").split("/") if s]
        else:
            tail = request.match_info.get("stream") or request.match_info.get("tail") or ""
            streams = [tail] if tail else []
        return await self._serve(request, kind, streams=streams[:MAX_STREAMS_PER_CONNECTION], wrapped=wrapped)

    async def _serve(
        self,
        request: web.Request,
        kind: str,
        keys: Iterable[tuple[str, frozenset[str] | None]] = (),
        streams: Iterable[str] = (),
        wrapped: bool = False,
    ) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            autoping=False, compress=False, timeout=CLOSE_TIMEOUT_S, max_msg_size=1 << 20
        )
        await ws.prepare(request)
        now = time.monotonic()
        conn = Conn(
            next(self._ids),
            kind,
            ws,
            request,
            streams=list(dict.fromkeys(streams)),
            wrapped=wrapped,
            next_ping_at=now + self.ping_interval_s,
        )
        self.conns.add(conn)
        for listen_key, events in keys:
            self._subscribe_key(conn, listen_key, events)
        for target in conn.targets:
            self.opened[target] = self.opened.get(target, 0) + 1
        log.info("conn=%d %s opened (%s)", conn.conn_id, conn.target, request.path)
        writer = asyncio.create_task(self._writer(conn), name=f"sim-ws-writer-{conn.conn_id}")
        try:
            await self._reader(conn)
        finally:
            if not conn.closing:
                conn.closing = True
                conn.close_request = ("close", 1000, "")
                conn.outbox.put_nowait(("wake", None))
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                # the close handshake, then the flush of what was written (``_flush_and_close``)
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_FLUSH_MAX_S)
            if not writer.done():
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            self.conns.discard(conn)
            log.info("conn=%d %s closed", conn.conn_id, conn.target)
        return ws

    async def _reader(self, conn: Conn) -> None:
        ws = conn.ws
        async for msg in ws:
            now = time.monotonic()
            if conn.closing:
                continue
            if conn.silent(now):
                continue  # half-open: nothing read gets an answer
            conn.incoming.append(now)
            while conn.incoming and now - conn.incoming[0] > 1.0:
                conn.incoming.popleft()
            if len(conn.incoming) > MAX_INCOMING_PER_SEC:
                log.info(
                    "conn=%d %s: over %d messages/s, closing", conn.conn_id, conn.target, MAX_INCOMING_PER_SEC
                )
                self.close(conn, 1008, "too many messages", now=True)
                continue
            if msg.type == WSMsgType.PING:
                if conn.pong_delay_s > 0:
                    asyncio.get_running_loop().call_later(
                        conn.pong_delay_s, self._late_pong, conn, bytes(msg.data)
                    )
                else:
                    self._enqueue(conn, "pong", msg.data)
            elif msg.type == WSMsgType.PONG:
                sent = conn.pending_pings.pop(bytes(msg.data), None)
                if sent is not None:  # an answer also settles every older ping
                    for payload, at in list(conn.pending_pings.items()):
                        if at <= sent:
                            del conn.pending_pings[payload]
            elif msg.type == WSMsgType.TEXT:
                self._on_text(conn, msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break

    def _late_pong(self, conn: Conn, payload: bytes) -> None:
        if not conn.closing and conn in self.conns:
            self._enqueue(conn, "pong", payload)

    def _on_text(self, conn: Conn, text: str) -> None:
        try:
            request = json.loads(text)
        except ValueError:
            self._enqueue(
                conn, "text", dumps({"error": {"code": 3, "msg": "Invalid JSON: malformed request"}})
            )
            return
        if not isinstance(request, dict) or "method" not in request:
            self._enqueue(conn, "text", dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": None}))
            return
        if conn.kind == "wsapi":
            if self.ws_api is not None:
                self._enqueue(conn, "text", dumps(self.ws_api(conn, request)))
            return
        method, params, rid = request.get("method"), request.get("params"), request.get("id")
        result: Any = None
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self._enqueue(
                    conn, "text", dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": rid})
                )
                return
            if method == "SUBSCRIBE":
                if len(set(conn.subs) | set(conn.streams) | set(params)) > MAX_STREAMS_PER_CONNECTION:
                    msg = f"Invalid request: at most {MAX_STREAMS_PER_CONNECTION} streams per connection"
                    self._enqueue(conn, "text", dumps({"error": {"code": 2, "msg": msg}, "id": rid}))
                    return
                for name in params:
                    # a private connection takes listenKeys (an unknown one is acked, silent)
                    if conn.kind != "private" or not self._subscribe_key(conn, name, None):
                        if name not in conn.streams:
                            conn.streams.append(name)
            else:
                for name in params:
                    conn.subs.pop(name, None)
                    if name in conn.streams:
                        conn.streams.remove(name)
        elif method == "LIST_SUBSCRIPTIONS":
            result = list(conn.subs) + conn.streams
        self._enqueue(conn, "text", dumps({"result": result, "id": rid}))

    def _count_delivered(self, api_key: str, text: str) -> None:
        """One more event written, unless the same text went out on another connection just before."""
        recent, seen = self._recent.setdefault(api_key, (deque(), set()))
        if text in seen:
            return
        self.delivered[api_key] = self.delivered.get(api_key, 0) + 1
        recent.append(text)
        seen.add(text)
        if len(recent) > RECENT_TEXTS:
            seen.discard(recent.popleft())

    async def _writer(self, conn: Conn) -> None:
        ws = conn.ws
        write_silent_until = 0.0
        try:
            while True:
                kind, data = await conn.outbox.get()
                if kind == "close":
                    conn.close_request = data
                if conn.close_request is not None:
                    how, code, reason = conn.close_request
                    if how == "close":
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(
                                ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S
                            )
                        await _flush_and_close(conn)
                    _abort(conn)
                    return
                if kind == "silence":
                    write_silent_until = data
                    continue
                if kind == "text":
                    conn.queued_bytes -= len(data)
                if time.monotonic() < write_silent_until:
                    if kind == "text" and conn.kind == "private" and conn.subs:
                        self.lost[conn.target] = self.lost.get(conn.target, 0) + 1
                    continue
                conn.written += 1
                if kind == "text":
                    await ws.send_str(data)
                    self.frames[conn.target] = self.frames.get(conn.target, 0) + 1
                    if conn.kind == "private" and conn.subs:
                        self._count_delivered(conn.target, data)
                elif kind == "ping":
                    await ws.ping(data)
                elif kind == "pong":
                    await ws.pong(data)
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.info("conn=%d %s: write failed: %s", conn.conn_id, conn.target, exc)
            conn.closing = True
            _abort(conn)


def _is_slow(name: str) -> bool:
    """``!markPrice@arr`` and ``<symbol>@markPrice``: the 3 s variants."""
    return name == "!markPrice@arr" or (
        name.endswith("@markPrice") and SYMBOL_MARK_PRICE_RE.match(name) is not None
    )


def _events(param: str | None) -> frozenset[str] | None:
    return frozenset(e for e in param.split("/") if e) if param is not None else None


def _unknown_listen_key() -> web.Response:
    return web.json_response({"code": -1125, "msg": "This listenKey does not exist."}, status=400)


def _book_level(mark: Decimal, level: int) -> str:
    """The price ``level`` steps from the mark (negative: bids), 8 decimals."""
    price = mark * (1 + BOOK_STEP * level)
    return f"{price.quantize(_EIGHT_DP, rounding=ROUND_HALF_EVEN):.8f}"


def _refusal(status: int, code: int, msg: str, retry_after_s: float) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)


async def _flush_and_close(conn: Conn) -> None:
    """A real server's TCP close after its close frame: every byte written so far reaches the client (a slow
    one included: only ``ORDERED_CLOSE_DEADLINE_S`` without progress gives up), then FIN, not RST. An abort
    with bytes unsent would drop frames already counted as sent (and a reset after a client's close frame
    could make it lose what it has not read yet)."""
    transport = conn.request.transport
    if transport is None or transport.is_closing():
        return
    conn.flushing = True
    left, since = transport.get_write_buffer_size(), time.monotonic()
    while left and time.monotonic() - since < ORDERED_CLOSE_DEADLINE_S:
        await asyncio.sleep(0.02)
        now_left = transport.get_write_buffer_size()
        if now_left < left:
            left, since = now_left, time.monotonic()
    if not left:
        transport.close()  # nothing buffered: FIN at once


def _abort(conn: Conn) -> None:
    transport = conn.request.transport
    if transport is not None and not transport.is_closing():
        unsent = transport.get_write_buffer_size()
        if unsent:  # frames counted as sent that the client will never get
            log.warning("conn=%d %s: aborted with %d byte(s) unsent", conn.conn_id, conn.target, unsent)
        transport.abort()
