"""The queue contract between the stream children (producers) and ``dramatiq kraite_mp.jobs`` (consumers).

Both sides import this module and nothing of each other: actor and queue names, the broker's Redis
namespace, the spool record <-> Dramatiq message mapping, and the frame ids minted on receipt.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import dramatiq
import orjson
import redis
from dramatiq.brokers.redis import RedisBroker

if TYPE_CHECKING:
    from kraite_mp.config import Settings

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


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
    )


def build_producer_broker(settings: Settings) -> RedisBroker:
    """A bare RedisBroker (no middleware, no actors) for enqueueing only; build it after the fork."""
    return RedisBroker(  # type: ignore[no-untyped-call]  # dramatiq's __init__ is unannotated
        client=redis_client(settings.redis_url), namespace=broker_namespace(settings), middleware=[]
    )


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


def reconcile_record(account_id: int, reason: str) -> bytes:
    return orjson.dumps(
        {"q": RECONCILE_QUEUE, "a": RECONCILE_ACTOR, "k": {"account_id": account_id, "reason": reason}}
    )


def record_message(data: bytes) -> dramatiq.Message[Any]:
    """The Dramatiq message of a spool record; ValueError when the record is not one."""
    try:
        rec = orjson.loads(data)
        queue_name, actor_name, kwargs = rec["q"], rec["a"], rec["k"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ValueError("not a spool record") from None
    if not isinstance(queue_name, str) or not isinstance(actor_name, str) or not isinstance(kwargs, dict):
        raise ValueError("not a spool record")
    return dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=(), kwargs=kwargs, options={})


class FrameIds:
    """Unique, time-ordered frame ids: ``<account>-<receive µs, 16 digits>-<run>-<seq>``.

    ``run`` is random per process, so two incarnations of a child (or two processes, by mistake)
    never mint the same id even if the clock steps back; ``seq`` orders frames within one run.
    """

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.run = os.urandom(4).hex()
        self._seq = 0
        self._lock = threading.Lock()

    def next(self, received_us: int | None = None) -> str:
        if received_us is None:
            received_us = time.time_ns() // 1000
        with self._lock:
            self._seq += 1
            seq = self._seq
        return f"{self.account_id}-{received_us:016d}-{self.run}-{seq:010d}"
