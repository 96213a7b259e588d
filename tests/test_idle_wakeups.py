"""An idle stream sleeps in one blocking call: deadlines fold into the poll, other threads wake it (issue 17).

Real loopback WebSocket connections to the simulator's user-data route. A stream whose longest wait
(``recv_timeout_s``) is long must still wake for its ping deadline, for a frame the moment it arrives, and
for ``stop`` set by another thread; and with nothing due it must not go round its loop more than its
deadlines ask. Counts, not timings: passes of ``loop`` and pings sent, with generous bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from kraite_mp.backoff import Attempts
from kraite_mp.config.load import load_settings
from kraite_mp.store.accounts import Account
from kraite_mp.streams.connection import WebSocketStream
from kraite_mp.streams.liveness import PONG_BEHIND_DATA_FACTOR, Disconnect, Liveness, Reason
from kraite_mp.streams.userdata import UserDataStream
from kraite_mp.streams.userdata import liveness as user_data_liveness
from kraite_mp.supervisor.context import IDLE_BEAT_MAX_S, ChildContext, idle_beat_s
from kraite_mp.wakeup import WakeEvent


class CountingStream(WebSocketStream):
    """The shared loop on one account's user-data stream; counts loop passes, beats and frames."""

    def __init__(self, url: str, lv: Liveness, stop: threading.Event) -> None:
        super().__init__(lv, Attempts(base_s=1.0, cap_exponent=1), stop, logging.getLogger("test.idle"))
        self.url = url
        self.passes = 0
        self.beats = 0
        self.frames: list[bytes] = []
        self.disconnects: list[Disconnect] = []

    def connect_url(self) -> str | None:
        return self.url

    def on_frame(self, data: bytes) -> bool:
        self.frames.append(data)
        return True

    def beat(self, state: str | None = None) -> None:
        self.beats += 1

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        self.disconnects.append(d)

    def loop(self) -> None:
        self.passes += 1
        super().loop()


def user_data_url(sim: Any) -> str:
    account = sim.accounts[0]
    r = requests.post(
        f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": account.api_key}, timeout=5
    )
    assert r.status_code == 200, r.text
    return f"{sim.ws_url}/private/ws?listenKey={r.json()['listenKey']}"


