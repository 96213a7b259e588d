"""The Dramatiq side: ``dramatiq kraite_mp.jobs`` runs the workers as is.

Importing this module loads the settings (``load_settings()``: ``KRAITE_CONFIG``/etc/kraite-mp.toml
and the environment), builds the broker and sets it as Dramatiq's global broker. Tests and
benchmarks call ``build_broker(settings)`` instead: a broker of their own, with the actors declared
on it and bound to those settings.

Actors:

- ``process_user_data_event(account_id, frame, frame_id, received_at)`` on
  ``user_data_stream.queue_name`` (``user-data-stream``): one PostgreSQL transaction per frame:
  audit row first (``INSERT ... ON CONFLICT (frame_id) DO NOTHING``: a redelivered frame stops
  here), then by event type: ORDER_TRADE_UPDATE / ALGO_UPDATE whose dispatch key is in
  ``user_data_stream.binance.dispatched_executions`` -> ``orders.apply_order_update``;
  ACCOUNT_UPDATE -> balances and positions, monotonic by event time; everything else audit only.
  An empty allowlist is shadow mode: audit only. After COMMIT, ``orders.run_observers``.
  Malformed, oversized or unknown frames and frames a handler rejects are audited with their
  outcome and never retried. Only PostgreSQL being unavailable (or a deadlock) retries the message
  (``Retries`` middleware, ``jobs.max_retries``, backoff ``jobs.retry_min/max_backoff_ms``).
- ``reconcile_account_job(account_id, reason)`` on ``reconcile``: ``reconcile.reconcile_account``.

Audit outcomes (``api_data_stream.outcome``): ``dispatched`` (order update applied or found stale),
``skipped`` (dispatch key not in the allowlist), ``shadow``, ``applied`` (ACCOUNT_UPDATE),
``audited`` (audit-only event types: TRADE_LITE -- the same fill comes in ORDER_TRADE_UPDATE, so it
is never counted twice --, MARGIN_CALL, listenKeyExpired ...), ``unknown`` (event type),
``malformed`` (not JSON), ``not_object``, ``oversized``, ``invalid`` (a known event missing what its
handler needs; ``error`` says what), ``error`` (PostgreSQL refused the data).

Consumer latency (why ``KraiteRedisBroker.consume`` exists): Dramatiq's Redis consumer does not
block on Redis; when a fetch comes back empty it sleeps ``compute_backoff(misses, factor=5 ms,
max_backoff=timeout)`` (dramatiq/brokers/redis.py ``_RedisConsumer.__next__``), which grows to between
half and all of ``timeout`` -- and the Worker passes its ``worker_timeout`` (default 1000 ms, env
``dramatiq_worker_timeout``; the ``dramatiq`` CLI has no flag for it) as that timeout. A user-data
consumer is idle most of the time, so a frame waited up to a second before its job started: measured
with bench/user_data_latency.py (10 accounts, 20 steps/s) received -> job started p50 14.4 ms / p99
64 ms (and up to a second on a quieter stream). ``KraiteRedisBroker`` caps the idle sleep of the
user-data queue at ``jobs.idle_poll_ms`` (the other queues keep the Worker's timeout):

============  ======================  ==============  =============================================
cap (ms)      job started p50 / p99   order row p99   idle cost per worker process (CPU; Redis CPU)
============  ======================  ==============  =============================================
1000          14.4 / 64.1 ms          67.3 ms         0.2 %; 0.1 %
10            4.9 / 10.3 ms           15.2 ms         4.5 %; 1.1 %
5 (default)   3.1 / 6.9 ms            11.7 ms         5.5 %; 1.3 %
2             1.7 / 4.7 ms            9.1 ms          13.0 %; 3.1 %
============  ======================  ==============  =============================================

(one 2-CPU machine shared with the simulator, the children, PostgreSQL and Redis; below 5 ms the
idle cost grows faster than the end-to-end latency falls). The worker threads'
``worker_timeout`` only bounds their wait on the in-process work queue (they wake at once when work
arrives), so it adds no latency and is left alone.

Deployment: run reconciliation on its own worker pool (``dramatiq kraite_mp.jobs --queues reconcile``
next to ``dramatiq kraite_mp.jobs --queues user-data-stream``): a reconciliation may sleep out Binance's
request-weight limit for up to a minute, and must not hold the threads that process frames.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import dramatiq
import psycopg2
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries, default_middleware

from kraite_mp.binance import user as events
from kraite_mp.config import Settings, load_settings
from kraite_mp.logs import redact
from kraite_mp.messages import (
    PROCESS_ACTOR,
    RECONCILE_ACTOR,
    RECONCILE_QUEUE,
    broker_namespace,
    redis_client,
)
from kraite_mp.store import orders
from kraite_mp.store.db import DatabaseUnavailable, connect

log = logging.getLogger(__name__)

#: psycopg2 errors after which the message is retried: the server is gone, or a deadlock.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    DatabaseUnavailable,
)
#: Error text stored in an audit row (characters).
MAX_ERROR_CHARS = 500

_AUDIT_INSERT = (
    "INSERT INTO api_data_stream (frame_id, account_id, source, event_type, event_time_ms, payload, raw_text,"
    " received_at, outcome, error) VALUES (%s, %s, 'ws', %s, %s, %s::jsonb, %s, %s, %s, %s)"
    " ON CONFLICT (frame_id) DO NOTHING RETURNING id"
)
# monotonic by event time: an older ACCOUNT_UPDATE processed late changes nothing
_BALANCE_UPSERT = (
    "INSERT INTO account_balances AS b (account_id, asset, wallet_balance, cross_wallet_balance, balance_change,"
    " event_time_ms) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, asset) DO UPDATE SET wallet_balance = EXCLUDED.wallet_balance,"
    " cross_wallet_balance = EXCLUDED.cross_wallet_balance, balance_change = EXCLUDED.balance_change,"
    " event_time_ms = EXCLUDED.event_time_ms, updated_at = now()"
    " WHERE EXCLUDED.event_time_ms >= b.event_time_ms"
)
_POSITION_UPSERT = (
    "INSERT INTO account_positions AS p (account_id, symbol, position_side, amount, entry_price, breakeven_price,"
    " unrealized_pnl, margin_type, isolated_wallet, event_time_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, symbol, position_side) DO UPDATE SET amount = EXCLUDED.amount,"
    " entry_price = EXCLUDED.entry_price, breakeven_price = EXCLUDED.breakeven_price,"
    " unrealized_pnl = EXCLUDED.unrealized_pnl, margin_type = EXCLUDED.margin_type,"
    " isolated_wallet = EXCLUDED.isolated_wallet, event_time_ms = EXCLUDED.event_time_ms, updated_at = now()"
    " WHERE EXCLUDED.event_time_ms >= p.event_time_ms"
)


class KraiteRedisBroker(RedisBroker):
    """RedisBroker whose latency-sensitive queues poll Redis at most ``idle_poll_ms`` apart when idle."""

    def __init__(self, *, idle_poll_ms: int, fast_queues: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_poll_ms = idle_poll_ms
        self.fast_queues = fast_queues

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        if queue_name in self.fast_queues:
            timeout = min(timeout, self.idle_poll_ms)
        return super().consume(queue_name, prefetch, timeout)


# -- the work ---------------------------------------------------------------------------------------


class Outcome:
    """What the job decided for one frame: the audit outcome and the work to do in the transaction."""

    __slots__ = ("outcome", "error", "order", "balances", "positions", "transitions")

    def __init__(self, outcome: str, error: str | None = None, *, order: orders.OrderState | None = None,
                 balances: list[tuple[Any, ...]] | None = None, positions: list[tuple[Any, ...]] | None = None) -> None:
        self.outcome = outcome
        self.error = error
        self.order = order
        self.balances = balances or []
        self.positions = positions or []
        #: Filled by ``apply_outcome``: committed status changes for the observers.
        self.transitions: list[orders.Transition] = []


def _received_at(value: Any) -> datetime:
    """``received_at`` as sent by the child (epoch ms, int or float) or an ISO string; else now."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000.0, tz=UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return datetime.now(tz=UTC)


