"""The user-data child: one account's Binance USD-M user-data stream -> durable spool -> Dramatiq.

Threads (all started after the fork, by ``run_user_data_child``):

- **main** (receive): listenKey POST, WebSocket connect to
  ``<ws_url>/private/ws?listenKey=<key>&events=A/B/...``, receive loop with client pings, pong
  timeout and a silence watchdog. Every frame is scrubbed of the listenKey and written to the
  spool (write-ahead) before anything else; that is all the receive path does, so neither a slow
  Redis nor a dead one can delay receiving or answering server pings.
- **sender**: reads the spool in order and enqueues each record to Redis (``process_user_data_event``
  on ``user_data_stream.queue_name``, ``reconcile_account_job`` on ``reconcile``); advances the
  spool cursor after each batch. Redis down: it retries with a capped backoff while the backlog
  grows on disk; the process title shows ``backlog=N``.
- **keepalive**: ``PUT /fapi/v1/listenKey`` every ``keepalive_interval_s``. -1125 makes the main
  loop get a new key and reconnect; -2015 makes the child exit FATAL.

Reconnects: the server closing, a pong timeout or silence, ``max_connection_age_s``, a
``listenKeyExpired`` frame (new key first) or a lost key. Unplanned ones back off with
``kraite_mp.backoff`` (reset after a connection stayed up ``supervisor.healthy_after_s``). After every
(re)connect a REST reconciliation of the account is requested (frames in the gap are lost); the
request goes through the spool like a frame, so it is not lost while Redis is down either.

Secrets: the listenKey is registered for log redaction, never logged, never in the title, and the
URL that carries it is never logged or put in an exception message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import dramatiq
import redis
import websocket
from dramatiq.brokers.redis import RedisBroker

from kraite_mp import exitcodes
from kraite_mp.backoff import backoff_delay
from kraite_mp.binance.user import MAX_FRAME_CHARS, is_listen_key_expired, scrub_text
from kraite_mp.logs import redact, register_secret
from kraite_mp.messages import FrameIds, build_producer_broker, frame_record, reconcile_record, record_message
from kraite_mp.streams.spool import Spool, SpoolError, SpoolRecord

if TYPE_CHECKING:
    from kraite_mp.binance.rest import BinanceRest
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account
    from kraite_mp.supervisor.context import ChildContext

#: WebSocket handshake timeout.
WS_CONNECT_TIMEOUT_S = 10.0
#: Longest blocking receive: how often the loop checks stop, pings and the watchdog.
RECV_POLL_S = 1.0
#: Records the sender takes from the spool at once.
SEND_BATCH = 256
#: Sender retry delay while Redis is unreachable: 0.25 s doubling up to this.
SENDER_MAX_RETRY_S = 5.0
#: Log the Redis outage (with the backlog) at most this often.
BACKLOG_LOG_INTERVAL_S = 10.0
#: On stop, the sender may keep sending what is spooled for this long; the rest waits for the next run.
SENDER_DRAIN_S = 5.0
#: After a failed keepalive (network, 5xx), retry this soon.
KEEPALIVE_RETRY_S = 60.0

#: Reconnect reasons that are part of normal life: reconnect at once (if the connection was healthy).
PLANNED_RECONNECTS = frozenset({"max-connection-age", "listenKeyExpired", "listen-key-lost"})


def stream_url(settings: Settings, listen_key: str) -> str:
    """The user-data URL; it holds the listenKey: never log it."""
    events = "/".join(settings.user_data_stream.events)
    return f"{settings.binance.ws_url.rstrip('/')}/private/ws?listenKey={listen_key}&events={events}"


def spool_directory(settings: Settings, account_id: int) -> str:
    return os.path.join(settings.user_data_stream.spool_dir, str(account_id))


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return redact(f"{type(e).__name__}: {text}"[:300])


class _Reconnect(Exception):
    """Leave the receive loop; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the sender thread ------------------------------------------------------------------------------


