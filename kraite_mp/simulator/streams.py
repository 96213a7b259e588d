"""WebSocket side of the simulator: user-data, mark-price and retired routes, pings, faults.

Every connection has one writer task fed by an outbox queue, so frames, pings, pongs and the
close are written in order by a single task. All methods run on the server's event loop,
except ``sink`` which the engine calls from any thread (it hops onto the loop).

Routes (as production since 2026-04-23):
- ``/private/ws?listenKey=K&events=A/B``: user data. Unknown key -> HTTP 400 before the upgrade
  (body ``{"code":-1125,...}``). ``events`` is an allow-list applied to every event, including
  ``listenKeyExpired``; without ``events`` everything is delivered (sources disagree).
- ``/market/ws/!markPrice@arr@1s`` and ``/market/stream?streams=...``: mark-price arrays.
- ``/ws/<anything>`` and ``/stream?streams=``: retired; the handshake works and SUBSCRIBE is
  acknowledged, but nothing is ever delivered.

Admission, before anything else on every route (so before the listenKey check): each handshake
attempt of a client IP is counted, refused or not; during a maintenance window every attempt is
refused with HTTP 503 (``{"code":-1001,...}``); beyond ``connection_limit`` attempts in the
rolling ``connection_window_s`` it is refused with HTTP 429 (``{"code":-1003,...}``). Both carry
``Retry-After`` (whole seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
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
#: An ordered close (after the queued frames) aborts the transport if not done by then.
ORDERED_CLOSE_DEADLINE_S = 5.0
#: Stream names of the all-symbols mark-price array (``@1s``, and the 3 s default).
MARK_PRICE_STREAMS = frozenset({"!markPrice@arr@1s", "!markPrice@arr"})
#: WebSocket handshake attempts allowed per client IP per window (docs/PROTOCOL.md: 300 / 5 min).
DEFAULT_CONNECTION_LIMIT = 300
#: Length of the rolling window ``DEFAULT_CONNECTION_LIMIT`` applies to.
DEFAULT_CONNECTION_WINDOW_S = 300.0
#: HTTP status of a handshake over the attempt limit, and of one during a maintenance window.
LIMIT_STATUS = 429
MAINTENANCE_STATUS = 503

try:  # orjson is much faster for the 570-element mark-price frames; stdlib json works too
    import orjson

    def dumps(obj: Any) -> str:
        return orjson.dumps(obj).decode()

except ImportError:  # pragma: no cover

    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))


@dataclass(eq=False)
class Conn:
    """One accepted WebSocket connection."""

    conn_id: int
    kind: str  #: "private", "market" or "retired"
    ws: web.WebSocketResponse
    request: web.Request
    api_key: str | None = None
    listen_key: str | None = None
    events: frozenset[str] | None = None
    stream_name: str | None = None  #: set for /market/stream: frames wrapped {"stream","data"}
    opened_at: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    muted: bool = False  #: listenKey expired: nothing more on this connection
    silent_until: float = 0.0
    pending_pings: dict[bytes, float] = field(default_factory=dict)
    next_ping_at: float = 0.0
    incoming: deque[float] = field(default_factory=deque)
    closing: bool = False
    close_request: tuple[str, int, str] | None = None
    queued_bytes: int = 0

    @property
    def target(self) -> str:
        return self.api_key if self.kind == "private" and self.api_key else self.kind

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
        self.closed_reasons: dict[str, int] = {}

    # ------------------------------------------------------------------ engine -> connections
    def sink(self, api_key: str, events: EventBatch, expired_key: str | None) -> None:
        """Engine callback (any thread, engine lock held): serialize and hop onto the loop in order."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        items = [(name, dumps(payload)) for name, payload in events]
        with contextlib.suppress(RuntimeError):  # loop closing during shutdown
            loop.call_soon_threadsafe(self._deliver, api_key, items, expired_key)

    def _account_conns(self, api_key: str) -> list[Conn]:
        return [c for c in self.conns if c.kind == "private" and c.api_key == api_key and not c.closing]

    def _deliver(self, api_key: str, items: list[tuple[str, str]], expired_key: str | None) -> None:
        if expired_key is not None:
            for conn in self._account_conns(api_key):
                if conn.listen_key == expired_key and not conn.muted:
                    self._send_filtered(conn, items)
                    conn.muted = True
            return
        live = [c for c in self._account_conns(api_key) if not c.muted]
        if not live:
            if self.lose_while_disconnected:
                self.lost[api_key] = self.lost.get(api_key, 0) + len(items)
            else:
                backlog = self._backlog.setdefault(api_key, deque(maxlen=MAX_BACKLOG_EVENTS))
                backlog.extend(items)
            return
        for conn in live:
            self._send_filtered(conn, items)

    def _send_filtered(self, conn: Conn, items: Iterable[tuple[str, str]]) -> None:
        for name, text in items:
            if conn.events is None or name in conn.events:
                self._enqueue(conn, "text", text)

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

    def publish_market(self, frame: list[dict[str, Any]]) -> None:
        conns = [c for c in self.conns if c.kind == "market" and not c.closing]
        if not conns:
            return
        text = dumps(frame)
        wrapped: dict[str, str] = {}
        for conn in conns:
            if conn.stream_name is None:
                self._enqueue(conn, "text", text)
            else:
                if conn.stream_name not in wrapped:
                    wrapped[conn.stream_name] = f'{{"stream":{dumps(conn.stream_name)},"data":{text}}}'
                self._enqueue(conn, "text", wrapped[conn.stream_name])

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
        elif self.loop is not None:
            # a writer stuck on a client that stopped reading would never get to the close
            delay = ORDERED_CLOSE_DEADLINE_S if not now else CLOSE_TIMEOUT_S + 0.5
            self.loop.call_later(delay, _abort, conn)

    def select(self, target: str | None) -> list[Conn]:
        """Connections of an api_key, "market", "retired", or all (None)."""
        if target is None:
            return [c for c in self.conns if not c.closing]
        return [c for c in self.conns if c.target == target and not c.closing]

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

    def send_raw(self, target: str, text: str) -> int:
        conns = self.select(target)
        for conn in conns:
            self._enqueue(conn, "text", text)
        return len(conns)

    def close_listen_key(self, listen_key: str) -> None:
        for conn in list(self.conns):
            if conn.kind == "private" and conn.listen_key == listen_key:
                self.close(conn, 1000, "listenKey deleted")

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
                current[conn.target] = current.get(conn.target, 0) + 1
        return {
            "ws_opened": dict(self.opened),
            "frames_sent": dict(self.frames),
            "events_lost": dict(self.lost),
            "current_connections": current,
            "closed": dict(self.closed_reasons),
            "ws_handshakes": self.handshake_report(),
        }

    # ------------------------------------------------------------------ admission
    def admit(self, request: web.Request) -> web.Response | None:
        """Count this handshake attempt; return the refusal (503 maintenance, 429 over the
        attempt limit) that replaces the upgrade, or None to go on."""
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
            return _refusal(
                MAINTENANCE_STATUS,
                -1001,
                "Internal error; unable to process your request. Please try again.",
                self.maintenance_until - now,
            )
        over = len(state.times) - self.connection_limit
        if over > 0:
            state.refused_limit += 1
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
        return None

    def refuse_connections(self, seconds: float) -> None:
        """Refuse every handshake for ``seconds`` from now (0 or less ends a window early)."""
        self.maintenance_until = time.monotonic() + seconds if seconds > 0 else 0.0

    def reset_connection_windows(self) -> None:
        """Forget the attempts inside the current windows (the counts in the report stay)."""
        for state in self._attempts.values():
            state.times.clear()

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
        refused = self.admit(request)
        if refused is not None:
            return refused
        listen_key = request.query.get("listenKey", "")
        api_key = self.engine.account_for_listen_key(listen_key) if listen_key else None
        if api_key is None:
            return web.json_response({"code": -1125, "msg": "This listenKey does not exist."}, status=400)
        events_param = request.query.get("events")
        events = frozenset(e for e in events_param.split("/") if e) if events_param is not None else None
        return await self._serve(request, "private", api_key=api_key, listen_key=listen_key, events=events)

    async def handle_market_ws(self, request: web.Request) -> web.StreamResponse:
        refused = self.admit(request)
        if refused is not None:
            return refused
        stream = request.match_info.get("stream", "")
        return await self._serve(request, "market" if stream in MARK_PRICE_STREAMS else "retired")

    async def handle_market_stream(self, request: web.Request) -> web.StreamResponse:
        refused = self.admit(request)
        if refused is not None:
            return refused
        streams = [s for s in request.query.get("streams", "").split("/") if s]
        mark = next((s for s in streams if s in MARK_PRICE_STREAMS), None)
        if mark is None:
            return await self._serve(request, "retired")
        return await self._serve(request, "market", stream_name=mark)

    async def handle_retired(self, request: web.Request) -> web.StreamResponse:
        refused = self.admit(request)
        if refused is not None:
            return refused
        return await self._serve(request, "retired")

    async def _serve(
        self,
        request: web.Request,
        kind: str,
        api_key: str | None = None,
        listen_key: str | None = None,
        events: frozenset[str] | None = None,
        stream_name: str | None = None,
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
            api_key=api_key,
            listen_key=listen_key,
            events=events,
            stream_name=stream_name,
            next_ping_at=now + self.ping_interval_s,
        )
        self.conns.add(conn)
        self.opened[conn.target] = self.opened.get(conn.target, 0) + 1
        log.info("conn=%d %s opened (%s)", conn.conn_id, conn.target, request.path_qs[:120])
        if kind == "private" and api_key is not None:
            backlog = self._backlog.pop(api_key, None)
            if backlog:
                self._send_filtered(conn, backlog)
        writer = asyncio.create_task(self._writer(conn), name=f"sim-ws-writer-{conn.conn_id}")
        try:
            await self._reader(conn)
        finally:
            if not conn.closing:
                conn.closing = True
                conn.close_request = ("close", 1000, "")
                conn.outbox.put_nowait(("wake", None))
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_TIMEOUT_S + 0.5)
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
        method = request.get("method")
        if method == "LIST_SUBSCRIPTIONS":
            result: Any = [conn.stream_name] if conn.stream_name else []
        else:
            result = None
        self._enqueue(conn, "text", dumps({"result": result, "id": request.get("id")}))

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
                    _abort(conn)
                    return
                if kind == "silence":
                    write_silent_until = data
                    continue
                if kind == "text":
                    conn.queued_bytes -= len(data)
                if time.monotonic() < write_silent_until:
                    if kind == "text" and conn.kind == "private" and conn.api_key:
                        self.lost[conn.api_key] = self.lost.get(conn.api_key, 0) + 1
                    continue
                if kind == "text":
                    await ws.send_str(data)
                    self.frames[conn.target] = self.frames.get(conn.target, 0) + 1
                elif kind == "ping":
                    await ws.ping(data)
                elif kind == "pong":
                    await ws.pong(data)
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.info("conn=%d %s: write failed: %s", conn.conn_id, conn.target, exc)
            conn.closing = True
            _abort(conn)


def _refusal(status: int, code: int, msg: str, retry_after_s: float) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)


def _abort(conn: Conn) -> None:
    transport = conn.request.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
