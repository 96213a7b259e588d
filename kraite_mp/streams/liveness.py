"""How a stream judges and leaves its connection: the reasons (``Reason``), the decision to leave
(``Disconnect``), the stream's thresholds (``Liveness``), the reconnect delay (``reconnect_delay``) and the
per-account rollover age (``jittered_max_age``). The loop that acts on them is
``kraite_mp.streams.connection``.

Client ping/pong (``pong_deadline``): a ping unanswered for ``pong_timeout_s`` with nothing received
since means half-open, and the socket is dropped. Frames that keep arriving after the ping defer that
deadline (the server answers in order: under a burst the pong waits behind them, and a connection that
delivers is not half-open), to ``PONG_BEHIND_DATA_FACTOR`` times ``pong_timeout_s`` at most; a
connection left then is drained like a planned one, because what is in flight on it was sent.

Reconnect delay (``reconnect_delay``): capped exponential backoff that starts over once a
connection stayed up ``supervisor.healthy_after_s``; a planned reconnect after a healthy run is
immediate. The server's own close of a healthy connection (Binance ends every one after 24 h) is
planned too; of a young one it is a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from kraite_mp.backoff import Attempts
from kraite_mp.logs import describe_error

#: Default of ``Liveness.drain_timeout_s``: a graceful close reads the server's last frames this long at most.
DRAIN_TIMEOUT_S = 2.0
#: A pong may come this many ``pong_timeout_s`` late while data frames keep arriving: the server answers
#: pings in order, so under a burst the pong waits behind the frames sent before it (the connection is
#: not half-open, it delivers). Past that it is not trusted any longer, and it is left gracefully.
PONG_BEHIND_DATA_FACTOR = 6.0
#: Spreads the per-account connection ages: frac(id * this) is evenly spread over consecutive ids.
GOLDEN_RATIO_CONJUGATE = (math.sqrt(5.0) - 1.0) / 2.0


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


#: Reconnects the stream asks for itself, on a connection that still works (a server close is
#: planned or not by the connection's uptime: ``Disconnect.planned``).
PLANNED_REASONS = frozenset({Reason.MAX_AGE, Reason.LISTEN_KEY_EXPIRED, Reason.LISTEN_KEY_LOST})


class Disconnect(Exception):
    """Leave the connection (or do not open one) for ``reason``; ``retry_after_s`` floors the next delay."""

    def __init__(
        self,
        reason: Reason,
        detail: str = "",
        *,
        retry_after_s: float = 0.0,
        status: int | None = None,
        planned: bool | None = None,
        drain: bool | None = None,
    ) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s
        #: The HTTP status of a refused handshake.
        self.status = status
        #: Part of normal life (INFO, no backoff after a healthy run); None: as ``reason.planned`` says.
        self.planned = reason.planned if planned is None else planned
        #: Read the connection to the server's close frame before dropping it; None: if ``planned`` (a
        #: connection left while it works), unless the server closed it (nothing is left to read).
        self.drain = (self.planned and reason is not Reason.SERVER_CLOSED) if drain is None else drain


@dataclass(frozen=True)
class Liveness:
    """How one stream judges its connection."""

    #: Send a client ping this long after the previous one was answered.
    ping_interval_s: float
    #: No matching pong this long after a ping: the connection is half-open.
    pong_timeout_s: float
    #: Nothing alive received for this long: the socket is open but silent.
    silence_s: float
    #: Longest blocking wait for a frame (and backoff sleep): ``loop`` returns at least this often; the
    #: stream's deadlines (pings, watchdogs, age, ``beat_due_in``) make it return sooner when due.
    recv_timeout_s: float
    #: TCP connect + WebSocket handshake timeout (``stop`` is not checked meanwhile).
    connect_timeout_s: float
    #: Reconnect (planned) after this long; None: the server ends it.
    max_age_s: float | None = None
    #: A graceful close reads (and hands to ``on_frame``) what the server sent until its close frame,
    #: for this long at most; then the socket is dropped.
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    #: A reconnect other than the planned max-age rollover waits up to this much longer (uniform random).
    reconnect_spread_s: float = 0.0


def describe(e: BaseException) -> str:
    """Type and redacted first line of an error, short: library messages may quote the URL."""
    name, text = type(e).__name__, describe_error(e)
    return (name if text == name else f"{name}: {text}")[:300]


def reconnect_delay(attempts: Attempts, planned: bool, uptime_s: float | None) -> float:
    """Seconds before the next connect after a connection that lasted ``uptime_s`` (None: never opened).

    A healthy run (``attempts.healthy_after_s``) starts the backoff over. A planned reconnect with no
    failure counted is immediate; if its connection was not healthy it still counts, so that a key
    that expires at once every time backs off too. Everything else waits ``attempts.next_delay()``.
    """
    healthy = attempts.healthy(uptime_s)
    if planned and attempts.count == 0:
        if not healthy:
            attempts.count = 1
        return 0.0
    return attempts.next_delay()


def jittered_max_age(max_age_s: float, jitter_ratio: float, account_id: int) -> float:
    """The connection age after which account ``account_id`` rolls over: within the last ``jitter_ratio`` of
    ``max_age_s``, fixed per account, spread evenly over consecutive ids (the golden-ratio sequence: n
    consecutive ids leave gaps of about 1/n of the range or more), so that daily rollovers never coincide."""
    if jitter_ratio <= 0:
        return max_age_s
    fraction = (account_id * GOLDEN_RATIO_CONJUGATE) % 1.0
    return max_age_s * (1.0 - min(jitter_ratio, 1.0) * fraction)


def pong_deadline(ping_sent_at: float | None, received_at: float, pong_timeout_s: float) -> float | None:
    """When the pong of the ping sent at ``ping_sent_at`` is overdue (None: no ping outstanding), the last data
    frame received at ``received_at`` (monotonic seconds).

    ``pong_timeout_s`` after the ping if nothing came since (half-open); while frames keep coming it is
    deferred to ``pong_timeout_s`` after the last one, for ``PONG_BEHIND_DATA_FACTOR`` times
    ``pong_timeout_s`` at most: a burst queues the pong behind the frames sent before it, and leaving a
    connection that delivers would lose what is in flight on it."""
    if ping_sent_at is None:
        return None
    due = ping_sent_at + pong_timeout_s
    if received_at > ping_sent_at:
        cap = ping_sent_at + pong_timeout_s * PONG_BEHIND_DATA_FACTOR
        due = min(max(due, received_at + pong_timeout_s), cap)
    return due
