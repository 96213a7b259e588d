"""The spool sender: order, cursor and the shared backoff through a Redis outage (a scripted broker)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from kraite_mp.backoff import Attempts
from kraite_mp.messages import frame_record
from kraite_mp.streams.sender import SpoolSender
from kraite_mp.streams.spool import Spool

pytestmark = pytest.mark.unit


class FlakyBroker:
    """Refuses the first ``failures`` enqueues like a Redis that is down, then accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def enqueue(self, message: Any) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise redis.ConnectionError("Connection refused")
            self.sent.append(message.kwargs["frame_id"])


def test_sender_keeps_order_through_an_outage_and_resets_its_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="test.sender")
    broker = FlakyBroker(failures=3)
    with Spool(str(tmp_path)).open() as spool:
        for i in range(20):
            spool.append(frame_record("user-data-stream", 1, "{}", f"1-{i:04d}", 0.0))
        sender = SpoolSender(spool, broker, logging.getLogger("test.sender"))  # type: ignore[arg-type]
        delays: list[float] = []
        attempts = Attempts(base_s=0.01, cap_exponent=2, jitter_ratio=0.0)
        next_delay = attempts.next_delay

        def recording() -> float:
            delays.append(next_delay())
            return delays[-1]

        attempts.next_delay = recording  # type: ignore[method-assign]
        sender.attempts = attempts
        sender.start()
        deadline = time.monotonic() + 10
        while len(broker.sent) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        sender.join(5)
        assert broker.sent == [f"1-{i:04d}" for i in range(20)]  # none lost, none twice, in order
        assert spool.backlog == 0
    assert delays == [0.01, 0.02, 0.04]  # backoff_delay, not a formula of its own
    assert sender.redis_ok and attempts.count == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Redis unavailable (ConnectionError: Connection refused)") for m in messages)
    assert any(m.startswith("Redis is back") for m in messages)
