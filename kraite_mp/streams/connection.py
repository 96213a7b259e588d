"""The one WebSocket loop of both streams: connect, timed receive, client ping/pong, silence watchdog, reconnect.

``WebSocketStream`` runs huey-style: ``initialize()``, then ``loop()`` until ``stop`` is set or the
stream chose an exit code, then ``shutdown()``. Each ``loop()`` is one short step (wait out the
backoff, connect, or wait for and receive one frame and check the connection). A stream says what to
connect to (``connect_url``), what a frame means (``on_frame``), what else ends a connection
(``check``) and when its heartbeat is next due (``beat_due_in``).

Idle costs one blocking call: between frames the loop sleeps in one ``poll()`` of the socket whose
timeout is the nearest of its deadlines (the next client ping, the pong and silence watchdogs, the
connection's age, the heartbeat, ``recv_timeout_s`` at the longest), not in fixed receive steps; what
another thread decides meanwhile wakes that poll at once through ``wake_fds`` (``stop`` is a
``kraite_mp.wakeup.WakeEvent`` in a child). An idle user-data child so wakes a few times a minute.

Client ping/pong (``pong_deadline``), the reconnect delay (``reconnect_delay``) and the reasons to leave a
connection are ``kraite_mp.streams.liveness``. A connection left for a late pong while frames kept coming is
drained like a planned one, because what is in flight on it was sent. The URL may carry a secret (the
listenKey): it is never logged nor put in an error.

Pacing (Binance counts every connection attempt per IP): each attempt first asks ``before_connect``,
the stream's hook onto the egress's connection budget (``binance.connections.ConnectionBudget``; this module
knows no Redis). Without a token nothing is sent: the loop waits, state ``paced``, beating and cut
short by ``stop``, and asks again. A reconnect the stream did not choose itself (a drop, a server close,
a failure, an expired key) waits up to ``Liveness.reconnect_spread_s`` longer, at random, so that a mass
drop does not bring every stream back in the same instant; the planned rollover at ``max_age_s`` is
spread already, per account (``liveness.jittered_max_age``).

Make-before-break rollover (``overlap_rollover``): at ``max_age_s`` the new connection is opened (a
connection token first) while the old one keeps streaming, then the old one is drained and closed,
so no event falls between them; the few seen on both are one frame for the stream (its frame ids
come from the content). A rollover that cannot open its new connection keeps the old one and tries
again ``ROLLOVER_RETRY_S`` later; the server ends the old one at 24 h at the latest.

Graceful close (on stop and on a planned reconnect) drains (``kraite_mp.streams.drain``): the close
frame, then every data frame to ``on_frame`` until the server's close frame or
``Liveness.drain_timeout_s``. A dead or silent connection is just dropped.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import threading
import time

import websocket

from kraite_mp import exitcodes
from kraite_mp.backoff import Attempts
from kraite_mp.binance.tls import websocket_sslopt
from kraite_mp.streams.drain import drain_connection
from kraite_mp.streams.liveness import (
    Disconnect,
    Liveness,
    Reason,
    describe,
    pong_deadline,
    reconnect_delay,
)

#: A stream without a connection token asks the budget again at least this often.
PACED_RECHECK_S = 10.0
#: A rollover whose new connection failed (or had no token) tries again this much later, the old one streaming.
ROLLOVER_RETRY_S = 5.0
#: Once a frame's first bytes are there, the rest must come within this (else the loop goes round and the
#: frame is read on, websocket-client keeps what it read); also the handshake's read timeout after connect.
FRAME_READ_TIMEOUT_S = 1.0
#: A deadline is acted on this late at least: the watchdog compares with ``>``, so waking exactly on it
#: would poll again for nothing.
DEADLINE_SLACK_S = 0.005


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
        #: When the last data frame was received: data after an unanswered ping defers the pong
        #: deadline (``liveness.pong_deadline``).
        self._received_at = 0.0
        self._ping_payload = b""
        self._pings = 0
        #: Waiting for a connection token (``before_connect`` said no): the loop beats ``paced``.
        self.paced = False
        #: Connection attempts refused by ``before_connect`` (each is a wait, nothing was sent).
        self.paced_waits = 0
        #: The random part (``Liveness.reconnect_spread_s``) of the delay last given to ``on_disconnected``.
        self.last_spread_s = 0.0
        #: Wall time since which the stream has had no connection (start, or the last one's end): the
        #: egress's connection tokens go longest dark first (``before_connect``).
        self.dark_since = time.time()
        #: Open the next connection before closing the old one at ``max_age_s`` (see the module doc).
        self.overlap_rollover = False
        #: True during the ``on_connected`` of a make-before-break rollover (no gap to reconcile).
        self.rolled_over = False
        #: Make-before-break rollovers done, and when the next try may come after a failed one.
        self.rollovers = 0
        self._rollover_retry_at = 0.0
        #: The TLS context of ``wss://`` connections (``binance.tls.client_context``); None: websocket-client's.
        self.tls: ssl.SSLContext | None = None
        #: Watches the connection's socket and ``wake_fds`` (made per connection, by ``_adopt``).
        self._poller: select.poll | None = None
        self._sock: socket.socket | None = None
        self._sock_fd = -1

    # -- what a stream provides ------------------------------------------------------------------
    def connect_url(self) -> str | None:
        """What to connect to now (may raise Disconnect); None once the stream has set ``exit_code``."""
        raise NotImplementedError

    def on_frame(self, data: bytes) -> bool:
        """Handle one text/binary frame; True if it proves the stream alive (resets the silence watchdog)."""
        raise NotImplementedError

    def before_connect(self) -> float:
        """Called right before each handshake: 0.0 to go (a connection token is taken), or the seconds to
        wait before asking again (nothing is sent). The stream's hook onto the egress's connection budget."""
        return 0.0

    def on_connected(self) -> None:
        """Called once per connection, right after the handshake."""

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        """Called after a connection ended (or failed to open); the next connect is ``delay_s`` away, of which
        ``last_spread_s`` is the random spread."""

    def delay_text(self, delay_s: float) -> str:
        """``1.0s``, or ``0.0s + 1.3s spread``: the backoff and the random spread of a reconnect delay."""
        spread = min(self.last_spread_s, delay_s)
        if spread <= 0:
            return f"{delay_s:.1f}s"
        return f"{delay_s - spread:.1f}s + {spread:.1f}s spread"

    def check(self) -> Reason | None:
        """Called before each receive: a reason of the stream's own to leave the connection."""
        return None

    def beat(self, state: str | None = None) -> None:
        """Called every pass of ``loop``: report liveness (``state`` None: unchanged)."""

    def beat_due_in(self, now: float) -> float:
        """Seconds until ``beat`` must run again (a loop pass is due by then at the latest)."""
        return self.liveness.recv_timeout_s

    def wake_fds(self) -> list[int]:
        """Descriptors that, readable, end the wait for a frame at once: what other threads signal with.
        ``stop``'s if it has one (``kraite_mp.wakeup.WakeEvent``); a stream adds its own."""
        fileno = getattr(self.stop, "fileno", None)
        return [fileno()] if fileno is not None else []

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
                self.beat("paced" if self.paced else "backoff")
                self.stop.wait(min(wait, self.liveness.recv_timeout_s, self.beat_due_in(time.monotonic())))
                return
            self._connect()
            return
        reason = self.check()
        problem = Disconnect(reason) if reason is not None else self._liveness_problem(time.monotonic())
        if problem is not None and problem.reason is Reason.MAX_AGE and self.overlap_rollover:
            if self._roll_over():
                return
            problem = None  # the old connection goes on until the next try
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
            if self._paced_wait():
                return
            ws = self._open_socket(url)
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
        self._adopt(ws)
        self.on_connected()

    def _open_socket(self, url: str) -> websocket.WebSocket:
        """TCP connect + WebSocket handshake (``connect_timeout_s``), then the receive timeout set."""
        ws = websocket.create_connection(
            url,
            sslopt=websocket_sslopt(url, self.tls),
            timeout=self.liveness.connect_timeout_s,
            skip_utf8_validation=True,
            enable_multithread=True,
        )
        ws.settimeout(min(FRAME_READ_TIMEOUT_S, self.liveness.recv_timeout_s))
        return ws

    def _adopt(self, ws: websocket.WebSocket) -> None:
        """``ws`` is the stream's connection from now on; the watchdog and the pings run from here."""
        now = time.monotonic()
        self.ws = ws
        self.connected_at = self._last_alive_at = now
        self._ping_due_at = now + self.liveness.ping_interval_s
        self._ping_sent_at = None
        self._poller, self._sock, self._sock_fd = None, None, -1
        sock = getattr(ws, "sock", None)  # None: a stand-in without a socket (unit tests)
        if sock is not None:
            poller = select.poll()
            self._sock, self._sock_fd = sock, sock.fileno()
            poller.register(self._sock_fd, select.POLLIN | select.POLLPRI)
            for fd in self.wake_fds():
                poller.register(fd, select.POLLIN)
            self._poller = poller

    def _roll_over(self) -> bool:
        """Make before break: open the next connection, then drain and close the old one. False (and the old
        one kept) while it cannot: no token, or the new connection failed; it is tried again later."""
        now = time.monotonic()
        if self.ws is None or now < self._rollover_retry_at:
            return False
        self._rollover_retry_at = now + ROLLOVER_RETRY_S
        try:
            url = self.connect_url()
            if url is None:
                return True  # the stream chose an exit code
            wait = self.before_connect()
            if wait > 0:
                self._rollover_retry_at = now + wait
                self.log.info("rollover waits %.1fs for a connection token; the old connection streams", wait)
                return False
            new = self._open_socket(url)
        except Disconnect as d:
            self.log.warning("rollover: no new connection (%s); the old one streams, retrying", d)
            return False
        except websocket.WebSocketBadStatusException as e:
            self.log.warning(
                "rollover: handshake refused (HTTP %s); the old one streams, retrying", e.status_code
            )
            return False
        except (websocket.WebSocketException, OSError) as e:
            self.log.warning("rollover: cannot connect (%s); the old one streams, retrying", describe(e))
            return False
        except Exception:  # noqa: BLE001 - a failing hook never kills a working connection
            self.log.exception("rollover failed; the old connection streams")
            return False
        # both are open: whatever the server sends from now on reaches the new one; the old one's frames
        # (some also on the new one, one frame by content) are read to its close frame first
        self.close(graceful=True)
        self._adopt(new)
        self.last_reason = Reason.MAX_AGE
        self.rollovers += 1
        self.rolled_over = True
        try:
            self.on_connected()
        finally:
            self.rolled_over = False
        return True

    def _paced_wait(self) -> bool:
        """Ask ``before_connect`` for a token; True (and the next try scheduled) if the attempt must wait.

        A failing hook is logged and never fatal: the attempt goes ahead (a stream kept dark by a bug in
        its pacing would be worse than one unpaced attempt)."""
        try:
            wait = self.before_connect()
        except Exception:  # noqa: BLE001 - a hook never kills the stream
            self.log.exception("connection pacing failed; connecting without a token")
            wait = 0.0
        if wait <= 0:
            if self.paced:
                self.log.info("connection token taken after %d wait(s)", self.paced_waits)
            self.paced, self.paced_waits = False, 0
            return False
        # ask again at least this often: a wait computed from a local share (Redis was unreachable) or
        # a window that refills early must not keep a stream dark for minutes
        wait = min(wait, PACED_RECHECK_S)
        if not self.paced:
            self.log.info(
                "the egress's connection attempts are spent: waiting for a token (next try in %.1fs)", wait
            )
        self.paced = True
        self.paced_waits += 1
        self._next_connect_at = time.monotonic() + wait
        self.beat("paced")
        return True

    def _liveness_problem(self, now: float) -> Disconnect | None:
        lv = self.liveness
        if (
            lv.max_age_s is not None
            and self.connected_at is not None
            and now - self.connected_at >= lv.max_age_s
        ):
            return Disconnect(Reason.MAX_AGE)
        pong_due = pong_deadline(self._ping_sent_at, self._received_at, self.liveness.pong_timeout_s)
        if pong_due is not None and now > pong_due:
            assert self._ping_sent_at is not None
            waited = now - self._ping_sent_at
            if self._received_at > self._ping_sent_at:
                # it delivers, only the pong is this late: read what it sent before leaving it
                return Disconnect(
                    Reason.PONG_TIMEOUT, f"no pong for {waited:.1f}s while frames kept coming", drain=True
                )
            return Disconnect(Reason.PONG_TIMEOUT, f"no pong for {waited:.1f}s")
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
        if not self._frame_ready(self._wait_s(now)):
            self.beat()
            return
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
            self._received_at = now  # data (not a stray pong) defers an outstanding ping's deadline
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
            # websocket-client has answered the close. After a healthy run this is the server's rollover
            # (Binance closes every connection after 24 h): reconnect at once; a young one is a failure.
            uptime = None if self.connected_at is None else now - self.connected_at
            self.disconnect(Disconnect(Reason.SERVER_CLOSED, planned=self.attempts.healthy(uptime)))
            return
        self.beat()

    def _wait_s(self, now: float) -> float:
        """How long the wait for a frame may block: until the nearest deadline of the connection or stream."""
        lv = self.liveness
        due = now + lv.recv_timeout_s
        pong_due = pong_deadline(self._ping_sent_at, self._received_at, self.liveness.pong_timeout_s)
        due = min(due, self._ping_due_at if pong_due is None else pong_due + DEADLINE_SLACK_S)
        due = min(due, self._last_alive_at + lv.silence_s + DEADLINE_SLACK_S)
        if lv.max_age_s is not None and self.connected_at is not None:
            due = min(due, max(self.connected_at + lv.max_age_s, self._rollover_retry_at))
        due = min(due, now + self.beat_due_in(now))
        return max(due - now, 0.0)

    def _frame_ready(self, timeout_s: float) -> bool:
        """Block until the socket has bytes (True) or ``timeout_s`` passed or a wake fd fired (False)."""
        if self._poller is None:
            return True  # nothing to poll: the receive (with its own timeout) decides
        pending = getattr(self._sock, "pending", None)  # TLS: bytes decrypted already are invisible to poll
        if pending is not None and pending() > 0:
            return True
        try:
            events = self._poller.poll(timeout_s * 1000.0)
        except OSError:
            return True  # a broken descriptor: let the receive say what is wrong
        return any(fd == self._sock_fd for fd, _ in events)

    def disconnect(self, d: Disconnect) -> None:
        """Close the connection (if any) and schedule the next connect by ``reconnect_delay``."""
        now = time.monotonic()
        uptime = None if self.connected_at is None else now - self.connected_at
        if self.ws is not None:
            self.dark_since = time.time()
        # a closed connection has nothing left to read: only one we leave while it works is drained
        self.close(graceful=d.drain)
        if self.stop.is_set() or self.exit_code is not None:
            return
        delay = max(reconnect_delay(self.attempts, d.planned, uptime), d.retry_after_s)
        self.last_spread_s = 0.0
        if d.reason is not Reason.MAX_AGE and self.liveness.reconnect_spread_s > 0:
            self.last_spread_s = random.uniform(0.0, self.liveness.reconnect_spread_s)
            delay += self.last_spread_s
        self._next_connect_at = now + delay
        self.last_reason = d.reason
        self.on_disconnected(d, delay)

    def close(self, *, graceful: bool = True) -> None:
        """Drain a working connection (``drain``), then drop the socket; a dead or silent one is just dropped.

        ``on_frame`` may raise while draining (the spool refused a frame): the socket is dropped all the same.
        """
        ws, self.ws, self.connected_at = self.ws, None, None
        self._poller, self._sock, self._sock_fd = None, None, -1
        if ws is None:
            return
        try:
            if graceful:
                self.drain(ws)
        finally:
            try:
                ws.shutdown()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001 - closing a broken socket may fail any way it likes
                pass

    def drain(self, ws: websocket.WebSocket) -> int:
        """Read the server's last frames into ``on_frame`` (``streams.drain``); the number of frames read."""
        return drain_connection(ws, self.on_frame, self.liveness.drain_timeout_s, self.log)
