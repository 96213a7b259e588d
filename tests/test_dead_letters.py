"""Dead letters: ``kraite-mp status`` shows them, ``kraite-mp dead-letters list | replay`` brings them back.

The dead letter is made by Dramatiq's own RedisBroker (enqueue, consume, nack: its dispatch.lua moves the
message to ``<ns>:dramatiq:<queue>.XQ``) against real Redis, in a namespace of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from kraite_mp.config.load import load_settings
from kraite_mp.messages import PROCESS_ACTOR, broker_namespace, redis_client

#: Fetch attempts before the test gives up on its own message (each waits up to CONSUME_TIMEOUT_MS).
CONSUME_ATTEMPTS = 50
CONSUME_TIMEOUT_MS = 100


@pytest.fixture()
def env(kraite_env: dict[str, str], redis_url: str) -> Iterator[dict[str, str]]:
    namespace = f"kraite-dl-{uuid.uuid4().hex[:8]}"
    yield dict(kraite_env, KRAITE_REDIS_NAMESPACE=namespace)
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def kraite(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kraite_mp", *args], env=env, capture_output=True, text=True, timeout=60
    )


def dead_letter(env: dict[str, str], account_id: int, frame_id: str) -> str:
    """Enqueue a frame message that already used its retries, fetch it and nack it; its Redis id."""
    settings = load_settings(None, environ=env)
    queue = settings.user_data_stream.queue_name
    broker = RedisBroker(
        client=redis_client(settings.redis_url), namespace=broker_namespace(settings), middleware=[]
    )
    try:
        broker.declare_queue(queue)
        kwargs = {"account_id": account_id, "frame": '{"e":"ORDER_TRADE_UPDATE"}', "frame_id": frame_id}
        message = dramatiq.Message(
            queue_name=queue, actor_name=PROCESS_ACTOR, args=(), kwargs=kwargs, options={"retries": 20}
        )
        sent = broker.enqueue(message)
        consumer = broker.consume(queue, prefetch=1, timeout=CONSUME_TIMEOUT_MS)
        try:
            for _ in range(CONSUME_ATTEMPTS):
                got = next(consumer)
                if got is not None:
                    break
            else:
                pytest.fail("the message never came back from Redis")
            assert got.options["redis_message_id"] == sent.options["redis_message_id"]
            consumer.nack(got)
        finally:
            consumer.close()
        return str(sent.options["redis_message_id"])
    finally:
        broker.close()


@pytest.mark.integration
def test_status_shows_dead_letters_and_replay_brings_them_back(env: dict[str, str]) -> None:
    settings = load_settings(None, environ=env)
    ns, queue = broker_namespace(settings), settings.user_data_stream.queue_name
    client = redis_client(settings.redis_url)
    try:
        first = dead_letter(env, 7, "frame-a")
        second = dead_letter(env, 8, "frame-b")
        assert client.zcard(f"{ns}:{queue}.XQ") == 2

        r = kraite(env, "status")
        assert f"DEAD LETTERS: {queue} 2" in r.stdout, r.stdout + r.stderr

        r = kraite(env, "dead-letters", "list", "--json")
        assert r.returncode == 0, r.stderr
        listed = json.loads(r.stdout)
        assert listed["counts"] == {queue: 2, "reconcile": 0}
        assert [(d["id"], d["account_id"], d["retries"]) for d in listed["dead_letters"]] == [
            (first, 7, 20),
            (second, 8, 20),
        ]
        text = kraite(env, "dead-letters", "list").stdout
        assert f"{queue}: 2 dead letter(s)" in text and "ORDER_TRADE_UPDATE" not in text  # never the frame

        # one by id, then the rest; an id that is no longer dead-lettered is named, exit 1
        r = kraite(env, "dead-letters", "replay", first)
        assert r.returncode == 0 and "replayed 1 dead letter(s)" in r.stdout, r.stderr
        r = kraite(env, "dead-letters", "replay", first)
        assert r.returncode == 1 and "Traceback" not in r.stderr and first in r.stderr
        r = kraite(env, "dead-letters", "replay", "--all")
        assert r.returncode == 0 and "replayed 1 dead letter(s)" in r.stdout, r.stderr
        assert kraite(env, "dead-letters", "replay").returncode == 2  # neither --all nor an id

        assert client.zcard(f"{ns}:{queue}.XQ") == 0 and client.hlen(f"{ns}:{queue}.XQ.msgs") == 0
        assert [i.decode() for i in client.lrange(f"{ns}:{queue}", 0, -1)] == [first, second]
        back = dramatiq.Message.decode(client.hget(f"{ns}:{queue}.msgs", first))
        assert back.kwargs["frame_id"] == "frame-a" and "retries" not in back.options  # a fresh retry budget
        assert "DEAD LETTERS" not in kraite(env, "status").stdout
    finally:
        client.close()


@pytest.mark.integration
def test_dead_letters_redis_unreachable_is_one_line(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = kraite(dict(env, KRAITE_REDIS_URL=f"redis://127.0.0.1:{port}/0"), "dead-letters", "list")
    assert r.returncode == 75 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Redis unreachable at" in r.stderr
