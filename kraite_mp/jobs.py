"""The Dramatiq side: ``dramatiq kraite_mp.jobs`` runs the workers as is.

Importing this module loads the settings, builds the Redis broker (``kraite_mp.broker``) with both actors
and sets it as Dramatiq's global broker; tests build their own (``build_broker``, or ``declare_actors`` on
a StubBroker). ``process_user_data_event`` audits a frame and applies what ``store.dispatch.decide`` chose
for it, in one PostgreSQL transaction; ``reconcile_account_job`` runs ``kraite_mp.reconcile``. Only
PostgreSQL being down (or a deadlock), a 429/418 and network trouble retry a message; bad data is audited
once. Run reconciliation on its own worker pool (``--queues reconcile``): it may sleep out Binance's
request-weight limit for up to a minute, and must not hold the threads that process frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dramatiq
import psycopg2
from dramatiq.middleware import Middleware, Retries, default_middleware

from kraite_mp.binance import user
from kraite_mp.binance.fields import received_at as parse_received_at
from kraite_mp.binance.user import UserEvent
from kraite_mp.broker import KraiteRedisBroker, WorkerHeartbeat
from kraite_mp.config import Settings
from kraite_mp.config.load import load_settings
from kraite_mp.logs import adopt_handlers, describe_error, install_log_redaction, redact, startup_summary
from kraite_mp.messages import (
    PROCESS_ACTOR,
    RECONCILE_ACTOR,
    RECONCILE_QUEUE,
    acknowledge,
    broker_namespace,
    redis_client,
)
from kraite_mp.metrics import series
from kraite_mp.observers import run_observers
from kraite_mp.reconcile import background
from kraite_mp.reconcile.modes import mode_for_gap
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.reconcile.sweep import reconcile_account
from kraite_mp.store import audit
from kraite_mp.store.accounts import get_account
from kraite_mp.store.db import TripCursor, connect, end_transaction, is_transient
from kraite_mp.store.dispatch import AuditOutcome, Outcome, apply_outcome, decide
from kraite_mp.store.orders import Transition

log = logging.getLogger(__name__)

#: Error text stored in an audit row (characters).
MAX_ERROR_CHARS = 500
#: Frame ids longer than this (characters) are cut: only a hand-made message has one.
MAX_FRAME_ID_CHARS = 200
#: Retry delay after a 429/418 whose result names no Retry-After (seconds) ...
DEFAULT_RATE_LIMIT_DELAY_S = 60.0
#: ... and the shortest one ever asked of Dramatiq (seconds).
MIN_RATE_LIMIT_DELAY_S = 1.0


def finish_reconcile(account_id: int, reason: str, result: ReconcileResult) -> None:
    """Log how a reconcile job ended; raise ``dramatiq.Retry`` when the exchange said "later".

    A 429/418 retries once Binance may be called again, a network error with the usual backoff;
    invalid credentials (already recorded) and other errors end here.
    """
    if result.status is ReconcileStatus.RATE_LIMITED:
        delay_s = max(float(result.retry_after_s or DEFAULT_RATE_LIMIT_DELAY_S), MIN_RATE_LIMIT_DELAY_S)
        log.warning(
            "reconcile of account %s (%s): rate limited, retrying in %.0fs", account_id, reason, delay_s
        )
        raise dramatiq.Retry("rate limited", delay=int(delay_s * 1000))
    if result.status is ReconcileStatus.TRANSIENT:
        log.warning("reconcile of account %s (%s): %s; will retry", account_id, reason, result.error)
        raise dramatiq.Retry("exchange unreachable")
    if result.status is not ReconcileStatus.OK:
        log.error(
            "reconcile of account %s (%s) ended with %s: %s", account_id, reason, result.status, result.error
        )
    else:
        found = series().RECONCILE_FOUND
        for kind in ("updated", "transitions", "not_found", "positions", "balances"):
            if getattr(result, kind, 0):
                found.labels(kind).inc(getattr(result, kind))
        log.info(
            "reconciled account %s (%s): checked %s, updated %s",
            account_id,
            reason,
            result.checked,
            result.updated,
        )


# -- the work ---------------------------------------------------------------------------------------


class JobRunner:
    """The actors' work, bound to one Settings; one PostgreSQL connection per worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()
        #: The reconcile actor, for the history sweeps a gap sweep defers (set by ``declare_actors``).
        self.reconcile_actor: dramatiq.Actor[Any, Any] | None = None

    # -- connections -----------------------------------------------------------------------------
    def _connection(self, *, frames: bool = False) -> Any:
        """This thread's connection: the reconcile jobs' (transactions as psycopg2 makes them), or with
        ``frames`` the streamed frames' (autocommit, its transactions through ``TripCursor``)."""
        name = "frames_conn" if frames else "conn"
        conn = getattr(self._local, name, None)
        if conn is None or conn.closed:
            conn = connect(self.settings.database_url, application_name="kraite-mp worker", autocommit=frames)
            setattr(self._local, name, conn)
        return conn

    def _drop_connection(self) -> None:
        for name in ("conn", "frames_conn"):
            conn = getattr(self._local, name, None)
            setattr(self._local, name, None)
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - it is being thrown away
                    pass

    def _retry(self, what: str, e: BaseException) -> dramatiq.Retry:
        self._drop_connection()
        log.warning(
            "%s: PostgreSQL unavailable (%s); the message will be retried", what, describe_error(e)[:200]
        )
        return dramatiq.Retry(f"PostgreSQL unavailable: {type(e).__name__}")

    @staticmethod
    def _rollback(conn: Any) -> None:
        try:
            end_transaction(conn)
        except psycopg2.Error:
            pass

    @staticmethod
    def _audit_frame(
        cur: Any,
        account_id: int,
        frame_id: str,
        event: UserEvent,
        received: datetime,
        result: Outcome,
        texts: tuple[str | None, str | None],
    ) -> bool:
        """``audit.write`` of a streamed frame with ``result``; ``texts`` is (payload_text, raw_text)."""
        payload_text, raw_text = texts
        return audit.write(
            cur,
            frame_id=frame_id,
            account_id=account_id,
            source="ws",
            event_type=event.event_type,
            event_time_ms=event.event_time_ms,
            payload_text=payload_text,
            raw_text=raw_text,
            received_at=received,
            outcome=result.outcome,
            error=result.error,
        )

    # -- process_user_data_event -----------------------------------------------------------------
    def process_user_data_event(
        self, account_id: int, frame: str, frame_id: str, received_at: Any = None
    ) -> AuditOutcome:
        """Audit + dispatch one frame; returns the outcome (``duplicate`` when already audited)."""
        if not isinstance(frame, str):
            frame = str(frame)
        try:
            frame.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (only a hand-made message has them): PostgreSQL refuses
            frame = frame.encode("utf-8", "replace").decode("utf-8")
        frame_id = str(frame_id)[:MAX_FRAME_ID_CHARS]
        event = user.parse_frame(account_id, frame)
        received = parse_received_at(received_at)
        try:
            conn = self._connection(frames=True)
        except Exception as e:
            if is_transient(e):
                raise self._retry(f"frame {frame_id}", e) from None
            raise
        transitions: list[Transition] = []
        try:
            result, transitions = self._transaction(conn, account_id, frame_id, event, received)
        except Exception as e:  # noqa: BLE001 - bad data (or a bug): audit it, never retry forever
            if is_transient(e):
                raise self._retry(f"frame {frame_id}", e) from None
            self._rollback(conn)
            error = redact(f"{type(e).__name__}: {str(e).strip()}")[:MAX_ERROR_CHARS]
            if not isinstance(e, psycopg2.Error):
                log.exception(
                    "frame %s (account %s, %s): handler failed", frame_id, account_id, event.event_type
                )
            else:
                log.error(
                    "frame %s (account %s, %s): PostgreSQL refused it: %s",
                    frame_id,
                    account_id,
                    event.event_type,
                    error,
                )
            try:
                result = self._audit_failure(conn, account_id, frame_id, event, received, error)
            except Exception as e2:
                if is_transient(e2):
                    raise self._retry(f"frame {frame_id}", e2) from None
                raise
        if result.outcome is not AuditOutcome.DUPLICATE:
            m = series()
            m.FRAME_TO_COMMIT.observe(max(0.0, (datetime.now(UTC) - received).total_seconds()))
            if result.outcome is AuditOutcome.DISPATCHED and result.order is not None:
                m.ORDERS_UPDATED.labels(result.order.execution_type or "unknown").inc()
        if transitions:
            run_observers(self.settings, transitions)
        return result.outcome

    def _transaction(
        self, conn: Any, account_id: int, frame_id: str, event: UserEvent, received: datetime
    ) -> tuple[Outcome, list[Transition]]:
        result = decide(event, self.settings.user_data_stream.binance.dispatched_executions)
        # a frame that changes no row is its audit insert alone, a transaction of its own (one round trip);
        # one that does begins with the insert and commits with its last write (TripCursor)
        alone = result.order is None and result.account is None
        try:
            with conn.cursor(cursor_factory=TripCursor) as cur:
                if not alone:
                    cur.begin()
                # the audit row is the idempotency barrier: a second delivery of the frame stops here
                # (a concurrent one waits on the unique index until the first commits)
                if not self._audit_frame(
                    cur,
                    account_id,
                    frame_id,
                    event,
                    received,
                    result,
                    (event.payload_text, event.raw_text),
                ):
                    if not alone:
                        cur.rollback()
                    return Outcome(AuditOutcome.DUPLICATE), []
                transitions = [] if alone else apply_outcome(cur, result, frame_id)
                if not alone:
                    cur.commit()
            return result, transitions
        except BaseException:
            self._rollback(conn)
            raise

    def _audit_failure(
        self, conn: Any, account_id: int, frame_id: str, event: UserEvent, received: datetime, error: str
    ) -> Outcome:
        """Audit a frame whose processing failed for good: with its payload if PostgreSQL takes it, else raw."""
        attempts: list[tuple[str | None, str | None]] = []
        if event.payload_text is not None:
            attempts.append((event.payload_text, None))
        raw = event.raw_text
        if raw is None and event.payload_text is not None:
            raw = event.payload_text[: user.MAX_RAW_TEXT_CHARS]
        attempts.append((None, (raw or "").replace("\x00", "\\u0000")))
        failed = Outcome(AuditOutcome.ERROR, error)
        for texts in attempts:
            try:
                with conn.cursor() as cur:
                    self._audit_frame(cur, account_id, frame_id, event, received, failed, texts)
                conn.commit()
                return failed
            except Exception as e:  # noqa: BLE001 - try the next, plainer form
                self._rollback(conn)
                if is_transient(e):
                    raise
        log.error("frame %s (account %s): cannot be audited at all", frame_id, account_id)
        return failed

    # -- reconcile_account_job -------------------------------------------------------------------
    def reconcile_account_job(
        self,
        account_id: int,
        reason: str = "",
        gap_start_ms: int | None = None,
        history: dict[str, Any] | None = None,
    ) -> ReconcileResult | None:
        """REST reconciliation of one account after a (re)connect; PostgreSQL down retries.

        Exchange trouble comes back in the result, and ``finish_reconcile`` decides on a retry. ``history``
        (``{"requested_ms", "attempt"}``, with ``gap_start_ms``): the background history sweep a gap sweep
        deferred (``kraite_mp.reconcile.background``), which sends itself again instead of retrying.
        """
        try:
            conn = self._connection()
            account = get_account(conn, account_id)
        except Exception as e:
            if is_transient(e):
                raise self._retry(f"reconcile of account {account_id}", e) from None
            raise
        if account is None or not account.is_active:
            log.info("reconcile of account %s (%s) skipped: no such active account", account_id, reason)
            return None
        gap = gap_start_ms if isinstance(gap_start_ms, int) and not isinstance(gap_start_ms, bool) else None
        try:
            if history is not None and gap is not None:
                return self._history_sweep(conn, account, reason, gap, history)
            mode = mode_for_gap(self.settings, gap)
            result = reconcile_account(conn, self.settings, account, mode=mode, gap_start_ms=gap)
        except Exception as e:
            if is_transient(e):
                raise self._retry(f"reconcile of account {account_id}", e) from None
            raise
        finish_reconcile(account_id, reason, result)
        if result.history_deferred and gap is not None:
            self.send_history(
                account_id, reason, gap, {"requested_ms": int(time.time() * 1000), "attempt": 0}
            )
        return result

    def _history_sweep(
        self, conn: Any, account: Any, reason: str, gap: int, history: dict[str, Any]
    ) -> ReconcileResult | None:
        requested_ms, attempt = int(history.get("requested_ms") or 0), int(history.get("attempt") or 0)

        def send_again(next_attempt: int, delay_s: float) -> None:
            self.send_history(
                account.id, reason, gap, {"requested_ms": requested_ms, "attempt": next_attempt}, delay_s
            )

        return background.history_sweep(
            conn,
            self.settings,
            account,
            since_ms=gap,
            requested_ms=requested_ms,
            attempt=attempt,
            send_again=send_again,
        )

    def send_history(
        self, account_id: int, reason: str, gap: int, history: dict[str, Any], delay_s: float = 0.0
    ) -> None:
        """Queue a background history sweep (``declare_actors`` binds it to the reconcile actor)."""
        if self.reconcile_actor is None:
            log.warning("account %s: no reconcile actor to send its history sweep to", account_id)
            return
        self.reconcile_actor.send_with_options(
            kwargs={"account_id": account_id, "reason": reason, "gap_start_ms": gap, "history": history},
            delay=int(delay_s * 1000) or None,
        )


