"""The frame queue's doorbell: producers ring it with every message, the consumer waits on it after an empty
fetch (``messages.DoorbellBroker``, ``broker.BellConsumer``). A Redis server of each test's own (real, stopped
and restarted empty by the tests), so ``CLIENT LIST`` shows only this test's clients.

What a test proves never rests on timing: a consumer whose doorbell wait is far longer than the test's
bounds returned because it was woken, not because the wait timed out.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import ConnectionClosed
from fixtures.userdata_helpers import settings_from
from support import wait_for

from kraite_mp import jobs
from kraite_mp.broker import BELL_CLIENT_NAME, BellConsumer
from kraite_mp.config import Settings
from kraite_mp.messages import (
    BELL_MAX,
    BELL_TTL_MS,
    PROCESS_ACTOR,
    RECONCILE_QUEUE,
    bell_key,
    broker_namespace,
    build_producer_broker,
    frame_record,
    reconcile_record,
    record_message,
)
from kraite_mp.ops.embedded import RedisServer
from kraite_mp.streams.sender import SpoolSender
from kraite_mp.streams.spool import Spool

pytestmark = pytest.mark.integration

#: A doorbell wait no test sits out: a consumer back within a test's bounds was woken.
LONG_MS = 120_000


@pytest.fixture()
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture()
def bell_settings(kraite_env: dict[str, str], server: RedisServer) -> Settings:
    env = dict(kraite_env)
    env["KRAITE_REDIS_URL"] = server.url
    env["KRAITE_REDIS_NAMESPACE"] = f"bell-{uuid.uuid4().hex[:8]}"
    env["KRAITE__jobs__idle_poll_ms"] = "50"
    return settings_from(env)


@pytest.fixture()
def made() -> Iterator[list[Any]]:
    """Brokers and consumers to close at the end."""
    things: list[Any] = []
    yield things
    for t in reversed(things):
        t.close()


def client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def blocked_on_bell(server: RedisServer) -> int:
    """Doorbell connections blocked in BLPOP now (flag ``b``; ``cmd`` alone is only the last command)."""
    with client_of(server) as c:
        return sum(
            1
            for cl in c.client_list()
            if cl.get("name") == BELL_CLIENT_NAME and cl.get("cmd") == "blpop" and "b" in cl.get("flags", "")
        )


def frame_message(settings: Settings, frame_id: str) -> Any:
    record = frame_record(settings.user_data_stream.queue_name, 1, '{"e":"TRADE_LITE"}', frame_id, 0.0)
    return record_message(record)


class Next:
    """``next(consumer)`` on a thread of its own: what the test waits for and what came back."""

    def __init__(self, consumer: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(consumer,), daemon=True)
        self.thread.start()

    def _run(self, consumer: Any) -> None:
        try:
            self.result = next(consumer)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the consumer was not woken"
        if self.error is not None:
            raise self.error
        return self.result


def waiting_in(thread: threading.Thread, function: str) -> bool:
    """True while ``thread`` is inside a call of ``threading``'s ``function`` (an Event's wait)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_code.co_filename.endswith("threading.py"):
            return True
        frame = frame.f_back
    return False


def next_message(consumer: Any, tries: int = 20) -> Any:
    for _ in range(tries):
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError(f"no message in {tries} turns of the consumer")


def test_a_consumer_waiting_on_the_doorbell_wakes_for_a_frame_the_sender_enqueues(
    bell_settings: Settings, server: RedisServer, made: list[Any], tmp_path: Path
) -> None:
    broker = jobs.build_broker(bell_settings)
    made.append(broker)
    consumer = broker.consume(bell_settings.user_data_stream.queue_name, prefetch=4, timeout=LONG_MS)
    made.append(consumer)
    assert isinstance(consumer, BellConsumer)
    waiting = Next(consumer)  # empty queue: fetches nothing, then blocks on the bell for LONG_MS
    wait_for(lambda: blocked_on_bell(server) == 1, 10, message="the consumer blocked in BLPOP on the bell")
    assert waiting.thread.is_alive()

    producer = build_producer_broker(bell_settings)
    made.append(producer)
    with Spool(str(tmp_path)).open() as spool:
        spool.append(frame_record(bell_settings.user_data_stream.queue_name, 1, "{}", "bell-1", 0.0))
        sender = SpoolSender(spool, producer, logging.getLogger("test.bell"))
        sender.start()
        try:
            assert waiting.join() is None  # woken by the bell, long before its timeout
        finally:
            sender.join(5)
    message = next_message(consumer)
    assert message.actor_name == PROCESS_ACTOR and message.kwargs["frame_id"] == "bell-1"
    consumer.ack(message)
    assert blocked_on_bell(server) == 0


