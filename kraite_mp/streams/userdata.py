"""The user-data child: one account's Binance USD-M user-data stream -> durable spool -> Dramatiq.

Threads (all started after the fork, by ``run_user_data_child``):

- **main**: the shared connection loop (``streams.connection``) on
  ``<ws_url>/private/ws?listenKey=<key>&events=A/B/...``. Every frame is scrubbed of the listenKey
  and written to the spool before anything else; that is all the receive path does, so neither a
  slow Redis nor a dead one can delay receiving or answering server pings.
- **sender** (``streams.sender``): spool -> Redis in order; the title shows ``backlog=N``.
- **keepalive**: ``PUT /fapi/v1/listenKey`` every ``keepalive_interval_s``. -1125 makes the main
  loop get a new key and reconnect; -2015 makes the child exit FATAL.

Every connection attempt takes a token of the egress's connection budget first (``before_connect``,
``binance.connections.connection_budget``, built after the fork); the planned rollover comes at this
account's own age (``jittered_max_age``), reconnects after a drop are spread (``reconnect_spread_s``).

After every (re)connect a REST reconciliation of the account is requested (frames in the gap are
lost); the request goes through the spool like a frame, so a Redis outage cannot lose it either. The
planned rollover at the connection's age is make-before-break (``overlap_rollover``): the new
connection opens first, the old one is drained and closed after, so there is no gap to reconcile;
an event seen on both has one frame id (``FrameIds.for_frame``: from its content) and is audited once.
The spool keeps each frame until a worker acknowledged its audit (``streams.sender``); while its disk
refuses writes, frames wait in memory (``spool_memory_frames``) and the title shows ``spool=memory``.
The listenKey is registered for log redaction and is never logged, in the title or in an exception.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kraite_mp import exitcodes
from kraite_mp.backoff import Attempts
from kraite_mp.binance.tls import client_context
from kraite_mp.binance.user import MAX_FRAME_CHARS, is_listen_key_expired, scrub_text
from kraite_mp.logs import redact, register_secret
from kraite_mp.messages import FrameIds, build_producer_broker, event_type_of, frame_record, reconcile_record
from kraite_mp.metrics import series
from kraite_mp.streams.connection import WebSocketStream
from kraite_mp.streams.liveness import Disconnect, Liveness, Reason, describe, jittered_max_age
from kraite_mp.streams.sender import SENDER_DRAIN_S, Acks, SpoolSender
from kraite_mp.streams.spool import Spool
from kraite_mp.streams.spool_files import SpoolError
from kraite_mp.supervisor.context import BEAT_INTERVAL_S, idle_beat_s
from kraite_mp.wakeup import WakeEvent

if TYPE_CHECKING:
    from kraite_mp.binance.connections import ConnectionBudget
    from kraite_mp.binance.rest import BinanceRest
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account
    from kraite_mp.supervisor.context import ChildContext

#: WebSocket handshake timeout.
WS_CONNECT_TIMEOUT_S = 10.0
#: The series of a child are written at most this often (and on every state change).
METRICS_INTERVAL_S = 1.0
#: The keepalive thread looks at its deadline (and a listenKey that changed) at least this often.
KEEPALIVE_MAX_SLEEP_S = 300.0
#: After a failed keepalive (network, 5xx), retry this soon.
KEEPALIVE_RETRY_S = 60.0
#: Handshake statuses that mean the server does not know the key (it expired between POST and connect).
KEY_REFUSED_STATUSES = frozenset({400, 401, 403, 410})
#: A handshake answered 404: the server has no such route, i.e. ``binance.ws_url`` is wrong (not the key).
ROUTE_UNKNOWN_STATUS = 404


def stream_url(settings: Settings, listen_key: str) -> str:
    """The user-data URL; it holds the listenKey: never log it."""
    events = "/".join(settings.user_data_stream.events)
    return f"{settings.binance.ws_url.rstrip('/')}/private/ws?listenKey={listen_key}&events={events}"


def spool_directory(settings: Settings, account_id: int) -> str:
    return os.path.join(settings.user_data_stream.spool_dir, str(account_id))


def liveness(settings: Settings, account_id: int | None = None) -> Liveness:
    """How a user-data connection is judged; with ``account_id``, that account's own max age."""
    cfg = settings.user_data_stream
    max_age = cfg.max_connection_age_s
    if account_id is not None:
        max_age = jittered_max_age(max_age, cfg.max_connection_age_jitter_ratio, account_id)
    return Liveness(
        ping_interval_s=cfg.ping_interval_s,
        pong_timeout_s=cfg.pong_timeout_s,
        # the stream may be quiet for hours: the pongs to our pings are what proves it alive
        silence_s=cfg.ping_interval_s + cfg.pong_timeout_s,
        # an idle stream sleeps until its next deadline (ping, watchdog, age), its beat at the latest
        recv_timeout_s=idle_beat_s(settings.supervisor.heartbeat_timeout_s),
        connect_timeout_s=WS_CONNECT_TIMEOUT_S,
        max_age_s=max_age,
        drain_timeout_s=cfg.drain_timeout_s,
        reconnect_spread_s=settings.binance.reconnect_spread_s,
    )