# -- broker -----------------------------------------------------------------------------------------


def declare_actors(broker: dramatiq.Broker, settings: Settings) -> JobRunner:
    """Declare both actors on ``broker`` (Redis in production, a StubBroker in unit tests), bound to ``settings``."""
    runner = JobRunner(settings)

    ack_client = getattr(broker, "client", None)  # a StubBroker has none: nothing to acknowledge to

    # actors return None: Dramatiq warns about discarded results otherwise
    def process_user_data_event(
        account_id: int, frame: str, frame_id: str, received_at: Any = None, ack: Any = None
    ) -> None:
        runner.process_user_data_event(account_id, frame, frame_id, received_at)
        # committed (or already audited): the spool may forget it. A Redis error here retries the message,
        # whose second audit is a no-op, and acknowledges it then.
        if ack is not None and ack_client is not None and not acknowledge(ack_client, ack):
            log.warning(
                "frame %s: malformed acknowledgement token ignored", str(frame_id)[:MAX_FRAME_ID_CHARS]
            )

    def reconcile_account_job(
        account_id: int, reason: str = "", gap_start_ms: int | None = None, history: Any = None
    ) -> None:
        runner.reconcile_account_job(
            account_id, reason, gap_start_ms, history if isinstance(history, dict) else None
        )

    dramatiq.actor(actor_name=PROCESS_ACTOR, queue_name=settings.user_data_stream.queue_name, broker=broker)(
        process_user_data_event
    )
    runner.reconcile_actor = dramatiq.actor(
        actor_name=RECONCILE_ACTOR, queue_name=RECONCILE_QUEUE, broker=broker
    )(reconcile_account_job)
    return runner


