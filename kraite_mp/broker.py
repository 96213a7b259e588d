"""The workers' Redis broker: ``KraiteRedisBroker``, its doorbell consumer ``BellConsumer``, the heartbeat.

How ``dramatiq kraite_mp.jobs`` talks to Redis, apart from what its actors do: the frame queue's consumer
waits on the doorbell the producers ring (``messages.DoorbellBroker``) instead of polling, and a busy worker
keeps its heartbeat fresh (``WorkerHeartbeat``). ``jobs.build_broker`` puts them together with the actors.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from redis.backoff import NoBackoff
from redis.retry import Retry

from kraite_mp.logs import describe_error
from kraite_mp.messages import REDIS_SOCKET_TIMEOUT_S, DoorbellBroker, bell_key

if TYPE_CHECKING:  # for the annotation of ``runner`` only: jobs imports this module
    from kraite_mp.jobs import JobRunner

log = logging.getLogger(__name__)


class KraiteRedisBroker(DoorbellBroker):
    """RedisBroker whose latency-sensitive queues (``fast_queues``) wake on a doorbell instead of polling.

    Dramatiq's Redis consumer sleeps up to the worker timeout (1 s by default) after an empty fetch, so an
    idle frame queue would add up to a second per frame. The consumer of a fast queue (``BellConsumer``)
    blocks in BLPOP on the queue's doorbell (``messages.bell_key``) after an empty fetch, for at most the
    worker timeout: every producer rings it with each message (``messages.DoorbellBroker``: the children's
    senders, this broker's own enqueues of retried messages and the requeues of a stopping worker), so a
    frame is fetched one round trip after it was enqueued and an idle worker makes about one call a second.
    A message that comes without a bell (a producer of an older release during a rolling deploy, Dramatiq's
    requeue of a dead worker's messages) is found within the worker timeout; each BLPOP that timed out is
    followed by a fetch that also sweeps dead workers' messages back (Dramatiq's maintenance).

    ``idle_poll_ms`` still caps the consumer's other waits: the sleep between fetches while the doorbell is
    unavailable (or ``doorbell=False``: polling as before the doorbell), and the wait for a free prefetch
    slot, which a worker thread finishing a message ends at once. See docs/BENCHMARKS.md for the costs.
    """

    def __init__(
        self, *, idle_poll_ms: int, fast_queues: frozenset[str], doorbell: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(bell_queues=fast_queues, **kwargs)
        self.idle_poll_ms = idle_poll_ms
        self.fast_queues = fast_queues
        self.doorbell = doorbell
        self._maintain = threading.local()
        #: The runner the actors call (set by ``jobs.build_broker``).
        self.runner: JobRunner | None = None

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        if queue_name not in self.fast_queues:
            return super().consume(queue_name, prefetch, timeout)
        if not self.doorbell:
            return super().consume(queue_name, prefetch, min(timeout, self.idle_poll_ms))
        return BellConsumer(
            self, queue_name, prefetch, min(timeout, self.idle_poll_ms), bell_timeout_ms=timeout
        )

    def maintain_on_next_fetch(self) -> None:
        """The next fetch of this thread also requeues dead workers' messages (Dramatiq's maintenance)."""
        self._maintain.fetch = True

    def _should_do_maintenance(self, command: str) -> int:
        if command == "fetch" and getattr(self._maintain, "fetch", False):
            self._maintain.fetch = False
            return 1
        return super()._should_do_maintenance(command)


#: The doorbell's connection waits this much longer than its BLPOP before it takes Redis for hung (seconds).
BELL_SOCKET_MARGIN_S = REDIS_SOCKET_TIMEOUT_S
#: CLIENT SETNAME of a doorbell connection (``CLIENT LIST`` shows who blocks on a bell).
BELL_CLIENT_NAME = "kraite-mp-doorbell"


class BellConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, waiting on the queue's doorbell where it would sleep.

    After an empty fetch it blocks in BLPOP on the bell for up to ``bell_timeout_ms``, on a connection of its
    own (one per consumer, so the BLPOP never holds one the broker's other calls need, with a socket timeout
    longer than the BLPOP); with every prefetched message in hand it waits for a worker thread to finish one
    (``ack``/``nack``), at most ``timeout`` ms. A doorbell that fails (Redis gone, hung, restarted) is logged
    once, the consumer polls every ``timeout`` ms meanwhile (the fetch itself raises ``ConnectionClosed``
    when Redis is really gone, and Dramatiq restarts the consumer), and it reconnects on the next wait.
    """

    def __init__(
        self, broker: KraiteRedisBroker, queue_name: str, prefetch: int, timeout: int, *, bell_timeout_ms: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.kraite_broker = broker
        self.bell = bell_key(broker.namespace, queue_name)
        self.bell_timeout_s = max(1, bell_timeout_ms) / 1000
        self._bell_client: redis.Redis | None = None
        self._bell_failing = False
        self._slot_freed = threading.Event()

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                while self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:  # its data vanished between the LPOP and the HMGET: as Dramatiq does
                        log.warning("a message of queue %r had no data; skipped", self.queue_name)
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                self._slot_freed.clear()  # before counting: a slot freed from now on ends the wait below
                free = self.prefetch - self.outstanding_message_count
                if free <= 0:
                    self._slot_freed.wait(self.timeout / 1000)
                    return None
                self.message_cache = self.broker.do_fetch(self.queue_name, free)
                if not self.message_cache:
                    self._wait_for_bell()
                    return None
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]

    def _wait_for_bell(self) -> None:
        try:
            if self._bell_client is None:
                self._bell_client = self._connect_bell()
            timeout = self.bell_timeout_s
            # whole seconds as an integer: a Redis older than 6.0 takes no fractional timeout
            rang = self._bell_client.blpop(
                [self.bell], timeout=int(timeout) if timeout.is_integer() else timeout
            )
        except redis.RedisError as e:
            self._close_bell()
            if not self._bell_failing:
                log.warning(
                    "doorbell of queue %r unavailable (%s); polling every %d ms until Redis answers",
                    self.queue_name,
                    describe_error(e)[:200],
                    self.timeout,
                )
                self._bell_failing = True
            self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
            time.sleep(backoff_ms / 1000)
            return
        self.misses = 0
        if self._bell_failing:
            log.warning("doorbell of queue %r answers again", self.queue_name)
            self._bell_failing = False
        if rang is None:  # nothing came for a while: look for what came without a bell, dead workers' too
            self.kraite_broker.maintain_on_next_fetch()

    def _connect_bell(self) -> redis.Redis:
        pool = self.broker.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(
            socket_timeout=self.bell_timeout_s + BELL_SOCKET_MARGIN_S,
            client_name=BELL_CLIENT_NAME,
            retry=Retry(NoBackoff(), 0),  # a failure is reported at once; the next wait reconnects
        )
        bell_pool = redis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
        return redis.Redis(connection_pool=bell_pool)

    def _close_bell(self) -> None:
        client, self._bell_client = self._bell_client, None
        if client is not None:
            try:
                client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def requeue(self, messages: Any) -> None:
        messages = list(messages)
        super().requeue(messages)  # type: ignore[no-untyped-call]
        if messages:  # another worker's consumer may be waiting on the bell
            try:
                self.kraite_broker.ring(self.queue_name)
            except redis.RedisError as e:  # they are in the queue: a consumer finds them within its timeout
                log.debug(
                    "doorbell of queue %r not rung after a requeue: %s", self.queue_name, describe_error(e)
                )

    def close(self) -> None:
        self._close_bell()
        super().close()


class WorkerHeartbeat(Middleware):
    """Refreshes this worker's Dramatiq heartbeat every ``interval_s`` from a thread of its own.

    Dramatiq's Redis broker refreshes a worker's heartbeat only when one of its consumers talks to Redis,
    and a consumer whose prefetch is full does not; with ``jobs.heartbeat_timeout_s`` far below Dramatiq's
    60 s a busy worker would be taken for dead and its messages requeued. This keeps the heartbeat
    (``<namespace>:__heartbeats__``, the worker's ``broker_id``) fresh while the process lives.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if isinstance(broker, RedisBroker):
            threading.Thread(target=self._beat, args=(broker,), name="kraite-heartbeat", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._stop.set()

    def _beat(self, broker: RedisBroker) -> None:
        key = f"{broker.namespace}:__heartbeats__"
        while not self._stop.wait(self.interval_s):
            try:
                broker.client.zadd(key, {broker.broker_id: int(time.time() * 1000)})
            except Exception as e:  # noqa: BLE001 - Redis down: the consumers fail loudly already
                log.debug("worker heartbeat not refreshed: %s", describe_error(e))