class SpoolSender:
    """Drains the spool to Redis in order; never loses a record, never blocks the writer."""

    def __init__(self, spool: Spool, broker: RedisBroker, log: logging.Logger) -> None:
        self.spool = spool
        self.broker = broker
        self.log = log
        self.stop = threading.Event()
        self.redis_ok = True
        self.sent = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="spool-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[SpoolRecord] = []
        failures = 0
        last_log = 0.0
        drain_deadline: float | None = None
        while True:
            if self.stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + SENDER_DRAIN_S
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                break
            if not pending:
                try:
                    pending = self.spool.read(SEND_BATCH, timeout=0.2 if self.stop.is_set() else 0.5)
                except OSError:
                    self.log.exception("cannot read the spool")
                    if self.stop.wait(1.0):
                        break
                    continue
                if not pending:
                    if self.stop.is_set():
                        break
                    continue
            done = 0
            try:
                for rec in pending:
                    self._send(rec)
                    done += 1
            except (redis.RedisError, dramatiq.errors.DramatiqError, OSError) as e:
                if done:
                    self.spool.commit(pending[done - 1], done)
                    pending = pending[done:]
                failures += 1
                now = time.monotonic()
                if self.redis_ok or now - last_log >= BACKLOG_LOG_INTERVAL_S:
                    self.log.warning("Redis unavailable (%s): frames stay spooled, backlog=%d",
                                     _describe(e), self.spool.backlog)
                    last_log = now
                self.redis_ok = False
                if self.stop.is_set():
                    break  # what is left is sent by the next run
                self.stop.wait(min(SENDER_MAX_RETRY_S, 0.25 * 2 ** min(failures - 1, 5)))
                continue
            self.spool.commit(pending[-1], len(pending))
            pending = []
            if not self.redis_ok:
                self.log.warning("Redis is back: spooled frames sent, backlog=%d", self.spool.backlog)
                self.redis_ok = True
            failures = 0

    def _send(self, rec: SpoolRecord) -> None:
        try:
            message = record_message(rec.data)
        except ValueError:
            self.skipped += 1
            self.log.error("skipping an unreadable spool record (%d bytes)", len(rec.data))
            return
        self.broker.enqueue(message)
        self.sent += 1


# -- the child --------------------------------------------------------------------------------------


