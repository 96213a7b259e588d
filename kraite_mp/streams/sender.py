"""The spool sender: a thread that enqueues spooled records to Redis in order, one account at a time.

It reads the spool after the receive path wrote it, so a slow or dead Redis never delays receiving.
While Redis is down it retries with the shared capped backoff and the backlog grows on disk; the
cursor advances only past records Redis accepted, so nothing is lost and nothing skips the queue.
"""

from __future__ import annotations

import logging
import threading
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from kraite_mp.backoff import Attempts
from kraite_mp.messages import record_message
from kraite_mp.streams.connection import describe
from kraite_mp.streams.spool import Spool, SpoolRecord

#: Records the sender takes from the spool at once.
SEND_BATCH = 256
#: Sender retry delay while Redis is unreachable: this, doubling per failure ...
SENDER_RETRY_BASE_S = 0.25
#: ... up to 2**4 times it (4 s, plus jitter).
SENDER_RETRY_CAP_EXPONENT = 4
#: Log the Redis outage (with the backlog) at most this often.
BACKLOG_LOG_INTERVAL_S = 10.0
#: On stop, the sender may keep sending what is spooled for this long; the rest waits for the next run.
SENDER_DRAIN_S = 5.0
#: How long one spool read waits for a record ...
READ_WAIT_S = 0.5
#: ... and while draining on stop.
DRAIN_READ_WAIT_S = 0.2


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
        self.attempts = Attempts(base_s=SENDER_RETRY_BASE_S, cap_exponent=SENDER_RETRY_CAP_EXPONENT)
        self._thread = threading.Thread(target=self._run, name="spool-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[SpoolRecord] = []
        last_log = 0.0
        drain_deadline: float | None = None
        while True:
            if self.stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + SENDER_DRAIN_S
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                break
            if not pending:
                try:
                    pending = self.spool.read(
                        SEND_BATCH, timeout=DRAIN_READ_WAIT_S if self.stop.is_set() else READ_WAIT_S
                    )
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
                now = time.monotonic()
                if self.redis_ok or now - last_log >= BACKLOG_LOG_INTERVAL_S:
                    self.log.warning(
                        "Redis unavailable (%s): frames stay spooled, backlog=%d",
                        describe(e),
                        self.spool.backlog,
                    )
                    last_log = now
                self.redis_ok = False
                if self.stop.is_set():
                    break  # what is left is sent by the next run
                self.stop.wait(self.attempts.next_delay())
                continue
            self.spool.commit(pending[-1], len(pending))
            pending = []
            if not self.redis_ok:
                self.log.warning("Redis is back: spooled frames sent, backlog=%d", self.spool.backlog)
                self.redis_ok = True
            self.attempts.reset()

    def _send(self, rec: SpoolRecord) -> None:
        try:
            message = record_message(rec.data)
        except ValueError:
            self.skipped += 1
            self.log.error("skipping an unreadable spool record (%d bytes)", len(rec.data))
            return
        self.broker.enqueue(message)
        self.sent += 1