def transient_retry_policy(max_retries: int) -> Callable[[int, BaseException], bool]:
    """Dramatiq's ``retry_when``: a job that asked to be retried (``dramatiq.Retry``: PostgreSQL down, a
    429/418, the exchange unreachable) is retried without limit, with the capped backoff, so no frame
    is ever dead-lettered for a transient cause; anything else (a bug) ``max_retries`` times."""

    def retry_when(retries: int, exception: BaseException) -> bool:
        return isinstance(exception, dramatiq.Retry) or retries < max_retries

    return retry_when


def job_middleware(settings: Settings) -> list[Middleware]:
    """Dramatiq's default middleware, with ``Retries`` set from ``settings.jobs``."""
    jobs = settings.jobs
    middleware: list[Middleware] = [m() for m in default_middleware if m is not Retries]
    middleware.append(
        Retries(
            max_retries=jobs.max_retries,
            min_backoff=jobs.retry_min_backoff_ms,
            max_backoff=jobs.retry_max_backoff_ms,
            retry_when=transient_retry_policy(jobs.max_retries),
        )
    )
    middleware.append(WorkerHeartbeat(interval_s=min(1.0, jobs.heartbeat_timeout_s / 5)))
    return middleware


#: Broker calls per million that also sweep dead workers' messages back: 1 in 100 (Dramatiq's default:
#: 1,000 per million, 1 in 1,000).
MAINTENANCE_CHANCE = 10_000