class UserDataStream:
    """One account's stream; ``run()`` returns the exit code."""

    def __init__(self, ctx: ChildContext, account: Account) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.account = account
        self.cfg = ctx.settings.user_data_stream
        self.log = logging.getLogger(f"{__name__}.account{account.id}")
        self.ids = FrameIds(account.id)
        self.frames = 0
        self.last_frame_at: float | None = None
        self._key: str | None = None
        self._key_lost = threading.Event()
        self._fatal_error: str | None = None
        self._keepalive_stop = threading.Event()
        self.spool: Spool | None = None
        self.sender: SpoolSender | None = None
        self.reconnects = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        from kraite_mp.store.accounts import SecretKeyError

        try:
            self.spool = Spool(spool_directory(self.settings, self.account.id), fsync=self.cfg.spool_fsync).open()
        except SpoolError as e:
            self.log.error("%s", e)
            self.ctx.fail(str(e))
            return exitcodes.EXIT_TEMPFAIL
        try:
            self.sender = SpoolSender(self.spool, build_producer_broker(self.settings), self.log)
            self.sender.start()
            try:
                rest = self._rest()
            except SecretKeyError as e:
                return self.ctx.fatal(str(e), code=exitcodes.EXIT_FATAL_CONFIG)
            keepalive = threading.Thread(target=self._keepalive_loop, name="listenkey-keepalive", daemon=True)
            keepalive.start()
            try:
                return self._connect_loop(rest)
            finally:
                self._keepalive_stop.set()
                rest.close()
        except SpoolError as e:
            self.log.error("%s", e)
            self.ctx.fail(str(e))
            return exitcodes.EXIT_TEMPFAIL
        finally:
            self.ctx.beat("stopping", force=True, **self._fields())
            if self.sender is not None:
                self.sender.join(SENDER_DRAIN_S + 1.0)
            self.spool.close()

    def _rest(self) -> BinanceRest:
        from kraite_mp.binance.rest import BinanceRest

        return BinanceRest.for_account(self.settings, self.account, stop=self.ctx.stop)

    def _fields(self) -> dict[str, Any]:
        last = "-" if self.last_frame_at is None else f"{int(time.monotonic() - self.last_frame_at)}s"
        backlog = self.spool.backlog if self.spool is not None else 0
        return {"frames": self.frames, "last": last, "backlog": backlog}

    def beat(self, state: str | None = None) -> None:
        self.ctx.beat(state, **self._fields())

    # -- connect / reconnect ---------------------------------------------------------------------
    def _connect_loop(self, rest: BinanceRest) -> int:
        from kraite_mp.binance.rest import BinanceError, InvalidCredentials, ListenKeyNotFound, RateLimited

        sup = self.settings.supervisor
        attempt = 0
        reason = "connect"
        while not self.ctx.stop.is_set():
            connected_at: float | None = None
            floor_s = 0.0
            ws: websocket.WebSocket | None = None
            try:
                if self._key is None or self._key_lost.is_set():
                    self._key_lost.clear()
                    self.beat("connecting")
                    self._key = rest.create_listen_key()
                    register_secret(self._key)
                self.beat("connecting")
                ws = self._open(self._key)
                connected_at = time.monotonic()
                self.log.info("connected (%s)", reason)
                self._request_reconcile(reason)
                self.beat("streaming")
                why = self._receive(ws, connected_at)
            except InvalidCredentials as e:
                return self._credentials_fatal(str(e))
            except RateLimited as e:
                why, floor_s = "rate-limited", e.retry_after_s
            except ListenKeyNotFound:
                why, self._key = "listen-key-lost", None
            except BinanceError as e:
                why = f"listenKey request failed ({_describe(e)})"
            except websocket.WebSocketBadStatusException as e:
                # 400 = the server does not know the key (expired between POST and connect): get another
                why = f"handshake refused (HTTP {e.status_code})"
                if e.status_code in (400, 401, 403, 404, 410):
                    self._key = None
            except (websocket.WebSocketException, OSError) as e:
                why = f"connection failed ({_describe(e)})"
            finally:
                if ws is not None:
                    self._close(ws)
            if self.ctx.stop.is_set():
                break
            if self._fatal_error is not None:
                return self._credentials_fatal(self._fatal_error)
            healthy = connected_at is not None and time.monotonic() - connected_at >= sup.healthy_after_s
            planned = why in PLANNED_RECONNECTS
            if healthy:
                attempt = 0
            delay = 0.0 if planned and attempt == 0 else backoff_delay(
                attempt, base_s=sup.backoff_base_s, cap_exponent=sup.backoff_cap_exponent,
                jitter_ratio=sup.backoff_jitter_ratio)
            delay = max(delay, floor_s)
            if not (planned and healthy):
                attempt += 1
            self.reconnects += 1
            level = logging.INFO if planned else logging.WARNING
            self.log.log(level, "disconnected (%s); reconnecting in %.1fs", why, delay)
            reason = f"reconnect:{why.split(' ')[0]}"
            if delay > 0:
                self.beat("backoff")
                if self.ctx.stop.wait(delay):
                    break
        return exitcodes.EXIT_OK

    def _open(self, key: str) -> websocket.WebSocket:
        try:
            ws = websocket.create_connection(
                stream_url(self.settings, key),
                timeout=WS_CONNECT_TIMEOUT_S,
                skip_utf8_validation=True,
                enable_multithread=True,
            )
        except websocket.WebSocketBadStatusException:
            raise
        except (websocket.WebSocketException, OSError) as e:
            # library messages may quote the URL: pass on the type and a redacted first line only
            raise websocket.WebSocketException(_describe(e)) from None
        ws.settimeout(self._recv_poll_s())
        return ws

    def _recv_poll_s(self) -> float:
        return max(0.05, min(RECV_POLL_S, self.cfg.ping_interval_s / 2, self.cfg.pong_timeout_s / 2))

    @staticmethod
    def _close(ws: websocket.WebSocket) -> None:
        try:
            ws.settimeout(1.0)
            ws.close(timeout=1.0)
        except Exception:  # noqa: BLE001 - closing a dead socket may fail in many ways
            try:
                ws.shutdown()
            except Exception:  # noqa: BLE001
                pass

    def _credentials_fatal(self, error: str) -> int:
        error = redact(error)
        self.log.error("the exchange rejected the API key: %s", error)
        try:
            from kraite_mp.store.accounts import mark_credentials_invalid
            from kraite_mp.store.db import connect

            conn = connect(self.settings.database_url, application_name=f"kraite-mp user-data {self.account.id}")
            try:
                mark_credentials_invalid(conn, self.account.id, error)
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 - the exit code still tells the supervisor
            self.log.warning("cannot record the invalid credentials in the database", exc_info=True)
        return self.ctx.fatal(f"invalid API credentials: {error}")

    def _request_reconcile(self, reason: str) -> None:
        assert self.spool is not None
        self.spool.append(reconcile_record(self.account.id, reason))

    # -- receive ---------------------------------------------------------------------------------
    def _receive(self, ws: websocket.WebSocket, connected_at: float) -> str:
        """Receive until something asks for a reconnect; return why."""
        cfg = self.cfg
        last_rx = time.monotonic()
        ping_due = last_rx + cfg.ping_interval_s
        ping_sent_at: float | None = None
        ping_payload = b""
        pings = 0
        while True:
            if self.ctx.stop.is_set():
                return "stop"
            if self._fatal_error is not None:
                return "credentials rejected"
            if self._key_lost.is_set():
                return "listen-key-lost"
            if self.ctx.reload.is_set():
                self.ctx.reload.clear()  # nothing to reload without reconnecting
            now = time.monotonic()
            if now - connected_at >= cfg.max_connection_age_s:
                return "max-connection-age"
            if ping_sent_at is not None and now - ping_sent_at > cfg.pong_timeout_s:
                return f"pong-timeout after {cfg.pong_timeout_s:g}s"
            if now - last_rx > cfg.ping_interval_s + cfg.pong_timeout_s:
                return "watchdog: silent connection"
            try:
                if ping_sent_at is None and now >= ping_due:
                    pings += 1
                    ping_payload = str(pings).encode()
                    ws.ping(ping_payload)
                    ping_sent_at = now
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                self.beat()
                continue
            except (websocket.WebSocketConnectionClosedException, OSError) as e:
                return f"connection lost ({_describe(e)})"
            except websocket.WebSocketException as e:
                return f"protocol error ({_describe(e)})"
            last_rx = time.monotonic()
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                if self._on_frame(frame.data):
                    self._key = None  # dead: the next connection needs a new one
                    return "listenKeyExpired"
            elif opcode == websocket.ABNF.OPCODE_PONG:
                if ping_sent_at is not None and frame.data == ping_payload:
                    ping_sent_at = None
                    ping_due = last_rx + cfg.ping_interval_s
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "server closed the connection"
            self.beat("streaming")

    def _on_frame(self, data: bytes | str) -> bool:
        """Spool one frame; return True if it is a listenKeyExpired event."""
        received_us = time.time_ns() // 1000
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        if len(text) > MAX_FRAME_CHARS:
            text = text[: MAX_FRAME_CHARS + 1]  # the job audits it as oversized
        text = scrub_text(text, (self._key,) if self._key else ())
        assert self.spool is not None
        self.spool.append(
            frame_record(self.cfg.queue_name, self.account.id, text, self.ids.next(received_us), received_us / 1000)
        )
        self.frames += 1
        self.last_frame_at = time.monotonic()
        return is_listen_key_expired(text)

    # -- keepalive -------------------------------------------------------------------------------
    def _keepalive_loop(self) -> None:
        from kraite_mp.binance.rest import BinanceError, InvalidCredentials, ListenKeyNotFound, RateLimited

        interval = self.cfg.keepalive_interval_s
        next_at = time.monotonic() + interval
        try:
            rest = self._rest()  # its own session: BinanceRest is not thread-safe
        except Exception:  # noqa: BLE001
            self.log.exception("keepalive disabled: cannot build the REST client")
            return
        try:
            while not self._keepalive_stop.wait(max(0.05, min(1.0, next_at - time.monotonic()))):
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
                    next_at = time.monotonic() + interval
                except InvalidCredentials as e:
                    self._fatal_error = str(e)
                    return
                except RateLimited as e:
                    next_at = time.monotonic() + max(e.retry_after_s, 1.0)
                except BinanceError as e:
                    self.log.warning("listenKey keepalive failed (%s); retrying in %.0fs", _describe(e),
                                     min(KEEPALIVE_RETRY_S, interval))
                    next_at = time.monotonic() + min(KEEPALIVE_RETRY_S, interval)
        finally:
            rest.close()


def run_user_data_child(ctx: ChildContext) -> int:
    """Entry point of the user-data child (called in the forked child by ``child.run_child``)."""
    if ctx.account is None:
        ctx.fail("user-data child started without an account")
        return exitcodes.EXIT_FATAL_CONFIG
    return UserDataStream(ctx, ctx.account).run()
