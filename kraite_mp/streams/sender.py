"""The spool sender: a thread that enqueues spooled records to Redis in order, one account at a time.

It reads the spool after the receive path wrote it, so a slow or dead Redis never delays receiving.
While Redis is down it retries with the shared capped backoff and the backlog grows on disk; the
cursor advances only past records Redis accepted, so nothing is lost and nothing skips the queue.

End-to-end acknowledgement (``Acks``, with a spool that has ``ack_required``): every frame message
names its spool position; the worker that committed its audit row adds the position to the spool's
acknowledgement key (``messages.ack_key``). The sender keeps the positions it sent and moves the
spool's acknowledged cursor over the longest acknowledged prefix, so the spool holds exactly what a
broker could still lose. A broker that lost its data (its epoch key, ``messages.epoch_key``, changed or
vanished: a restart without persistence, a failover to an empty replica, a flush) is replayed: the
sender re-sends everything unacknowledged from the spool (the audit's exactly-once by frame id absorbs
what was not lost) and asks for a reconciliation of the account, which also covers what retention gave
up. Idle accounts (nothing unacknowledged) cost Redis nothing: the epoch is looked at only while
frames are in flight and before sending after a pause (a broker that lost data while nothing of the
account was in it lost nothing of it), and an idle sender sleeps in its spool read for
``IDLE_READ_WAIT_S`` (``EMPTY_READ_WAIT_S`` once its acknowledged segment expired and the spool holds
nothing), woken at once by the writer. A reconcile request needs no acknowledgement: with no frame in
flight, the acknowledged cursor moves past what was sent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from kraite_mp.backoff import Attempts
from kraite_mp.messages import PROCESS_ACTOR, ack_key, epoch_key, reconcile_record, record_message
from kraite_mp.streams.liveness import describe
from kraite_mp.streams.spool import Spool
from kraite_mp.streams.spool_record import SpoolRecord

#: Records the sender takes from the spool at once ...
SEND_BATCH = 256
#: ... and enqueues in one round trip (``DoorbellBroker.enqueue_many``), at most this many bytes of them.
ENQUEUE_CHUNK = 64
ENQUEUE_CHUNK_BYTES = 1024 * 1024
#: Sender retry delay while Redis is unreachable: this, doubling per failure ...
SENDER_RETRY_BASE_S = 0.25
#: ... up to 2**4 times it (4 s, plus jitter).
SENDER_RETRY_CAP_EXPONENT = 4
#: Log the Redis outage (with the backlog) at most this often.
BACKLOG_LOG_INTERVAL_S = 10.0
#: On stop, the sender may keep sending what is spooled for this long; the rest waits for the next run.
SENDER_DRAIN_S = 5.0
#: How long one spool read waits for a record (the writer wakes it at once, and so does ``join``) ...
READ_WAIT_S = 5.0
#: ... with nothing in flight (only the idle-segment expiry and the retention check are due) ...
IDLE_READ_WAIT_S = 30.0
#: ... with nothing on disk either (nothing is due: the writer wakes the read when a record comes) ...
EMPTY_READ_WAIT_S = 600.0
#: ... and while draining on stop.
DRAIN_READ_WAIT_S = 0.2
#: While frames are unacknowledged, read the acknowledgements (and the broker's epoch) this often.
ACK_POLL_S = 0.5
#: Before sending, check the broker's epoch if it was last seen longer ago than this.
EPOCH_CHECK_S = 2.0
#: Acknowledgements read at once.
ACK_READ_BATCH = 2048
#: Check the spool's size against its retention bound at most this often.
RETENTION_CHECK_S = 10.0


@dataclass(frozen=True)
class Acks:
    """Where the acknowledgements of one spool and the broker's epoch live."""

    client: redis.Redis
    #: ``messages.ack_key`` of this spool.
    key: str
    #: ``messages.epoch_key`` of the deployment.
    epoch_key: str
    #: Account whose reconciliation a replay asks for.
    account_id: int

    @classmethod
    def for_spool(cls, client: redis.Redis, namespace: str, spool: Spool, account_id: int) -> Acks:
        return cls(client, ack_key(namespace, spool.spool_id), epoch_key(namespace), account_id)