def test_a_message_enqueued_without_a_bell_is_found_when_the_wait_times_out(
    bell_settings: Settings, server: RedisServer, made: list[Any]
) -> None:
    """A producer of an older release (a plain RedisBroker) rings nothing: the bounded wait finds it."""
    queue = bell_settings.user_data_stream.queue_name
    namespace = broker_namespace(bell_settings)
    broker = jobs.build_broker(bell_settings)
    made.append(broker)
    consumer = broker.consume(queue, prefetch=4, timeout=300)
    made.append(consumer)
    assert next(consumer) is None  # nothing there: one wait on the bell, timed out
    old = RedisBroker(client=client_of(server), namespace=namespace, middleware=[])
    made.append(old)
    old.enqueue(frame_message(bell_settings, "no-bell"))
    with client_of(server) as c:
        assert c.exists(bell_key(namespace, queue)) == 0  # no bell was rung
    assert next_message(consumer).kwargs["frame_id"] == "no-bell"


def test_a_burst_leaves_a_bounded_doorbell_and_bounded_spurious_wakeups(
    bell_settings: Settings, server: RedisServer, made: list[Any]
) -> None:
    queue = bell_settings.user_data_stream.queue_name
    key = bell_key(broker_namespace(bell_settings), queue)
    producer = build_producer_broker(bell_settings)
    made.append(producer)
    burst = 3 * BELL_MAX
    for i in range(burst):
        producer.enqueue(frame_message(bell_settings, f"burst-{i}"))
    with client_of(server) as c:
        assert c.llen(key) == BELL_MAX
        assert 0 < c.pttl(key) <= BELL_TTL_MS
        assert c.llen(f"{broker_namespace(bell_settings)}:{queue}") == burst  # every message, bell or not

    broker = jobs.build_broker(bell_settings)
    made.append(broker)
    consumer = broker.consume(queue, prefetch=burst, timeout=LONG_MS)
    made.append(consumer)
    got = []
    while len(got) < burst:
        message = next(consumer)
        if message is not None:
            got.append(message.kwargs["frame_id"])
            consumer.ack(message)
    assert got == [f"burst-{i}" for i in range(burst)]
    spurious = 0
    with client_of(server) as c:
        while c.llen(key):  # each leftover bell: one wake-up that fetches nothing (they never block)
            assert next(consumer) is None
            spurious += 1
            assert spurious <= BELL_MAX
    waiting = Next(consumer)  # the bells are used up: the next wait blocks
    wait_for(lambda: blocked_on_bell(server) == 1, 10, message="the consumer blocked on the empty bell")
    producer.enqueue(frame_message(bell_settings, "after"))
    assert waiting.join() is None
    assert next_message(consumer).kwargs["frame_id"] == "after"


def test_a_full_prefetch_waits_for_a_finished_message_not_for_a_poll(
    kraite_env: dict[str, str], server: RedisServer, made: list[Any]
) -> None:
    env = dict(kraite_env, KRAITE_REDIS_URL=server.url, KRAITE__jobs__idle_poll_ms=str(LONG_MS))
    settings = settings_from(env)
    producer = build_producer_broker(settings)
    broker = jobs.build_broker(settings)
    made.extend([producer, broker])
    consumer = broker.consume(settings.user_data_stream.queue_name, prefetch=1, timeout=LONG_MS)
    made.append(consumer)
    producer.enqueue(frame_message(settings, "first"))
    producer.enqueue(frame_message(settings, "second"))
    first = next_message(consumer)
    waiting = Next(consumer)  # prefetch 1 in hand: waits for a slot (up to LONG_MS)
    wait_for(lambda: waiting_in(waiting.thread, "wait"), 10, message="the consumer waiting for a free slot")
    consumer.ack(first)  # a worker thread finishing the message frees the slot at once
    assert waiting.join() is None
    assert next_message(consumer).kwargs["frame_id"] == "second"


