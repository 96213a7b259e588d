"""The queue contract between the stream children (producers) and ``dramatiq kraite_mp.jobs`` (consumers).

Both sides import this module and nothing of each other: actor and queue names, the broker's Redis
namespace, the spool record <-> Dramatiq message mapping, the end-to-end acknowledgement keys, the frame
ids minted on receipt (a frame's identity comes from its content), and the doorbell a producer rings with
every frame it enqueues (``DoorbellBroker``; ``broker.KraiteRedisBroker`` waits for it).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import uuid4

import dramatiq
import orjson
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis

if TYPE_CHECKING:
    from kraite_mp.config import Settings

T = TypeVar("T")

#: Actor and queue names shared with ``kraite_mp.jobs`` (the frame queue is ``user_data_stream.queue_name``).
PROCESS_ACTOR = "process_user_data_event"
RECONCILE_ACTOR = "reconcile_account_job"
RECONCILE_QUEUE = "reconcile"

#: Redis socket timeouts: a hung Redis must not hang the sender (or a worker) forever.
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 2.0


def broker_namespace(settings: Settings) -> str:
    """Redis key prefix of the Dramatiq queues: ``<redis_namespace>:dramatiq``."""
    return f"{settings.redis_namespace}:dramatiq"


_driver_info: Any = None


def redis_driver_info() -> Any:
    """redis-py's DriverInfo (CLIENT SETINFO), built once per process tree: redis-py would otherwise
    scan the installed packages' metadata (``importlib.metadata``) for every new connection, which
    costs ~1 MB of private memory in every forked child (the supervisor builds it before forking)."""
    global _driver_info
    if _driver_info is None:
        from redis.driver_info import DriverInfo

        _driver_info = DriverInfo()
    return _driver_info


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
        driver_info=redis_driver_info(),
    )


#: Bells a queue's doorbell keeps (a burst leaves at most this many spurious wake-ups behind) ...
BELL_MAX = 64
#: ... and how long an unanswered doorbell lives after its last ring (ms).
BELL_TTL_MS = 60_000


def bell_key(namespace: str, queue_name: str) -> str:
    """The doorbell of a queue: a short list, one element per message enqueued (``namespace``: the broker's)."""
    return f"{namespace}:__bell__.{queue_name}"


class DoorbellBroker(RedisBroker):
    """A RedisBroker that rings a queue's doorbell with every message it enqueues on one of ``bell_queues``.

    The ring is an RPUSH onto ``bell_key`` (LTRIM to ``BELL_MAX``, PEXPIRE ``BELL_TTL_MS``) pipelined after
    Dramatiq's own enqueue script, in the same round trip: the message is in the queue before its bell. The
    consumer of such a queue blocks in BLPOP on the bell after an empty fetch instead of sleeping
    (``broker.KraiteRedisBroker``); a message that comes without a bell (an older producer, Dramatiq's requeue
    of a dead worker's messages) waits for the consumer's bounded BLPOP timeout at most.
    """

    def __init__(self, *, bell_queues: Collection[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]  # dramatiq's __init__ is unannotated
        self.bell_queues = frozenset(bell_queues)
        self._script_loaded = False

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> Any:
        """``RedisBroker.enqueue``'s Redis call (Dramatiq's ``do_*`` dispatch), with the bell of a bell queue."""
        if queue_name not in self.bell_queues:
            return self._dispatch("enqueue")(queue_name, message_id, data)  # type: ignore[no-untyped-call]
        script = self.scripts["dispatch"]
        # the arguments of Dramatiq's RedisBroker._dispatch, sent with EVALSHA in the bell's pipeline: a
        # Script object in a pipeline would cost a SCRIPT EXISTS round trip on every execute
        args = self._enqueue_args(queue_name, message_id, data)
        bell = bell_key(self.namespace, queue_name)

        def send() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, 1, self.namespace, *args)
            ring_bell(pipe, bell)
            return pipe.execute()[0]

        return self._with_script(send)

    def _with_script(self, send: Callable[[], T]) -> T:
        """``send()``, a pipeline calling the dispatch script by its sha; a Redis that does not have it (this
        process's first call into it, or it restarted or flushed its scripts) gets it loaded and ``send()``
        again: none of the pipeline's scripts ran, and the bells it rang are spurious wake-ups."""
        script = self.scripts["dispatch"]
        try:
            return send()
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.script)
            return send()

    def _enqueue_args(self, queue_name: str, message_id: str, data: bytes) -> list[Any]:
        """The arguments of Dramatiq's ``dispatch`` script for one enqueue (as ``RedisBroker._dispatch``)."""
        return [
            "enqueue",
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance("enqueue"),
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
            message_id,
            data,
        ]

    def enqueue_many(self, messages: Sequence[dramatiq.Message[Any]]) -> None:
        """``enqueue`` each of ``messages`` (no delay), in order, in one round trip: one pipeline of Dramatiq's
        enqueue script per message, then the bells (one ring per message of a bell queue). On a Redis error
        any prefix of them may be in Redis: the caller sends them again (at least once; the jobs are
        idempotent)."""
        script = self.scripts["dispatch"]
        calls: list[list[Any]] = []
        rings: dict[str, int] = {}
        # a Redis message id of its own per message, as RedisBroker.enqueue gives it
        copies = [m.copy(options={"redis_message_id": str(uuid4())}) for m in messages]
        for message in copies:
            self.emit_before("enqueue", message, None)
            queue_name = message.queue_name
            calls.append(
                self._enqueue_args(queue_name, message.options["redis_message_id"], message.encode())
            )
            if queue_name in self.bell_queues:
                bell = bell_key(self.namespace, queue_name)
                rings[bell] = rings.get(bell, 0) + 1

        def send() -> None:
            pipe = self.client.pipeline(transaction=False)
            for args in calls:
                pipe.evalsha(script.sha, 1, self.namespace, *args)
            for bell, count in rings.items():
                ring_bell(pipe, bell, count)
            pipe.execute()

        if not self._script_loaded:  # else the first batch of a process would fail and ring its bells twice
            self.client.script_load(script.script)
            self._script_loaded = True
        self._with_script(send)
        for message in copies:
            self.emit_after("enqueue", message, None)

    def ring(self, queue_name: str) -> None:
        """Ring the bell of ``queue_name`` on its own (messages that came back to the queue another way)."""
        if queue_name in self.bell_queues:
            pipe = self.client.pipeline(transaction=False)
            ring_bell(pipe, bell_key(self.namespace, queue_name))
            pipe.execute()