class SpoolSender:
    """Drains the spool to Redis in order; never loses a record, never blocks the writer."""

    def __init__(
        self, spool: Spool, broker: RedisBroker, log: logging.Logger, acks: Acks | None = None
    ) -> None:
        self.spool = spool
        self.broker = broker
        self.log = log
        self.acks = acks if spool.ack_required else None
        self.stop = threading.Event()
        self.redis_ok = True
        self.sent = 0
        self.skipped = 0
        #: Replays after a broker lost its data, and the frames re-sent by them.
        self.replays = 0
        self.replayed = 0
        #: Frames given up by the retention bound before their audit was acknowledged.
        self.given_up = 0
        self.attempts = Attempts(base_s=SENDER_RETRY_BASE_S, cap_exponent=SENDER_RETRY_CAP_EXPONENT)
        #: (position, monotonic time sent) of the frames sent and not acknowledged, in spool order.
        self._unacked: deque[tuple[int, float]] = deque()
        self._epoch = ""
        self._epoch_checked_at = -1e9
        #: Records up to this position were sent to the current broker by an earlier run: not again.
        self._skip_until = -1
        self._ack_polled_at = 0.0
        self._retention_checked_at = 0.0
        self._thread = threading.Thread(target=self._run, name="spool-sender", daemon=True)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def ack_lag_s(self) -> float:
        """Age of the oldest sent frame no worker acknowledged yet (0 when there is none)."""
        try:
            return max(0.0, time.monotonic() - self._unacked[0][1])
        except IndexError:
            return 0.0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        self.spool.wake()  # a read waiting for the writer returns now
        self._thread.join(timeout)

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[SpoolRecord] = []
        last_log = 0.0
        drain_deadline: float | None = None
        while True:
            if self.stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + SENDER_DRAIN_S
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                break
            try:
                # while records flow (or Redis refuses them), at most once a CURSOR_PERSIST_S
                self.spool.persist_cursor(due_only=True)
                if self.acks is not None:
                    if (self._unacked or not self._epoch) and self._check_epoch():
                        pending = []  # replaying: the spool was rewound
                    self._poll_acks()
                if not pending:
                    try:
                        pending = self.spool.read(
                            SEND_BATCH, timeout=DRAIN_READ_WAIT_S if self.stop.is_set() else self._read_wait()
                        )
                    except OSError:
                        self.log.exception("cannot read the spool")
                        if self.stop.wait(1.0):
                            break
                        continue
                    if not pending:
                        self.spool.persist_cursor()  # the flow paused: the cursor on disk catches up
                        if self.stop.is_set():
                            break
                        continue
                if self.acks is not None and self._check_epoch():  # before sending (throttled by itself)
                    pending = []  # replaying: the spool was rewound
                    continue
                self._send_batch(pending)
            except (redis.RedisError, dramatiq.errors.DramatiqError, OSError) as e:
                now = time.monotonic()
                if self.redis_ok or now - last_log >= BACKLOG_LOG_INTERVAL_S:
                    self.log.warning(
                        "Redis unavailable (%s): frames stay spooled, backlog=%d",
                        describe(e),
                        self.spool.backlog,
                    )
                    last_log = now
                self.redis_ok = False
                self._epoch_checked_at = -1e9  # a Redis that comes back may be another one: look first
                if self.stop.is_set():
                    break  # what is left is sent by the next run
                self.stop.wait(self.attempts.next_delay())
                continue
            if not self.redis_ok:
                self.log.warning("Redis is back: spooled frames sent, backlog=%d", self.spool.backlog)
                self.redis_ok = True
            self.attempts.reset()
        self.spool.persist_cursor()  # a stop: the next run skips exactly what this one sent

    def _read_wait(self) -> float:
        if self.spool.cursor_pending:  # more records or not, the moved cursor is written when due
            return min(ACK_POLL_S, max(0.01, self.spool.cursor_due_in()))
        if self._unacked:
            return ACK_POLL_S
        if self.acks is not None and self.spool.holds_nothing:
            return EMPTY_READ_WAIT_S
        if self.acks is not None:  # idle: wake for the idle-spool expiry and the retention check only
            max_age = self.spool.segment_max_age_s
            return (
                IDLE_READ_WAIT_S if max_age is None else max(READ_WAIT_S, min(IDLE_READ_WAIT_S, max_age / 2))
            )
        return READ_WAIT_S

    def _send_batch(self, pending: list[SpoolRecord]) -> None:
        """Send ``pending`` in order and remove what went from it; on a Redis error the cursor is committed
        past what went, the rest stays in ``pending`` for the retry, and the error is raised. Records go in
        chunks of one round trip each (``ENQUEUE_CHUNK``, ``ENQUEUE_CHUNK_BYTES``) when the broker can
        (``enqueue_many``); a chunk that failed is sent again whole (at least once)."""
        enqueue_many = getattr(self.broker, "enqueue_many", None)
        limit = ENQUEUE_CHUNK if enqueue_many is not None else 1
        done = sent = counted = 0  # counted: records of the spool's backlog (not sent by an earlier run)
        try:
            while done < len(pending):
                messages: list[dramatiq.Message[Any]] = []
                tracked: list[int] = []  # frame positions to await acknowledgements for, in order
                size = taken = backlog = 0
                for rec in pending[done:]:
                    if taken and (len(messages) >= limit or size + len(rec.data) > ENQUEUE_CHUNK_BYTES):
                        break
                    taken += 1
                    if rec.in_memory or rec.position > self._skip_until:
                        backlog += 1
                    message, is_frame = self._message(rec)
                    if is_frame:
                        tracked.append(rec.position)
                    if message is not None:
                        messages.append(message)
                        size += len(rec.data)
                if len(messages) == 1 or enqueue_many is None:
                    for message in messages:
                        self.broker.enqueue(message)
                elif messages:
                    enqueue_many(messages)
                now = time.monotonic()
                self._unacked.extend((position, now) for position in tracked)
                self.sent += len(messages)
                sent += len(messages)
                counted += backlog
                done += taken
        finally:
            if done:
                self.spool.commit(pending[done - 1], counted, self._epoch)
                del pending[:done]

    def _message(self, rec: SpoolRecord) -> tuple[dramatiq.Message[Any] | None, bool]:
        """The message to enqueue for one record (None: not now: unreadable, or sent by an earlier run), and
        whether it is a frame whose acknowledgement the sender waits for."""
        position = rec.position
        tracked = self.acks is not None and not rec.in_memory  # a record held in memory cannot be replayed
        try:
            message = record_message(rec.data, ack=self._ack_token(position) if tracked else None)
        except ValueError:
            self.skipped += 1
            self.log.error("skipping an unreadable spool record (%d bytes)", len(rec.data))
            return None, False
        if rec.in_memory:
            return message, False
        is_frame = tracked and message.actor_name == PROCESS_ACTOR
        if position <= self._skip_until:
            return None, is_frame
        return message, is_frame

    def _ack_token(self, position: int) -> list[object]:
        assert self.acks is not None
        return [self.acks.key, position]

    # -- acknowledgements and the broker's epoch ------------------------------------------------
    def _check_epoch(self) -> bool:
        """Learn the broker's epoch; True if it changed, i.e. the broker lost data and a replay began."""
        assert self.acks is not None
        now = time.monotonic()
        if now - self._epoch_checked_at < (ACK_POLL_S if self._unacked else EPOCH_CHECK_S):
            return False
        client = self.acks.client
        epoch = client.get(self.acks.epoch_key)
        if epoch is None:
            client.set(self.acks.epoch_key, os.urandom(8).hex(), nx=True)
            epoch = client.get(self.acks.epoch_key)
        self._epoch_checked_at = now
        current = epoch.decode("ascii", "replace") if isinstance(epoch, bytes) else str(epoch or "")
        if not self._epoch:  # first contact in this run: what did the last run send to?
            self._epoch = current
            if self.spool.sent_epoch == current:
                self._skip_until = self.spool.sent_position
                return False
            if self.spool.sent_position > self.spool.acked_position and self.spool.sent_epoch:
                self._replay(
                    "the broker's epoch changed while this child was down"
                    f" ({self.spool.sent_epoch[:8]} -> {current[:8]})"
                )
                return True
            self._skip_until = -1  # a first run: send everything unacknowledged
            return False
        if current == self._epoch:
            return False
        previous, self._epoch = self._epoch, current
        self._replay(f"the broker's epoch changed ({previous[:8]} -> {current[:8]})")
        return True

    def _replay(self, why: str) -> None:
        lost = self.spool.sent_position > self.spool.acked_position  # sent and not acknowledged: gone?
        self._unacked.clear()
        self._skip_until = -1
        count = self.spool.rewind()
        if not lost:
            self.log.info("the broker is new (%s); nothing of this account was in flight", why)
            return
        self.replays += 1
        self.replayed += count
        self.log.warning(
            "Redis lost its data (%s): re-sending %d unacknowledged record(s) from the spool and asking"
            " for a reconciliation",
            why,
            count,
        )
        assert self.acks is not None
        self.spool.append(reconcile_record(self.acks.account_id, "broker-lost-data"))

    def _poll_acks(self) -> None:
        assert self.acks is not None
        now = time.monotonic()
        if not self._unacked:
            # nothing in flight: what was sent since needs no acknowledgement (reconcile requests), so that
            # an idle account's spool is acknowledged to its end and its segment can expire (a no-op when
            # the acknowledged cursor is there already)
            self.spool.ack(self.spool.sent_position)
            self._check_retention(now)
            return
        if now - self._ack_polled_at < ACK_POLL_S:
            self._check_retention(now)
            return
        self._ack_polled_at = now
        first = self._unacked[0][0]
        found: list[bytes] = self.acks.client.zrangebyscore(  # type: ignore[assignment]  # sync client
            self.acks.key, first, "+inf", start=0, num=ACK_READ_BATCH
        )
        acked = {int(m) for m in found}
        last = None
        while self._unacked and self._unacked[0][0] in acked:
            last = self._unacked.popleft()[0]
        if last is not None:
            # with nothing left unacknowledged, what needs no acknowledgement (reconcile requests) is done too
            self.spool.ack(last if self._unacked else max(last, self.spool.sent_position))
            self.acks.client.zremrangebyscore(self.acks.key, "-inf", last)
        self._check_retention(now)

    def _check_retention(self, now: float) -> None:
        if now - self._retention_checked_at < RETENTION_CHECK_S:
            return
        self._retention_checked_at = now
        if not self._unacked:
            self.spool.expire_idle()
        if self.spool.max_bytes is None:
            return
        while self.spool.over_retention():
            position = self.spool.give_up_oldest()
            if position is None:
                return
            dropped = 0
            while self._unacked and self._unacked[0][0] <= position:
                self._unacked.popleft()
                dropped += 1
            self.given_up += dropped
            self.log.error(
                "spool over its %d-byte retention: %d sent frame(s) whose audit no worker acknowledged"
                " are no longer kept (a broker that loses them now cannot be replayed; a reconciliation"
                " is requested)",
                self.spool.max_bytes,
                dropped,
            )
            assert self.acks is not None
            self.spool.append(reconcile_record(self.acks.account_id, "spool-retention"))