def test_a_dead_worker_s_messages_come_back_after_a_wait_that_timed_out(
    bell_settings: Settings, server: RedisServer, made: list[Any]
) -> None:
    """The fetch after a doorbell wait that timed out sweeps dead workers' messages back (no bell rings
    for them)."""
    queue = bell_settings.user_data_stream.queue_name
    namespace = broker_namespace(bell_settings)
    producer = build_producer_broker(bell_settings)
    made.append(producer)
    producer.enqueue(frame_message(bell_settings, "orphan"))
    dead = RedisBroker(client=client_of(server), namespace=namespace, middleware=[])
    made.append(dead)
    dead_consumer = dead.consume(queue, prefetch=1, timeout=100)
    assert next_message(dead_consumer).kwargs["frame_id"] == "orphan"  # fetched, never acknowledged
    with client_of(server) as c:
        c.zadd(f"{namespace}:__heartbeats__", {dead.broker_id: 1})  # its last heartbeat: long ago
        c.delete(bell_key(namespace, queue))  # the bell of the enqueue is gone: only maintenance helps

    broker = jobs.build_broker(bell_settings)
    made.append(broker)
    broker.maintenance_chance = 0  # only the fetch after a timed-out wait sweeps
    consumer = broker.consume(queue, prefetch=4, timeout=300)
    made.append(consumer)
    assert next(consumer) is None  # empty fetch, the wait times out
    assert next_message(consumer, tries=1).kwargs["frame_id"] == "orphan"