def ring_bell(pipe: Any, key: str, count: int = 1) -> None:
    """Queue ``count`` rings of the doorbell ``key`` on ``pipe``: bounded in length and in time."""
    pipe.rpush(key, *([b"1"] * min(count, BELL_MAX)))
    pipe.ltrim(key, -BELL_MAX, -1)
    pipe.pexpire(key, BELL_TTL_MS)


def build_producer_broker(settings: Settings) -> DoorbellBroker:
    """A bare RedisBroker (no middleware, no actors) for enqueueing only, that rings the frame queue's
    doorbell; build it after the fork."""
    return DoorbellBroker(
        client=redis_client(settings.redis_url),
        namespace=broker_namespace(settings),
        middleware=[],
        bell_queues={settings.user_data_stream.queue_name},
    )


#: An acknowledgement key lives this long after its last acknowledgement (a spool that is gone leaves
#: nothing behind for long).
ACK_KEY_TTL_S = 7 * 86400


def ack_key(namespace: str, spool_id: str) -> str:
    """The sorted set of the spool positions whose audit a worker committed (``streams.sender``)."""
    return f"{namespace}:spool-ack:{spool_id}"


def epoch_key(namespace: str) -> str:
    """A random value set once per broker lifetime: a broker that lost its data has another or none."""
    return f"{namespace}:broker-epoch"


def acknowledge(client: redis.Redis, ack: Any) -> bool:
    """Record a committed frame's acknowledgement token (``[ack_key, position]``); False if malformed."""
    if not isinstance(ack, (list, tuple)) or len(ack) != 2:
        return False
    key, position = ack
    if not isinstance(key, str) or not key or isinstance(position, bool) or not isinstance(position, int):
        return False
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, {str(position): position})
    pipe.expire(key, ACK_KEY_TTL_S)
    pipe.execute()
    return True


