"""The one WebSocket loop of both streams: connect, timed receive, client ping/pong, silence watchdog, reconnect.

``WebSocketStream`` runs huey-style: ``initialize()``, then ``loop()`` until ``stop`` is set or the
stream chose an exit code, then ``shutdown()``. Each ``loop()`` is one short step (wait out the
backoff, connect, or receive one frame and check the connection), so a stream's own checks and
its heartbeat run at least every ``recv_timeout_s``. A stream says what to connect to
(``connect_url``), what a frame means (``on_frame``) and what else ends a connection (``check``).

Reconnect delay (``reconnect_delay``): capped exponential backoff that starts over once a
connection stayed up ``supervisor.healthy_after_s``; a planned reconnect after a healthy run is
immediate. The URL may carry a secret (the listenKey): it is never logged nor put in an error.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import websocket

from kraite_mp import exitcodes
from kraite_mp.backoff import Attempts
from kraite_mp.logs import describe_error

#: How long a close handshake may take before the socket is just dropped.
CLOSE_TIMEOUT_S = 1.0


class Reason(StrEnum):
    """Why a connection ended or never opened; the value names it in logs and reconcile requests."""

    CONNECT_FAILED = "connect-failed"
    HANDSHAKE_REFUSED = "handshake-refused"
    CONNECTION_LOST = "connection-lost"
    PROTOCOL_ERROR = "protocol-error"
    SERVER_CLOSED = "server-closed"
    PING_FAILED = "ping-failed"
    PONG_TIMEOUT = "pong-timeout"
    SILENT = "watchdog"
    MAX_AGE = "max-connection-age"
    LISTEN_KEY_EXPIRED = "listenKeyExpired"
    LISTEN_KEY_LOST = "listen-key-lost"
    LISTEN_KEY_FAILED = "listen-key-failed"
    RATE_LIMITED = "rate-limited"

    @property
    def planned(self) -> bool:
        """Part of normal life: reconnect at once after a healthy run, log at INFO, close gracefully."""
        return self in PLANNED_REASONS


#: Reconnects the stream asks for itself, on a connection that still works.
PLANNED_REASONS = frozenset({Reason.MAX_AGE, Reason.LISTEN_KEY_EXPIRED, Reason.LISTEN_KEY_LOST})


class Disconnect(Exception):
    """Leave the connection (or do not open one) for ``reason``; ``retry_after_s`` floors the next delay."""

    def __init__(
        self, reason: Reason, detail: str = "", *, retry_after_s: float = 0.0, status: int | None = None
    ) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s
        #: The HTTP status of a refused handshake.
        self.status = status


@dataclass(frozen=True)
class Liveness:
    """How one stream judges its connection."""

    #: Send a client ping this long after the previous one was answered.
    ping_interval_s: float
    #: No matching pong this long after a ping: the connection is half-open.
    pong_timeout_s: float
    #: Nothing alive received for this long: the socket is open but silent.
    silence_s: float
    #: Longest blocking receive (and backoff sleep): how often ``loop`` returns.
    recv_timeout_s: float
    #: TCP connect + WebSocket handshake timeout (``stop`` is not checked meanwhile).
    connect_timeout_s: float
    #: Reconnect (planned) after this long; None: the server ends it.
    max_age_s: float | None = None


def describe(e: BaseException) -> str:
    """Type and redacted first line of an error, short: library messages may quote the URL."""
    name, text = type(e).__name__, describe_error(e)
    return (name if text == name else f"{name}: {text}")[:300]


def reconnect_delay(attempts: Attempts, reason: Reason, uptime_s: float | None) -> float:
    """Seconds before the next connect after a connection that lasted ``uptime_s`` (None: never opened).

    A healthy run (``attempts.healthy_after_s``) starts the backoff over. A planned reconnect with no
    failure counted is immediate; if its connection was not healthy it still counts, so that a key
    that expires at once every time backs off too. Everything else waits ``attempts.next_delay()``.
    """
    healthy = attempts.healthy(uptime_s)
    if reason.planned and attempts.count == 0:
        if not healthy:
            attempts.count = 1
        return 0.0
    return attempts.next_delay()


class WebSocketStream:
    """One blocking WebSocket at a time and its reconnects; subclasses add what their stream means."""

    def __init__(
        self, liveness: Liveness, attempts: Attempts, stop: threading.Event, log: logging.Logger
    ) -> None:
        self.liveness = liveness
        self.attempts = attempts
        self.stop = stop
        self.log = log
        self.ws: websocket.WebSocket | None = None
        #: Set by a stream that must end (FATAL, ...): ``run`` returns it.
        self.exit_code: int | None = None
        #: Why the previous connection ended; None before the first.
        self.last_reason: Reason | None = None
        self.connected_at: float | None = None
        self._next_connect_at = 0.0
        self._last_alive_at = 0.0
        self._ping_due_at = 0.0
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._pings = 0

    # -- what a stream provides ------------------------------------------------------------------
    def connect_url(self) -> str | None:
        """What to connect to now (may raise Disconnect); None once the stream has set ``exit_code``."""
        raise NotImplementedError

    def on_frame(self, data: bytes) -> bool:
        """Handle one text/binary frame; True if it proves the stream alive (resets the silence watchdog)."""
        raise NotImplementedError

    def on_connected(self) -> None:
        """Called once per connection, right after the handshake."""

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        """Called after a connection ended (or failed to open); the next connect is ``delay_s`` away."""

    def check(self) -> Reason | None:
        """Called before each receive: a reason of the stream's own to leave the connection."""
        return None

    def beat(self, state: str | None = None) -> None:
        """Called every pass of ``loop``: report liveness (``state`` None: unchanged)."""

    # -- lifecycle -------------------------------------------------------------------------------
    def initialize(self) -> None:
        """Called once before the first ``loop``; may set ``exit_code``."""

    def shutdown(self) -> None:
        """Called once at the end, even after a failed ``initialize``."""
        self.close(graceful=True)

    def run(self) -> int:
        try:
            self.initialize()
            while self.exit_code is None and not self.stop.is_set():
                self.loop()
        finally:
            self.shutdown()
        return exitcodes.EXIT_OK if self.exit_code is None else self.exit_code

    def loop(self) -> None:
        """One step: sleep in the backoff, connect, or check the connection and receive one frame."""
        if self.ws is None:
            wait = self._next_connect_at - time.monotonic()
            if wait > 0:
                self.beat("backoff")
                self.stop.wait(min(wait, self.liveness.recv_timeout_s))
                return
            self._connect()
            return
        reason = self.check()
        problem = Disconnect(reason) if reason is not None else self._liveness_problem(time.monotonic())
        if problem is not None:
            self.disconnect(problem)
            return
        self._receive(self.ws)

    # -- the connection --------------------------------------------------------------------------
    @property
    def connect_reason(self) -> str:
        """``connect`` for the first connection, ``reconnect:<reason>`` after that."""
        return "connect" if self.last_reason is None else f"reconnect:{self.last_reason.value}"

    def silent_for_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self._last_alive_at

    def _connect(self) -> None:
        self.beat("connecting")
        try:
            url = self.connect_url()
            if url is None:
                return
            ws = websocket.create_connection(
                url,
                timeout=self.liveness.connect_timeout_s,
                skip_utf8_validation=True,
                enable_multithread=True,
            )
        except Disconnect as d:
            self.disconnect(d)
            return
        except websocket.WebSocketBadStatusException as e:
            self.disconnect(
                Disconnect(Reason.HANDSHAKE_REFUSED, f"HTTP {e.status_code}", status=e.status_code)
            )
            return
        except (websocket.WebSocketException, OSError) as e:
            self.disconnect(Disconnect(Reason.CONNECT_FAILED, describe(e)))
            return
        ws.settimeout(self.liveness.recv_timeout_s)
        now = time.monotonic()
        self.ws = ws
        self.connected_at = self._last_alive_at = now  # the watchdog runs from the handshake
        self._ping_due_at = now + self.liveness.ping_interval_s
        self._ping_sent_at = None
        self.on_connected()

    def _liveness_problem(self, now: float) -> Disconnect | None:
        lv = self.liveness
        if (
            lv.max_age_s is not None
            and self.connected_at is not None
            and now - self.connected_at >= lv.max_age_s
        ):
            return Disconnect(Reason.MAX_AGE)
        if self._ping_sent_at is not None and now - self._ping_sent_at > lv.pong_timeout_s:
            return Disconnect(Reason.PONG_TIMEOUT, f"no pong for {now - self._ping_sent_at:.1f}s")
        silent = self.silent_for_s(now)
        if silent > lv.silence_s:
            return Disconnect(Reason.SILENT, f"silent for {silent:.1f}s")
        return None

    def _receive(self, ws: websocket.WebSocket) -> None:
        now = time.monotonic()
        if self._ping_sent_at is None and now >= self._ping_due_at:
            self._pings += 1
            self._ping_payload = str(self._pings).encode()
            try:
                ws.ping(self._ping_payload)
            except (websocket.WebSocketException, OSError) as e:
                self.disconnect(Disconnect(Reason.PING_FAILED, describe(e)))
                return
            self._ping_sent_at = now
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            self.beat()
            return
        except (websocket.WebSocketConnectionClosedException, OSError) as e:
            self.disconnect(Disconnect(Reason.CONNECTION_LOST, describe(e)))
            return
        except websocket.WebSocketException as e:
            self.disconnect(Disconnect(Reason.PROTOCOL_ERROR, describe(e)))
            return
        now = time.monotonic()
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            if self.on_frame(frame.data):
                self._last_alive_at = now
        elif opcode == websocket.ABNF.OPCODE_PONG:
            self._last_alive_at = now
            if self._ping_sent_at is not None and frame.data == self._ping_payload:
                self._ping_sent_at = None
                self._ping_due_at = now + self.liveness.ping_interval_s
        elif opcode == websocket.ABNF.OPCODE_PING:
            self._last_alive_at = now  # websocket-client has already answered it
        elif opcode == websocket.ABNF.OPCODE_CLOSE:
            self.disconnect(Disconnect(Reason.SERVER_CLOSED))  # websocket-client has answered the close
            return
        self.beat()

    def disconnect(self, d: Disconnect) -> None:
        """Close the connection (if any) and schedule the next connect by ``reconnect_delay``."""
        now = time.monotonic()
        uptime = None if self.connected_at is None else now - self.connected_at
        self.close(graceful=d.reason.planned)
        if self.stop.is_set() or self.exit_code is not None:
            return
        delay = max(reconnect_delay(self.attempts, d.reason, uptime), d.retry_after_s)
        self._next_connect_at = now + delay
        self.last_reason = d.reason
        self.on_disconnected(d, delay)

    def close(self, *, graceful: bool = True) -> None:
        """Close handshake on a working connection; just drop the socket of a dead or silent one."""
        ws, self.ws, self.connected_at = self.ws, None, None
        if ws is None:
            return
        try:
            if graceful:
                ws.settimeout(CLOSE_TIMEOUT_S)
                ws.close(timeout=CLOSE_TIMEOUT_S)
            else:
                ws.shutdown()  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001 - closing a broken socket may fail any way it likes
            try:
                ws.shutdown()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001
                pass