def test_redis_gone_is_logged_and_a_restarted_empty_redis_rings_again(
    bell_settings: Settings, server: RedisServer, made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops under a consumer blocked on the bell, then comes back empty (what a broker epoch
    change looks like): a warning, Dramatiq's ConnectionClosed while it is gone, and the bell works again
    (the producer reloads the enqueue script the empty Redis no longer has)."""
    caplog.set_level(logging.WARNING, logger="kraite_mp.broker")
    queue = bell_settings.user_data_stream.queue_name
    producer = build_producer_broker(bell_settings)
    broker = jobs.build_broker(bell_settings)
    made.extend([producer, broker])
    producer.enqueue(frame_message(bell_settings, "before"))  # loads the scripts into this Redis
    consumer = broker.consume(queue, prefetch=4, timeout=LONG_MS)
    made.append(consumer)
    consumer.ack(next_message(consumer))
    with client_of(server) as c:
        c.delete(bell_key(broker_namespace(bell_settings), queue))  # the bell of "before": not needed
    waiting = Next(consumer)
    wait_for(lambda: blocked_on_bell(server) == 1, 10, message="the consumer blocked on the bell")

    server.stop()
    assert waiting.join() is None  # the doorbell failed: logged, no exception out of the consumer
    assert any(
        r.getMessage().startswith(f"doorbell of queue '{queue}' unavailable (") for r in caplog.records
    )
    with pytest.raises(ConnectionClosed):  # the fetch says Redis is gone: Dramatiq restarts the consumer
        next(consumer)

    server.start()  # same port, no data, no scripts
    consumer = broker.consume(queue, prefetch=4, timeout=LONG_MS)  # what Dramatiq's restart does
    made.append(consumer)
    waiting = Next(consumer)
    wait_for(lambda: blocked_on_bell(server) == 1, 10, message="the new consumer blocked on the bell")
    producer.enqueue(frame_message(bell_settings, "after"))
    assert waiting.join() is None
    assert next_message(consumer).kwargs["frame_id"] == "after"


def test_the_frame_queue_waits_on_the_bell_and_the_others_poll_as_before(
    bell_settings: Settings, made: list[Any]
) -> None:
    broker = jobs.build_broker(bell_settings)
    made.append(broker)
    frames = broker.consume(bell_settings.user_data_stream.queue_name, prefetch=4, timeout=1000)
    made.append(frames)
    assert isinstance(frames, BellConsumer)
    assert (frames.timeout, frames.bell_timeout_s) == (50, 1.0)  # idle_poll_ms caps the fallback poll
    reconcile = broker.consume("reconcile", prefetch=4, timeout=1000)
    assert not isinstance(reconcile, BellConsumer) and reconcile.timeout == 1000
    polling = jobs.build_broker(bell_settings, doorbell=False)
    made.append(polling)
    old = polling.consume(bell_settings.user_data_stream.queue_name, prefetch=4, timeout=1000)
    assert not isinstance(old, BellConsumer) and old.timeout == 50


def test_the_producer_loads_the_enqueue_script_again_into_a_redis_without_it(
    bell_settings: Settings, server: RedisServer, made: list[Any]
) -> None:
    """A Redis that restarted or flushed its scripts: the pipelined EVALSHA fails once, loads, succeeds."""
    queue = bell_settings.user_data_stream.queue_name
    namespace = broker_namespace(bell_settings)
    producer = build_producer_broker(bell_settings)
    made.append(producer)
    producer.enqueue(frame_message(bell_settings, "one"))
    with client_of(server) as c:
        c.script_flush()
        assert c.script_exists(producer.scripts["dispatch"].sha) == [False]
        producer.enqueue(frame_message(bell_settings, "two"))
        assert c.llen(f"{namespace}:{queue}") == 2
        # each enqueue that found no script (the first into this new Redis, the one after the flush) rang
        # once more in the attempt that failed: a spurious wake-up, harmless
        assert c.llen(bell_key(namespace, queue)) == 4


def test_the_sender_enqueues_what_it_finds_spooled_in_one_round_trip_in_order(
    bell_settings: Settings, server: RedisServer, made: list[Any], tmp_path: Path
) -> None:
    """Frames spooled while the sender was busy go in one pipeline (``enqueue_many``): the queue holds them
    in spool order, each with a message id of its own, one bell each; a reconcile record between them goes
    to its own queue in the same round trip; an unreadable record is skipped, not sent."""
    queue = bell_settings.user_data_stream.queue_name
    namespace = broker_namespace(bell_settings)
    producer = build_producer_broker(bell_settings)
    made.append(producer)
    pipelines: list[int] = []
    real_pipeline = producer.client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipelines.append(1)
        return real_pipeline(*args, **kwargs)

    producer.client.pipeline = counting_pipeline  # type: ignore[method-assign]  # counts round trips only
    with Spool(str(tmp_path)).open() as spool:
        for i in range(6):
            spool.append(frame_record(queue, 1, "{}", f"many-{i}", 0.0))
        spool.append(b'{"not": "a record"}')
        spool.append(reconcile_record(1, "test"))
        for i in range(6, 10):
            spool.append(frame_record(queue, 1, "{}", f"many-{i}", 0.0))
        sender = SpoolSender(spool, producer, logging.getLogger("test.bell"))
        sender.start()
        try:
            wait_for(lambda: spool.backlog == 0, 10, message="the spool drained")
        finally:
            sender.join(5)
    assert len(pipelines) == 1  # eleven messages, one round trip
    assert sender.sent == 11 and sender.skipped == 1
    with client_of(server) as c:
        ids = c.lrange(f"{namespace}:{queue}", 0, -1)
        assert len(ids) == 10 and len(set(ids)) == 10
        payloads = c.hmget(f"{namespace}:{queue}.msgs", ids)
        frames = [orjson.loads(p)["kwargs"]["frame_id"] for p in payloads]
        assert frames == [f"many-{i}" for i in range(10)]
        assert c.llen(bell_key(namespace, queue)) == 10
        assert c.llen(f"{namespace}:{RECONCILE_QUEUE}") == 1


def test_an_idle_spool_whose_only_record_is_a_reconcile_request_expires_and_its_sender_sleeps_long(
    bell_settings: Settings, server: RedisServer, made: list[Any], tmp_path: Path, monkeypatch: Any
) -> None:
    """A reconcile request needs no acknowledgement: with no frame in flight, the acknowledged cursor moves
    past it, the idle segment expires, and the sender then sleeps until the writer wakes it (it used to
    stay unacknowledged until the next frame, the segment never expired and the sender woke every 30 s)."""
    from kraite_mp.streams import sender as sender_module
    from kraite_mp.streams.sender import EMPTY_READ_WAIT_S, Acks

    monkeypatch.setattr(sender_module, "RETENTION_CHECK_S", 0.0)  # look at the segment's age at every pass
    monkeypatch.setattr(sender_module, "READ_WAIT_S", 0.1)
    queue = bell_settings.user_data_stream.queue_name
    namespace = broker_namespace(bell_settings)
    producer = build_producer_broker(bell_settings)
    made.append(producer)
    client = client_of(server)
    made.append(client)
    with Spool(str(tmp_path), ack_required=True, segment_max_age_s=0.2).open() as spool:
        spool.append(reconcile_record(1, "connect"))
        acks = Acks.for_spool(client, namespace, spool, 1)
        sender = SpoolSender(spool, producer, logging.getLogger("test.bell"), acks=acks)
        sender.start()
        try:
            wait_for(lambda: spool.disk_bytes() == 0, 10, message="the idle segment expired")
            assert spool.holds_nothing and spool.acked_position == spool.sent_position
            assert sender._read_wait() == EMPTY_READ_WAIT_S
            assert client.llen(f"{namespace}:{RECONCILE_QUEUE}") == 1  # the request went first
            spool.append(frame_record(queue, 1, "{}", "after-idle", 0.0))  # the writer wakes the long read
            wait_for(lambda: client.llen(f"{namespace}:{queue}") == 1, 10, message="the frame sent")
            wait_for(lambda: sender.unacked == 1, 10, message="the frame awaiting its acknowledgement")
            assert not spool.holds_nothing
        finally:
            sender.join(5)
