"""A worker that dies (or hangs) with messages in hand: they come back to a live worker after
``jobs.heartbeat_timeout_s``, not Dramatiq's 60 s; a busy worker keeps its heartbeat.

Two real `dramatiq kraite_mp.jobs` processes on a real Redis and PostgreSQL. Worker A's PostgreSQL is a
socket that accepts and never answers, so its threads hang in connect with the messages they fetched;
A is then frozen (SIGSTOP: what a dead host looks like to Redis) and worker B, on the real database,
must audit every frame, A's included, exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from typing import Any

import pytest
import redis
from support import wait_for

from kraite_mp import jobs
from kraite_mp.config.load import load_settings
from kraite_mp.messages import PROCESS_ACTOR, broker_namespace
from kraite_mp.store.accounts import add_account

pytestmark = pytest.mark.integration

FRAMES = 60
#: Short for the test; the default is 10 s.
HEARTBEAT_TIMEOUT_S = "3"


def _audited(db: Any) -> tuple[int, int]:
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT frame_id) FROM api_data_stream")
        rows, distinct = cur.fetchone()
    db.commit()
    return int(rows), int(distinct)


def test_a_frozen_workers_messages_are_processed_by_another_after_the_heartbeat_timeout(
    db: Any, kraite_env: dict[str, str], secret_key: str, processes: Any
) -> None:
    account = add_account(db, secret_key, name="liveness", api_key="k" * 64, api_secret="s" * 64).id
    env = {
        **kraite_env,
        "KRAITE__jobs__heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        # a queue of its own: nothing another test left behind is processed here
        "KRAITE_REDIS_NAMESPACE": f"{kraite_env['KRAITE_REDIS_NAMESPACE']}-liveness-{uuid.uuid4().hex[:8]}",
    }
    settings = load_settings(None, environ=env)
    broker = jobs.build_broker(settings)
    client = redis.Redis.from_url(settings.redis_url)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(256)  # the kernel accepts the TCP connections; nobody ever answers
    worker_cmd = [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "4"]
    a = None
    try:
        for i in range(FRAMES):
            frame = f'{{"e":"TRADE_LITE","E":{1_700_000_000_000 + i},"T":1,"s":"BTCUSDT","q":"1"}}'
            broker.get_actor(PROCESS_ACTOR).send(account, frame, f"{account}-e{i:013d}-liveness", None)
        a = processes.start(
            worker_cmd,
            {**env, "KRAITE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{hole.getsockname()[1]}/x"},
        )
        acks_pattern = f"{broker_namespace(settings)}:__acks__.*"

        def held() -> int:
            return sum(int(client.scard(k)) for k in client.scan_iter(acks_pattern))

        wait_for(lambda: held() > 0, 30, message="worker A holds messages")
        os.killpg(a.pid, signal.SIGSTOP)  # A's processes frozen with them: no heartbeat from now on
        stopped_at = time.monotonic()
        assert held() > 0
        processes.start(worker_cmd, env)  # B
        wait_for(lambda: _audited(db)[0] >= FRAMES, 90, message="worker B audited every frame, A's too")
        took = time.monotonic() - stopped_at
        time.sleep(1.0)  # a late duplicate would show now
        assert _audited(db) == (FRAMES, FRAMES)  # none lost, none twice
        print(
            f"\nA frozen -> all {FRAMES} frames audited by B in {took:.1f}s (heartbeat timeout {HEARTBEAT_TIMEOUT_S}s)"
        )
    finally:
        if a is not None and a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
        hole.close()
        client.close()
        broker.close()