def _dec(value: Any, name: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, float):
        raise orders.FrameError(f"{name}: float value, expected a decimal string")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise orders.FrameError(f"{name}: not a decimal: {str(value)[:40]!r}") from None
    if not d.is_finite():
        raise orders.FrameError(f"{name}: not finite")
    return d


def _str(row: Mapping[str, Any], key: str, name: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise orders.FrameError(f"{name}: missing")
    return value


def account_update_rows(account_id: int, payload: Mapping[str, Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(balance rows, position rows) of an ACCOUNT_UPDATE; FrameError when it is not one."""
    e_time = events.event_time(payload.get("E"))
    if e_time is None:
        raise orders.FrameError("E: missing event time")
    a = payload.get("a")
    if not isinstance(a, Mapping):
        raise orders.FrameError("a: missing update object")
    balances, positions = [], []
    for i, b in enumerate(a.get("B") or []):
        if not isinstance(b, Mapping):
            raise orders.FrameError(f"a.B[{i}]: not an object")
        balances.append((account_id, _str(b, "a", f"a.B[{i}].a"), _dec(b.get("wb"), f"a.B[{i}].wb"),
                         _dec(b.get("cw"), f"a.B[{i}].cw"), _dec(b.get("bc"), f"a.B[{i}].bc"), e_time))
    for i, p in enumerate(a.get("P") or []):
        if not isinstance(p, Mapping):
            raise orders.FrameError(f"a.P[{i}]: not an object")
        positions.append((
            account_id, _str(p, "s", f"a.P[{i}].s"), p.get("ps") if isinstance(p.get("ps"), str) else "BOTH",
            _dec(p.get("pa"), f"a.P[{i}].pa"), _dec(p.get("ep"), f"a.P[{i}].ep"), _dec(p.get("bep"), f"a.P[{i}].bep"),
            _dec(p.get("up"), f"a.P[{i}].up"), p.get("mt") if isinstance(p.get("mt"), str) else None,
            _dec(p.get("iw"), f"a.P[{i}].iw"), e_time,
        ))
    return balances, positions


def decide(settings: Settings, account_id: int, parsed: events.ParsedFrame) -> Outcome:
    """The outcome of a frame and the rows it changes, decided before any SQL (pure)."""
    if parsed.kind != "event":
        return Outcome(parsed.kind, parsed.error)
    if not parsed.known:
        return Outcome("unknown", f"unknown event type {parsed.event_type!r}")
    allowlist = settings.user_data_stream.binance.dispatched_executions
    event_type = parsed.event_type
    payload = parsed.payload
    if event_type in (events.ORDER_TRADE_UPDATE, events.ALGO_UPDATE):
        if not allowlist:
            return Outcome("shadow")
        key = orders.dispatch_key(payload)
        if key is None:
            return Outcome("invalid", "no dispatch key (o.x / o.X missing)")
        if key not in allowlist:
            return Outcome("skipped", f"{key} is not dispatched")
        try:
            if event_type == events.ORDER_TRADE_UPDATE:
                state = orders.order_from_ws(account_id, payload)
            else:
                state = orders.algo_from_ws(account_id, payload)
        except orders.FrameError as e:
            return Outcome("invalid", str(e))
        return Outcome("dispatched", order=state)
    if event_type == events.ACCOUNT_UPDATE:
        if not allowlist:
            return Outcome("shadow")
        try:
            balances, positions = account_update_rows(account_id, payload)
        except orders.FrameError as e:
            return Outcome("invalid", str(e))
        return Outcome("applied", balances=balances, positions=positions)
    # TRADE_LITE (its fill is counted from ORDER_TRADE_UPDATE), MARGIN_CALL, listenKeyExpired, ...
    return Outcome("audited")


def apply_outcome(cur: Any, outcome: Outcome, frame_id: str) -> None:
    """The row changes of ``outcome``, inside the audit's transaction."""
    if outcome.order is not None:
        transition = orders.apply_order_update(cur, outcome.order, frame_id=frame_id)
        if transition is not None:
            outcome.transitions.append(transition)
    if outcome.balances:
        cur.executemany(_BALANCE_UPSERT, outcome.balances)
    if outcome.positions:
        cur.executemany(_POSITION_UPSERT, outcome.positions)


class JobRunner:
    """The actors' work, bound to one Settings; one PostgreSQL connection per worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    # -- connections -----------------------------------------------------------------------------
    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.settings.database_url, application_name="kraite-mp worker")
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _retry(self, what: str, e: BaseException) -> dramatiq.Retry:
        self._drop_connection()
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("%s: PostgreSQL unavailable (%s); the message will be retried", what, redact(text)[:200])
        return dramatiq.Retry(f"PostgreSQL unavailable: {type(e).__name__}")

    # -- process_user_data_event -----------------------------------------------------------------
    def process_user_data_event(self, account_id: int, frame: str, frame_id: str, received_at: Any = None) -> str:
        """Audit + dispatch one frame; returns the outcome (``duplicate`` when already audited)."""
        if not isinstance(frame, str):
            frame = str(frame)
        try:
            frame.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (only a hand-made message has them): PostgreSQL refuses
            frame = frame.encode("utf-8", "replace").decode("utf-8")
        frame_id = str(frame_id)[:200]
        parsed = events.parse_frame(frame)
        received = _received_at(received_at)
        try:
            conn = self._connection()
        except DatabaseUnavailable as e:
            raise self._retry(f"frame {frame_id}", e) from None
        try:
            result = self._transaction(conn, account_id, frame_id, parsed, received)
        except TRANSIENT_DB_ERRORS as e:
            raise self._retry(f"frame {frame_id}", e) from None
        except Exception as e:  # noqa: BLE001 - bad data (or a bug): audit it, never retry forever
            self._rollback(conn)
            error = redact(f"{type(e).__name__}: {str(e).strip()}")[:MAX_ERROR_CHARS]
            if not isinstance(e, psycopg2.Error):
                log.exception("frame %s (account %s, %s): handler failed", frame_id, account_id, parsed.event_type)
            else:
                log.error("frame %s (account %s, %s): PostgreSQL refused it: %s", frame_id, account_id,
                          parsed.event_type, error)
            try:
                result = self._audit_failure(conn, account_id, frame_id, parsed, received, error)
            except TRANSIENT_DB_ERRORS as e2:
                raise self._retry(f"frame {frame_id}", e2) from None
        if result.transitions:
            orders.run_observers(self.settings, result.transitions)
        return result.outcome

    @staticmethod
    def _rollback(conn: Any) -> None:
        try:
            conn.rollback()
        except psycopg2.Error:
            pass

    def _transaction(self, conn: Any, account_id: int, frame_id: str, parsed: events.ParsedFrame,
                     received: datetime) -> Outcome:
        result = decide(self.settings, account_id, parsed)
        try:
            with conn.cursor() as cur:
                # the audit row is the idempotency barrier: a second delivery of the frame stops here
                # (a concurrent one waits on the unique index until the first commits)
                cur.execute(_AUDIT_INSERT, (
                    frame_id, account_id, parsed.event_type, parsed.event_time_ms, parsed.payload_text,
                    parsed.raw_text, received, result.outcome, result.error,
                ))
                if cur.fetchone() is None:
                    conn.rollback()
                    return Outcome("duplicate")
                apply_outcome(cur, result, frame_id)
            conn.commit()
            return result
        except BaseException:
            self._rollback(conn)
            raise

    def _audit_failure(self, conn: Any, account_id: int, frame_id: str, parsed: events.ParsedFrame,
                       received: datetime, error: str) -> Outcome:
        """Audit a frame whose processing failed for good: with its payload if PostgreSQL takes it, else raw."""
        attempts: list[tuple[str | None, str | None]] = []
        if parsed.payload_text is not None:
            attempts.append((parsed.payload_text, None))
        raw = parsed.raw_text
        if raw is None and parsed.payload_text is not None:
            raw = parsed.payload_text[: events.MAX_RAW_TEXT_CHARS]
        attempts.append((None, (raw or "").replace("\x00", "\\u0000")))
        for payload_text, raw_text in attempts:
            try:
                with conn.cursor() as cur:
                    cur.execute(_AUDIT_INSERT, (
                        frame_id, account_id, parsed.event_type, parsed.event_time_ms, payload_text, raw_text,
                        received, "error", error,
                    ))
                conn.commit()
                return Outcome("error", error)
            except TRANSIENT_DB_ERRORS:
                self._rollback(conn)
                raise
            except Exception:  # noqa: BLE001 - try the next, plainer form
                self._rollback(conn)
        log.error("frame %s (account %s): cannot be audited at all", frame_id, account_id)
        return Outcome("error", error)

    # -- reconcile_account_job -------------------------------------------------------------------
    def reconcile_account_job(self, account_id: int, reason: str = "") -> dict[str, Any] | None:
        """REST reconciliation of one account after a (re)connect (``reconcile.reconcile_account``).

        It reports exchange trouble in its result instead of raising: a 429/418 retries the message
        once Binance may be called again, a network error retries with the usual backoff, invalid
        credentials (already recorded by it) and other errors end here. PostgreSQL down retries.
        """
        from kraite_mp.store.accounts import get_account

        try:
            from kraite_mp import reconcile
        except ImportError as e:
            log.error("reconcile of account %s (%s) skipped: %s", account_id, reason, e)
            return None
        try:
            conn = self._connection()
            account = get_account(conn, account_id)
        except TRANSIENT_DB_ERRORS as e:
            raise self._retry(f"reconcile of account {account_id}", e) from None
        if account is None or not account.is_active:
            log.info("reconcile of account %s (%s) skipped: no such active account", account_id, reason)
            return None
        try:
            result: dict[str, Any] = reconcile.reconcile_account(conn, self.settings, account)
        except TRANSIENT_DB_ERRORS as e:
            raise self._retry(f"reconcile of account {account_id}", e) from None
        status = result.get("status")
        if status == "rate_limited":
            delay_s = max(float(result.get("retry_after_s") or 60.0), 1.0)
            log.warning("reconcile of account %s (%s): rate limited, retrying in %.0fs", account_id, reason, delay_s)
            raise dramatiq.Retry("rate limited", delay=int(delay_s * 1000))
        if status == "transient":
            log.warning("reconcile of account %s (%s): %s; will retry", account_id, reason, result.get("error"))
            raise dramatiq.Retry("exchange unreachable")
        if status != "ok":
            log.error("reconcile of account %s (%s) ended with %s: %s", account_id, reason, status,
                      result.get("error"))
        else:
            log.info("reconciled account %s (%s): checked %s, updated %s", account_id, reason,
                     result.get("checked"), result.get("updated"))
        return result


# -- broker -----------------------------------------------------------------------------------------


def build_broker(settings: Settings, *, middleware: list[Any] | None = None) -> KraiteRedisBroker:
    """A Redis broker from ``settings`` with both actors declared on it (bound to ``settings``).

    ``middleware`` replaces Dramatiq's defaults; by default they are kept, with ``Retries`` set from
    ``settings.jobs``.
    """
    jobs = settings.jobs
    if middleware is None:
        middleware = [m() for m in default_middleware if m is not Retries]
        middleware.append(Retries(max_retries=jobs.max_retries, min_backoff=jobs.retry_min_backoff_ms,
                                  max_backoff=jobs.retry_max_backoff_ms))
    broker = KraiteRedisBroker(
        idle_poll_ms=jobs.idle_poll_ms,
        fast_queues=frozenset({settings.user_data_stream.queue_name}),
        client=redis_client(settings.redis_url),
        namespace=broker_namespace(settings),
        middleware=middleware,
    )
    runner = JobRunner(settings)

    # actors return None: Dramatiq warns about discarded results otherwise
    def process_user_data_event(account_id: int, frame: str, frame_id: str, received_at: Any = None) -> None:
        runner.process_user_data_event(account_id, frame, frame_id, received_at)

    def reconcile_account_job(account_id: int, reason: str = "") -> None:
        runner.reconcile_account_job(account_id, reason)

    dramatiq.actor(actor_name=PROCESS_ACTOR, queue_name=settings.user_data_stream.queue_name,
                   broker=broker)(process_user_data_event)
    dramatiq.actor(actor_name=RECONCILE_ACTOR, queue_name=RECONCILE_QUEUE, broker=broker)(reconcile_account_job)
    broker.runner = runner  # type: ignore[attr-defined]
    return broker


class _RedactFilter(logging.Filter):
    """Scrub secrets from records of any logger (Dramatiq logs failed messages with their arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Add the redaction filter to every root handler (the ``dramatiq`` CLI configures its own)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactFilter) for f in handler.filters):
            handler.addFilter(_RedactFilter())


settings = load_settings()
broker = build_broker(settings)
dramatiq.set_broker(broker)
install_log_redaction()
process_user_data_event = broker.get_actor(PROCESS_ACTOR)
reconcile_account_job = broker.get_actor(RECONCILE_ACTOR)