def frame_record(queue_name: str, account_id: int, frame: str, frame_id: str, received_at_ms: float) -> bytes:
    """One spool record: the message to enqueue for a received frame."""
    return orjson.dumps(
        {
            "q": queue_name,
            "a": PROCESS_ACTOR,
            "k": {
                "account_id": account_id,
                "frame": frame,
                "frame_id": frame_id,
                "received_at": received_at_ms,
            },
        }
    )


def reconcile_record(account_id: int, reason: str, gap_start_ms: int | None = None) -> bytes:
    """A reconcile request; ``gap_start_ms``: since when the stream was down (known after a reconnect)."""
    kwargs: dict[str, Any] = {"account_id": account_id, "reason": reason}
    if gap_start_ms is not None:
        kwargs["gap_start_ms"] = gap_start_ms
    return orjson.dumps({"q": RECONCILE_QUEUE, "a": RECONCILE_ACTOR, "k": kwargs})


def record_message(data: bytes, ack: Any = None) -> dramatiq.Message[Any]:
    """The Dramatiq message of a spool record; ValueError when the record is not one.

    ``ack`` (``[ack_key, position]``) is added to a frame message: the worker acknowledges it once the
    frame's audit row is committed."""
    try:
        rec = orjson.loads(data)
        queue_name, actor_name, kwargs = rec["q"], rec["a"], rec["k"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ValueError("not a spool record") from None
    if not isinstance(queue_name, str) or not isinstance(actor_name, str) or not isinstance(kwargs, dict):
        raise ValueError("not a spool record")
    if ack is not None and actor_name == PROCESS_ACTOR:
        kwargs["ack"] = ack
    return dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=(), kwargs=kwargs, options={})


#: Hex digits of the content digest in a frame id (96 bits: no two different frames of one account share it).
FRAME_DIGEST_BYTES = 12


def event_time_ms(text: str) -> int | None:
    """The frame's event time ``E`` (a number or a numeric string; inside ``data`` of a wrapped frame)."""
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(payload, dict) and "E" not in payload and isinstance(payload.get("data"), dict):
        payload = payload["data"]
    if not isinstance(payload, dict):
        return None
    value = payload.get("E")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def event_type_of(text: str) -> str:
    """The frame's event type ``e`` for a metric label: one of a few dozen names, else "other"."""
    start = text.find('"e":"')
    if start < 0:
        return "other"
    start += 5
    end = text.find('"', start, start + 40)
    name = text[start:end] if end > 0 else ""
    return name if name.replace("_", "").isalnum() else "other"


class FrameIds:
    """Frame ids: the frame's identity from its content, so every copy of one event gets the same id.

    ``<account>-e<event time E, ms, 13 digits>-<digest of the text>`` for every frame with an event time:
    the same event received on two connections (a make-before-break rollover, two hosts during a
    handover) or delivered twice in any way is audited once. A frame without one (malformed, unknown)
    cannot be recognised again and gets a unique id, ``<account>-r<receive µs, 16 digits>-<run>-<seq>``:
    ``run`` is random per process, so two incarnations (or two hosts) never mint the same one.
    """

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.run = os.urandom(4).hex()
        self._seq = 0
        self._lock = threading.Lock()

    def for_frame(self, text: str, received_us: int | None = None) -> str:
        """The id of a received frame (``text`` as it is audited: scrubbed of the listenKey)."""
        event_time = event_time_ms(text)
        if event_time is None:
            return self.next(received_us)
        digest = hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), digest_size=FRAME_DIGEST_BYTES
        ).hexdigest()
        return f"{self.account_id}-e{event_time:013d}-{digest}"

    def next(self, received_us: int | None = None) -> str:
        """A unique, time-ordered id (for what has no content identity)."""
        if received_us is None:
            received_us = time.time_ns() // 1000
        with self._lock:
            self._seq += 1
            seq = self._seq
        return f"{self.account_id}-r{received_us:016d}-{self.run}-{seq:010d}"