def liveness(**overrides: float) -> Liveness:
    values: dict[str, Any] = {
        "ping_interval_s": 600.0,
        "pong_timeout_s": 600.0,
        "silence_s": 1200.0,
        "recv_timeout_s": 600.0,
        "connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return Liveness(**values)


@contextlib.contextmanager
def running(stream: CountingStream) -> Iterator[threading.Thread]:
    """Run ``stream`` in a thread; at the end set its stop and require the thread to end."""
    t = threading.Thread(target=stream.run, name="idle-stream", daemon=True)
    t.start()
    try:
        yield t
    finally:
        stream.stop.set()
        t.join(5.0)
    assert not t.is_alive(), "the stream's thread must end once its stop is set"


def wait_until(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


@pytest.mark.unit
def test_a_wake_event_is_readable_exactly_while_set() -> None:
    e = WakeEvent()
    e.set()  # before the pipe exists: the pipe is made readable when it is made
    fd = e.fileno()
    assert select.select([fd], [], [], 0)[0] == [fd]
    e.clear()
    assert select.select([fd], [], [], 0)[0] == []
    assert not e.is_set()
    for _ in range(100_000 // 64):  # many sets never block the setter (a full pipe is readable already)
        e.set()
    assert select.select([fd], [], [], 0)[0] == [fd]
    e.clear()
    assert select.select([fd], [], [], 0)[0] == []
    assert e.wait(0) is False


@pytest.mark.unit
def test_the_idle_beat_is_what_liveness_needs_not_once_a_second() -> None:
    assert idle_beat_s(60.0) == 15.0  # the default heartbeat timeout: a beat every 15 s when idle
    assert idle_beat_s(600.0) == IDLE_BEAT_MAX_S  # `kraite-mp status` calls 30 s STALE
    assert idle_beat_s(2.0) == 1.0  # never more often than the busy rate
    settings = load_settings(None, environ={})
    lv = user_data_liveness(settings, account_id=3)
    # the user-data child's longest wait is its idle beat; pings (30 s) and watchdogs are deadlines in it
    assert lv.recv_timeout_s == idle_beat_s(settings.supervisor.heartbeat_timeout_s) == 15.0
    assert lv.ping_interval_s == settings.user_data_stream.ping_interval_s
    account = Account(id=3, name="a", exchange="binance", api_key="k" * 16, api_secret_token="t")
    ctx = ChildContext(settings, "user-data", account)
    assert isinstance(ctx.stop, WakeEvent) and ctx.idle_beat_s == 15.0
    stream = UserDataStream(ctx, account)
    assert stream.beat_due_in(time.monotonic()) == 0.0  # never beaten: due now


@pytest.mark.integration
def test_an_idle_stream_wakes_only_for_its_deadlines_and_at_once_for_a_stop(simulator: Any) -> None:
    stop = WakeEvent()
    stream = CountingStream(user_data_url(simulator), liveness(), stop)
    with running(stream) as t:
        assert simulator.wait_for_connections(simulator.accounts[0].api_key, 1, timeout=5)
        assert wait_until(lambda: stream.ws is not None, 5)
        passes = stream.passes
        time.sleep(1.5)
        # nothing due for 600 s: the loop sits in one poll (a fixed 1 s receive step went round at least once)
        assert stream.passes - passes <= 1, stream.passes - passes
        stop.set()  # from another thread, as the signal relay does
        t.join(5.0)
        assert not t.is_alive(), "a stop set by another thread must end the wait for a frame"
    assert stream.ws is None
    assert not stream.disconnects


@pytest.mark.integration
def test_the_ping_deadline_is_kept_with_a_long_longest_wait(simulator: Any) -> None:
    stop = WakeEvent()
    stream = CountingStream(user_data_url(simulator), liveness(ping_interval_s=0.2, pong_timeout_s=5.0), stop)
    with running(stream):
        # the longest wait is 600 s; only the folded-in ping deadline can make these pings go out
        assert wait_until(lambda: stream._pings >= 3, 10), stream._pings
        assert not stream.disconnects  # every pong came back in time


@pytest.mark.integration
def test_a_frame_is_read_the_moment_it_arrives_not_at_the_next_deadline(simulator: Any) -> None:
    stop = WakeEvent()
    stream = CountingStream(user_data_url(simulator), liveness(), stop)
    with running(stream):
        key = simulator.accounts[0].api_key
        assert simulator.wait_for_connections(key, 1, timeout=5)
        assert wait_until(lambda: stream.ws is not None, 5)
        simulator.step(key, 3)
        # the longest wait is 600 s: frames read within the bound can only have woken the poll
        assert wait_until(lambda: len(stream.frames) >= 3, 10), len(stream.frames)


@pytest.mark.integration
def test_a_wake_fd_of_the_stream_ends_the_wait_without_touching_the_connection(simulator: Any) -> None:
    bell = WakeEvent()

    class Belled(CountingStream):
        def wake_fds(self) -> list[int]:
            return [*super().wake_fds(), bell.fileno()]

    stop = WakeEvent()
    stream = Belled(user_data_url(simulator), liveness(), stop)
    with running(stream):
        assert wait_until(lambda: stream.ws is not None, 5)
        passes = stream.passes
        bell.set()
        assert wait_until(lambda: stream.passes > passes, 5)  # woken by the bell ...
        bell.clear()
        assert stream.ws is not None and not stream.disconnects  # ... and the connection is untouched
    assert os.get_blocking(bell.fileno()) is False


# -- a pong queued behind data -----------------------------------------------------------------------


def feed(sim: Any, key: str, stream: CountingStream, count: int, every_s: float) -> list[bytes]:
    """Send ``count`` numbered raw frames to ``key``'s connection, one every ``every_s``; those that found one."""
    sent = []
    for i in range(count):
        text = f'{{"e":"TEST","n":{i}}}'
        if sim.send_raw(key, text):
            sent.append(text.encode())
        time.sleep(every_s)
    return sent


@pytest.mark.integration
def test_a_late_pong_behind_flowing_frames_keeps_the_connection(simulator: Any) -> None:
    """The server answers pings in order: under a burst the pong waits behind the frames sent before it.
    Frames arriving after the ping prove the connection delivers; leaving it would lose what is in flight."""
    stop = WakeEvent()
    stream = CountingStream(user_data_url(simulator), liveness(ping_interval_s=0.2, pong_timeout_s=0.5), stop)
    with running(stream):
        key = simulator.accounts[0].api_key
        assert wait_until(lambda: stream.ws is not None, 5)
        assert simulator.delay_pongs(key, 1.2) == 1  # twice the pong timeout, within its deferral
        sent = feed(simulator, key, stream, 40, 0.1)  # 4 s of frames, a frame every 0.1 s
        assert len(sent) == 40
        assert wait_until(lambda: len(stream.frames) >= len(sent), 10), len(stream.frames)
        assert stream.frames == sent
        assert not stream.disconnects, [str(d) for d in stream.disconnects]
        assert stream._pings >= 2  # pongs did come (late): each answered ping let the next one go


@pytest.mark.integration
def test_a_pong_that_never_comes_ends_a_delivering_connection_gracefully(simulator: Any) -> None:
    """Not trusted forever: past PONG_BEHIND_DATA_FACTOR x pong_timeout_s it is left, drained, not dropped."""
    stop = WakeEvent()
    lv = liveness(ping_interval_s=0.2, pong_timeout_s=0.3)
    stream = CountingStream(user_data_url(simulator), lv, stop)
    with running(stream):
        key = simulator.accounts[0].api_key
        assert wait_until(lambda: stream.ws is not None, 5)
        assert wait_until(lambda: stream._pings >= 1 and stream._ping_sent_at is None, 5)
        assert simulator.delay_pongs(key, 600) == 1
        started = time.monotonic()
        sent = feed(simulator, key, stream, 40, 0.1)
        assert wait_until(lambda: bool(stream.disconnects), 10)
        first = stream.disconnects[0]
        assert first.reason is Reason.PONG_TIMEOUT and "while frames kept coming" in first.detail
        assert first.drain  # read to the server's close frame, not dropped
        # every frame sent reached the stream, in order: on the old connection (drained) or the new one
        assert wait_until(lambda: stream.frames[: len(sent)] == sent, 5), (len(stream.frames), len(sent))
        assert time.monotonic() - started >= lv.pong_timeout_s * PONG_BEHIND_DATA_FACTOR
    assert simulator.stats()["ws_opened"].get(key, 0) >= 1