class UserDataStream(WebSocketStream):
    """One account's stream; ``run()`` returns the exit code."""

    def __init__(self, ctx: ChildContext, account: Account) -> None:
        super().__init__(
            liveness(ctx.settings, account.id),
            Attempts.from_settings(ctx.settings.supervisor),
            ctx.stop,
            logging.getLogger(f"{__name__}.account{account.id}"),
        )
        self.ctx = ctx
        self.settings = ctx.settings
        self.account = account
        self.cfg = ctx.settings.user_data_stream
        self.ids = FrameIds(account.id)
        self.overlap_rollover = True  # one listenKey serves several connections: roll over without a gap
        self.tls = client_context(ctx.settings.binance.ca_file)  # the supervisor's, made before the fork
        self._account_label = str(account.id)
        #: Frames per event type not yet added to ``kraite_user_data_frames_total`` (``beat`` adds them:
        #: a metric write per frame would cost a third of the receive path, bench/metrics_cost.py).
        self._frame_counts: dict[str, int] = {}
        self._metrics_at = 0.0
        self.frames = 0
        self.reconnects = 0
        self.last_frame_at: float | None = None
        self.spool: Spool | None = None
        self.sender: SpoolSender | None = None
        self.rest: BinanceRest | None = None
        self.connections: ConnectionBudget | None = None
        self._key: str | None = None
        self._key_expired = False
        self._key_lost = threading.Event()
        self._fatal_error: str | None = None
        self._keepalive_stop = threading.Event()
        #: Rung by the keepalive thread after it set ``_key_lost`` or ``_fatal_error``: wakes the idle loop.
        self._wake = WakeEvent()
        #: ``frames`` when the heartbeat was last written: more since means a beat is due within a second.
        self._beat_frames = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def initialize(self) -> None:
        from kraite_mp.store.accounts import SecretKeyError

        try:
            self.spool = Spool(
                spool_directory(self.settings, self.account.id),
                fsync=self.cfg.spool_fsync,
                segment_bytes=self.cfg.spool_segment_bytes,
                segment_max_age_s=self.cfg.spool_segment_max_age_s,
                ack_required=True,
                max_bytes=self.cfg.spool_max_bytes,
                memory_limit=self.cfg.spool_memory_frames,
            ).open()
        except SpoolError as e:
            self._spool_failed(e)
            return
        broker = build_producer_broker(self.settings)
        acks = Acks.for_spool(broker.client, self.settings.redis_namespace, self.spool, self.account.id)
        self.sender = SpoolSender(self.spool, broker, self.log, acks)
        self.sender.start()
        try:
            self.rest = self._rest()
        except SecretKeyError as e:
            self.exit_code = self.ctx.fatal(str(e), code=exitcodes.EXIT_FATAL_CONFIG)
            return
        from kraite_mp.binance.connections import connection_budget

        self.connections = connection_budget(self.settings)
        threading.Thread(target=self._keepalive_loop, name="listenkey-keepalive", daemon=True).start()

    def loop(self) -> None:
        self._wake.clear()  # before looking at what the keepalive thread set: a later ring wakes the poll
        if self._fatal_error is not None:
            self.exit_code = self._credentials_fatal(self._fatal_error)
            return
        if self.ctx.reload.is_set():
            self.ctx.reload.clear()  # nothing to reload without reconnecting
        try:
            super().loop()
        except SpoolError as e:
            self._spool_failed(e)

    def shutdown(self) -> None:
        try:
            super().shutdown()  # drains the connection into the spool: before the sender's last drain
        except SpoolError as e:
            self._spool_failed(e)
        self._keepalive_stop.set()
        if self.rest is not None:
            self.rest.close()
        if self.spool is None:
            return
        fields = self._fields()
        self._flush_metrics(fields)
        self.ctx.beat("stopping", force=True, **fields)
        if self.sender is not None:
            self.sender.join(SENDER_DRAIN_S + 1.0)
        self.spool.close()

    def _spool_failed(self, e: SpoolError) -> None:
        self.log.error("%s", e)
        self.ctx.fail(str(e))
        self.ctx.beat("failed", force=True)  # the reason reaches the supervisor and `kraite-mp status`
        self.exit_code = exitcodes.EXIT_TEMPFAIL

    def _rest(self) -> BinanceRest:
        from kraite_mp.binance.rest import BinanceRest

        return BinanceRest.for_account(self.settings, self.account, stop=self.ctx.stop)

    def _fields(self) -> dict[str, Any]:
        last = "-" if self.last_frame_at is None else f"{int(time.monotonic() - self.last_frame_at)}s"
        backlog = self.spool.backlog if self.spool is not None else 0
        fields: dict[str, Any] = {"frames": self.frames, "last": last, "backlog": backlog}
        if self.sender is not None:
            # sent to Redis, audit not acknowledged yet (kept in the spool for a replay), and for how long
            fields["unacked"] = self.sender.unacked
            fields["ack_lag"] = f"{int(self.sender.ack_lag_s())}s"
        if self.spool is not None and (self.spool.in_memory or self.spool.memory_episodes):
            fields["spool"] = "memory" if self.spool.in_memory else "disk"  # the disk refused writes
        if self.ws is None:
            # between connections since then: the periodic sync leaves the gap to this reconnect's sweep
            # (kraite_mp.reconcile.modes.choose_mode)
            fields["dark_since"] = int(self.dark_since)
        else:
            self.ctx.fields.pop("dark_since", None)
        return fields

    def beat(self, state: str | None = None) -> None:
        fields = self._fields()
        now = time.monotonic()
        if state is not None or now - self._metrics_at >= METRICS_INTERVAL_S:
            self._metrics_at = now
            self._flush_metrics(fields)
        before = self.ctx.last_beat
        self.ctx.beat(state, **fields)
        if self.ctx.last_beat != before:
            self._beat_frames = fields["frames"]

    def beat_due_in(self, now: float) -> float:
        """Within a second of a change (frames since the last beat, frames not yet sent or acknowledged),
        else at the idle rate (``ctx.idle_beat_s``): an idle account's child sleeps that long."""
        busy = (
            self.frames != self._beat_frames
            or (self.spool is not None and self.spool.backlog > 0)
            or (self.sender is not None and self.sender.unacked > 0)
        )
        cadence = BEAT_INTERVAL_S if busy else self.ctx.idle_beat_s
        return max(0.0, self.ctx.last_beat + cadence - now)

    def wake_fds(self) -> list[int]:
        return [*super().wake_fds(), self._wake.fileno()]

    def _flush_metrics(self, fields: dict[str, Any]) -> None:
        m = series()
        if self._frame_counts:
            counts, self._frame_counts = self._frame_counts, {}
            for event, n in counts.items():
                m.USER_DATA_FRAMES.labels(self._account_label, event).inc(n)
        m.SPOOL_BACKLOG.labels(self._account_label).set(fields["backlog"])
        m.SPOOL_UNACKED.labels(self._account_label).set(fields.get("unacked", 0))

    # -- the connection hooks --------------------------------------------------------------------
    def before_connect(self) -> float:
        from kraite_mp.binance.connections import MARK_PRICE_RESERVE

        if self.connections is None:
            return 0.0
        # the mark-price stream goes first; among the accounts, the longest dark
        return self.connections.take(
            reserve=MARK_PRICE_RESERVE, who=f"user-data-{self.account.id}", dark_since=self.dark_since
        )

    def connect_url(self) -> str | None:
        from kraite_mp.binance.errors import BinanceError, InvalidCredentials, ListenKeyNotFound, RateLimited

        assert self.rest is not None
        if self._key is None or self._key_lost.is_set():
            self._key_lost.clear()
            try:
                self._key = self.rest.create_listen_key()
            except InvalidCredentials as e:
                self.exit_code = self._credentials_fatal(str(e))
                return None
            except RateLimited as e:
                raise Disconnect(Reason.RATE_LIMITED, retry_after_s=e.retry_after_s) from None
            except ListenKeyNotFound:
                self._key = None
                raise Disconnect(Reason.LISTEN_KEY_LOST) from None
            except BinanceError as e:
                raise Disconnect(Reason.LISTEN_KEY_FAILED, describe(e)) from None
            register_secret(self._key)
        return stream_url(self.settings, self._key)

    def on_connected(self) -> None:
        assert self.spool is not None
        if self.rolled_over:  # make before break: no gap, nothing to reconcile
            self.log.info("rolled over to a new connection (%s), no gap", Reason.MAX_AGE.value)
        else:
            self.log.info("connected (%s)", self.connect_reason)
            # after a reconnect the gap is known (a cheap sweep); the first connect of a child is not
            gap_start_ms = int(self.dark_since * 1000) if self.last_reason is not None else None
            self.spool.append(reconcile_record(self.account.id, self.connect_reason, gap_start_ms))
        series().USER_DATA_CONNECTED.labels(self._account_label).set(1)
        self.beat("streaming")

    def on_frame(self, data: bytes) -> bool:
        """Spool one frame (write-ahead, before anything else); note a listenKeyExpired event."""
        received_us = time.time_ns() // 1000
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        if len(text) > MAX_FRAME_CHARS:
            text = text[: MAX_FRAME_CHARS + 1]  # the job audits it as oversized
        text = scrub_text(text, (self._key,) if self._key else ())
        assert self.spool is not None
        self.spool.append(
            frame_record(
                self.cfg.queue_name,
                self.account.id,
                text,
                self.ids.for_frame(text, received_us),
                received_us / 1000,
            )
        )
        self.frames += 1
        self.last_frame_at = time.monotonic()
        event = event_type_of(text)
        self._frame_counts[event] = self._frame_counts.get(event, 0) + 1  # to the metric at the next beat
        if is_listen_key_expired(text):
            self._key_expired = True
        return True

    def check(self) -> Reason | None:
        if self._key_expired:
            self._key_expired = False
            self._key = None  # dead: the next connection needs a new one
            return Reason.LISTEN_KEY_EXPIRED
        if self._key_lost.is_set():
            return Reason.LISTEN_KEY_LOST
        return None

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        if d.reason is Reason.HANDSHAKE_REFUSED and d.status == ROUTE_UNKNOWN_STATUS:
            # the key is fine (it was just created); the URL is not: a configuration error, not a retry loop
            ws_url = self.settings.binance.ws_url
            self.exit_code = self.ctx.fatal(
                f"binance.ws_url {ws_url!r}: the server answered HTTP 404 at the handshake of"
                " /private/ws (no such route): check binance.ws_url",
                code=exitcodes.EXIT_FATAL_CONFIG,
            )
            return
        if d.reason is Reason.HANDSHAKE_REFUSED and d.status in KEY_REFUSED_STATUSES:
            self._key = None  # the server does not know the key: get another
        self.reconnects += 1
        m = series()
        m.USER_DATA_CONNECTED.labels(self._account_label).set(0)
        m.USER_DATA_RECONNECTS.labels(self._account_label, d.reason.value).inc()
        level = logging.INFO if d.planned else logging.WARNING
        self.log.log(level, "disconnected (%s); reconnecting in %s", d, self.delay_text(delay_s))

    def _credentials_fatal(self, error: str) -> int:
        error = redact(error)
        self.log.error("the exchange rejected the API key: %s", error)
        try:
            from kraite_mp.store.accounts import mark_credentials_invalid
            from kraite_mp.store.db import connect

            conn = connect(
                self.settings.database_url, application_name=f"kraite-mp user-data {self.account.id}"
            )
            try:
                mark_credentials_invalid(conn, self.account.id, error)
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 - the exit code still tells the supervisor
            self.log.warning("cannot record the invalid credentials in the database", exc_info=True)
        return self.ctx.fatal(f"invalid API credentials: {error}")

    # -- keepalive -------------------------------------------------------------------------------
    def _keepalive_loop(self) -> None:
        from kraite_mp.binance.errors import BinanceError, InvalidCredentials, ListenKeyNotFound, RateLimited

        interval = self.cfg.keepalive_interval_s
        next_at = time.monotonic() + interval
        try:
            rest = self._rest()  # its own session: BinanceRest is not thread-safe
        except Exception:  # noqa: BLE001
            self.log.exception("keepalive disabled: cannot build the REST client")
            return
        try:
            # sleeps until the next keepalive (the stop event wakes it), not in 1 s steps
            while not self._keepalive_stop.wait(
                max(0.05, min(KEEPALIVE_MAX_SLEEP_S, next_at - time.monotonic()))
            ):
                if time.monotonic() < next_at:
                    continue
                if self._key is None:
                    next_at = time.monotonic() + interval
                    continue
                try:
                    rest.keepalive_listen_key()
                    next_at = time.monotonic() + interval
                except ListenKeyNotFound:
                    self.log.info("listenKey expired (keepalive -1125): getting a new one and reconnecting")
                    self._key_lost.set()
                    self._wake.set()
                    next_at = time.monotonic() + interval
                except InvalidCredentials as e:
                    self._fatal_error = str(e)
                    self._wake.set()
                    return
                except RateLimited as e:
                    next_at = time.monotonic() + max(e.retry_after_s, 1.0)
                except BinanceError as e:
                    self.log.warning(
                        "listenKey keepalive failed (%s); retrying in %.0fs",
                        describe(e),
                        min(KEEPALIVE_RETRY_S, interval),
                    )
                    next_at = time.monotonic() + min(KEEPALIVE_RETRY_S, interval)
        finally:
            rest.close()


def run_user_data_child(ctx: ChildContext) -> int:
    """Entry point of the user-data child (called in the forked child by ``run_child``)."""
    if ctx.account is None:
        ctx.fail("user-data child started without an account")
        return exitcodes.EXIT_FATAL_CONFIG
    return UserDataStream(ctx, ctx.account).run()