def build_broker(
    settings: Settings, *, middleware: list[Middleware] | None = None, doorbell: bool = True
) -> KraiteRedisBroker:
    """A Redis broker from ``settings`` with both actors declared on it (bound to ``settings``).

    ``middleware`` replaces ``job_middleware(settings)``; ``doorbell=False`` makes the frame queue's consumer
    poll every ``jobs.idle_poll_ms`` instead of waiting on its doorbell (the benchmark's comparison).
    """
    broker = KraiteRedisBroker(
        idle_poll_ms=settings.jobs.idle_poll_ms,
        fast_queues=frozenset({settings.user_data_stream.queue_name}),
        doorbell=doorbell,
        client=redis_client(settings.redis_url),
        namespace=broker_namespace(settings),
        middleware=job_middleware(settings) if middleware is None else middleware,
        heartbeat_timeout=int(settings.jobs.heartbeat_timeout_s * 1000),
        # the dead-worker sweep runs with one Redis call in 100 (Dramatiq: 1 in 1,000), and with the fetch
        # after every doorbell wait that timed out: a dead worker's messages wait at most about a worker
        # timeout (1 s) past the heartbeat timeout, busy or idle; a sweep is a few cheap sorted-set reads
        maintenance_chance=MAINTENANCE_CHANCE,
    )
    broker.runner = declare_actors(broker, settings)
    return broker


settings = load_settings()
broker = build_broker(settings)
dramatiq.set_broker(broker)
install_log_redaction()
if adopt_handlers(settings.log_format):  # under the dramatiq CLI: its handlers, kraite-mp's format
    log.info("%s", startup_summary(settings))
process_user_data_event = broker.get_actor(PROCESS_ACTOR)
reconcile_account_job = broker.get_actor(RECONCILE_ACTOR)
