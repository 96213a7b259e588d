"""The shared WebSocket loop: reconnect delay, the healthy-after rule, and liveness on a scripted socket."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import websocket

from kraite_mp import exitcodes
from kraite_mp.backoff import Attempts, backoff_delay
from kraite_mp.config import ConfigError
from kraite_mp.config.load import load_settings
from kraite_mp.store.accounts import Account
from kraite_mp.streams import connection
from kraite_mp.streams.connection import WebSocketStream
from kraite_mp.streams.liveness import (
    DRAIN_TIMEOUT_S,
    Disconnect,
    Liveness,
    Reason,
    jittered_max_age,
    reconnect_delay,
)
from kraite_mp.streams.markprice import MarkPriceStreamer
from kraite_mp.streams.userdata import UserDataStream, liveness
from kraite_mp.supervisor.context import ChildContext

pytestmark = pytest.mark.unit

TEXT, PONG, CLOSE = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_PONG, websocket.ABNF.OPCODE_CLOSE


def attempts(healthy_after_s: float = 60.0) -> Attempts:
    return Attempts(base_s=1.0, cap_exponent=3, jitter_ratio=0.0, healthy_after_s=healthy_after_s)


# -- the rule --------------------------------------------------------------------------------------


def test_backoff_grows_capped_and_attempts_count() -> None:
    a = attempts()
    assert [a.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert a.count == 6
    a.reset()
    assert a.next_delay() == 1.0
    jittered = Attempts(base_s=2.0, jitter_ratio=0.5, rng=random.Random(1))
    delay = jittered.next_delay()
    assert 2.0 <= delay <= 3.0 and delay == backoff_delay(
        0, base_s=2.0, jitter_ratio=0.5, rng=random.Random(1)
    )


def test_unplanned_reconnects_back_off_until_a_healthy_run() -> None:
    a = attempts(healthy_after_s=60.0)
    # a server that accepts and drops us at once (or refuses us) never gets a hot loop
    assert [reconnect_delay(a, False, 1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert reconnect_delay(a, False, None) == 8.0
    assert reconnect_delay(a, False, 59.9) == 8.0  # up, but not for healthy_after_s
    # a connection that stayed up healthy_after_s starts the backoff over
    assert reconnect_delay(a, False, 60.0) == 1.0
    assert reconnect_delay(a, False, 0.5) == 2.0


def test_planned_reconnects_are_immediate_after_a_healthy_run() -> None:
    a = attempts(healthy_after_s=60.0)
    assert reconnect_delay(a, True, 86_000.0) == 0.0
    assert a.count == 0  # and cost nothing
    assert reconnect_delay(a, True, 3600.0) == 0.0
    assert a.count == 0
    # a key that dies at once: the first reconnect is still immediate, the next ones back off
    assert reconnect_delay(a, True, 0.2) == 0.0
    assert reconnect_delay(a, True, 0.2) == 2.0
    assert reconnect_delay(a, True, 0.2) == 4.0
    # ... until one run is healthy again
    assert reconnect_delay(a, True, 61.0) == 0.0


def test_planned_reasons() -> None:
    assert {r for r in Reason if r.planned} == {
        Reason.MAX_AGE,
        Reason.LISTEN_KEY_EXPIRED,
        Reason.LISTEN_KEY_LOST,
    }
    assert str(Disconnect(Reason.PONG_TIMEOUT, "no pong for 10.0s")) == "pong-timeout: no pong for 10.0s"
    assert str(Disconnect(Reason.MAX_AGE)) == "max-connection-age"
    # a disconnect is planned as its reason says, unless told (the server's close, by uptime)
    assert Disconnect(Reason.MAX_AGE).planned and not Disconnect(Reason.SERVER_CLOSED).planned
    assert Disconnect(Reason.SERVER_CLOSED, planned=True).planned


def test_both_streams_use_the_one_healthy_after_setting() -> None:
    settings = load_settings(
        None,
        environ={"KRAITE__supervisor__healthy_after_s": "7.5", "KRAITE__supervisor__backoff_base_s": "0.3"},
    )
    mark_price = MarkPriceStreamer(settings, ChildContext(settings, "mark-price"))
    account = Account(id=3, name="a", exchange="binance", api_key="k" * 16, api_secret_token="t")
    user_data = UserDataStream(ChildContext(settings, "user-data", account), account)
    for stream in (mark_price, user_data):
        assert stream.attempts.healthy_after_s == 7.5
        assert stream.attempts.base_s == 0.3
    assert mark_price.writer.attempts.base_s == 0.3
    assert mark_price.liveness.silence_s == settings.mark_price.watchdog_s
    assert mark_price.liveness.max_age_s is None
    lv = liveness(settings)
    cfg = settings.user_data_stream
    assert lv.max_age_s == cfg.max_connection_age_s
    assert lv.silence_s == cfg.ping_interval_s + cfg.pong_timeout_s
    assert lv.drain_timeout_s == cfg.drain_timeout_s == 2.0
    assert mark_price.liveness.drain_timeout_s == DRAIN_TIMEOUT_S
    drain = "KRAITE__user_data_stream__drain_timeout_s"
    assert liveness(load_settings(None, environ={drain: "0.5"})).drain_timeout_s == 0.5
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match=r"user_data_stream\.drain_timeout_s: must be > 0"):
            load_settings(None, environ={drain: bad})


def test_user_data_logs_a_planned_disconnect_at_info_and_a_failure_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(None, environ={})
    account = Account(id=4, name="a", exchange="binance", api_key="k" * 16, api_secret_token="t")
    stream = UserDataStream(ChildContext(settings, "user-data", account), account)
    with caplog.at_level(logging.INFO, logger=stream.log.name):
        stream.on_disconnected(Disconnect(Reason.SERVER_CLOSED, planned=True), 0.0)
        stream.on_disconnected(Disconnect(Reason.SERVER_CLOSED), 1.0)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "disconnected (server-closed); reconnecting in 0.0s"),
        (logging.WARNING, "disconnected (server-closed); reconnecting in 1.0s"),
    ]


# -- the loop on a scripted socket ---------------------------------------------------------------


class FakeSocket:
    """Stands in for ``websocket.WebSocket``: replays a script of (opcode, data) or exceptions.

    ``on_close`` is what the server had already sent when our close frame went out: it is appended
    to the script by ``send_close``. ``closed`` is "graceful" once the socket was dropped after our
    close frame, "abrupt" if it was dropped without one.
    """

    def __init__(self, script: list[Any], on_close: list[Any] | None = None) -> None:
        self.script = list(script)
        self.on_close = list(on_close or [])
        self.pings: list[bytes] = []
        self.close_sent = 0
        self.dropped = False
        self.read_after_drop = 0

    @property
    def closed(self) -> str | None:
        if not self.dropped:
            return None
        return "graceful" if self.close_sent else "abrupt"

    def settimeout(self, timeout: float) -> None:
        pass

    def ping(self, payload: bytes) -> None:
        self.pings.append(payload)

    def recv_data_frame(self, control_frame: bool = True) -> tuple[int, Any]:
        if self.dropped:
            self.read_after_drop += 1
        if not self.script:
            time.sleep(0.002)
            raise websocket.WebSocketTimeoutException("timed out")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        opcode, data = item
        return opcode, SimpleNamespace(data=data(self) if callable(data) else data)

    def send_close(self, status: int = 1000, reason: bytes = b"") -> None:
        self.close_sent += 1
        self.script += self.on_close
        self.on_close = []

    def close(self, timeout: float | None = None) -> None:
        raise AssertionError("websocket-client's close() discards the frames on the way to the close frame")

    def shutdown(self) -> None:
        self.dropped = True


class ScriptedStream(WebSocketStream):
    def __init__(self, lv: Liveness, a: Attempts, alive: bool = True) -> None:
        super().__init__(lv, a, threading.Event(), logging.getLogger("test.connection"))
        self.alive = alive
        self.frames: list[bytes] = []
        self.events: list[Any] = []
        self.url = "ws://127.0.0.1:9/private/ws?listenKey=SECRETKEY"

    def connect_url(self) -> str | None:
        return self.url

    def on_connected(self) -> None:
        self.events.append(("connected", self.connect_reason))

    def on_frame(self, data: bytes) -> bool:
        self.frames.append(data)
        return self.alive

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        self.events.append((d.reason, d.detail, delay_s))

    def disconnects(self) -> list[Any]:
        return [e for e in self.events if e[0] != "connected"]


def fast(**overrides: Any) -> Liveness:
    values: dict[str, Any] = {
        "ping_interval_s": 60.0,
        "pong_timeout_s": 60.0,
        "silence_s": 60.0,
        "recv_timeout_s": 0.01,
        "connect_timeout_s": 1.0,
    }
    values.update(overrides)
    return Liveness(**values)


def run_until(stream: WebSocketStream, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        stream.loop()


@pytest.fixture()
def sockets(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Scripts (or exceptions) handed out by ``create_connection``, one per connect."""
    queue: list[Any] = []

    def create_connection(url: str, **kwargs: Any) -> FakeSocket:
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, FakeSocket)
        return item

    monkeypatch.setattr(connection.websocket, "create_connection", create_connection)
    return queue


def test_pong_must_echo_the_ping_or_the_connection_times_out(sockets: list[Any]) -> None:
    ws = FakeSocket([(PONG, lambda s: s.pings[-1]), (PONG, b"not ours")])
    sockets.append(ws)
    stream = ScriptedStream(fast(ping_interval_s=0.0, pong_timeout_s=0.2), attempts())
    started = time.monotonic()
    run_until(stream, lambda: bool(stream.disconnects()))
    assert time.monotonic() - started >= 0.2
    assert ws.pings == [b"1", b"2"]  # the first was answered, the second never
    ((reason, detail, delay),) = stream.disconnects()
    assert reason is Reason.PONG_TIMEOUT and detail.startswith("no pong for") and delay == 1.0
    assert ws.closed == "abrupt" and stream.ws is None
    assert stream.connect_reason == "reconnect:pong-timeout"


def test_silence_counts_only_frames_the_stream_calls_alive(sockets: list[Any]) -> None:
    ws = FakeSocket([(TEXT, b"garbage")] * 10_000)
    sockets.append(ws)
    stream = ScriptedStream(fast(silence_s=0.1), attempts(), alive=False)
    run_until(stream, lambda: bool(stream.disconnects()))
    assert stream.disconnects()[0][0] is Reason.SILENT and stream.frames


def test_server_close_backs_off_and_reconnects_with_the_reason(sockets: list[Any]) -> None:
    sockets += [FakeSocket([(TEXT, b"a"), (CLOSE, b"")]), FakeSocket([(TEXT, b"b")])]
    a = Attempts(base_s=0.05, jitter_ratio=0.0)
    stream = ScriptedStream(fast(), a)
    run_until(stream, lambda: len(stream.frames) == 2)
    assert stream.events[0] == ("connected", "connect")
    assert stream.events[1] == (Reason.SERVER_CLOSED, "", 0.05)
    assert stream.events[2] == ("connected", "reconnect:server-closed")
    assert a.count == 1


def test_max_age_is_planned_graceful_and_immediate_after_a_healthy_run(sockets: list[Any]) -> None:
    first = FakeSocket([])
    sockets += [first, FakeSocket([])]
    stream = ScriptedStream(fast(max_age_s=0.05), attempts(healthy_after_s=0.01))
    run_until(stream, lambda: len(stream.events) == 3)
    assert stream.events[1] == (Reason.MAX_AGE, "", 0.0)
    assert first.closed == "graceful"
    assert stream.events[2] == ("connected", "reconnect:max-connection-age")


def test_connect_errors_are_reasons_and_never_quote_the_url(sockets: list[Any]) -> None:
    sockets += [
        OSError("cannot reach ws://127.0.0.1:9/private/ws?listenKey=SECRETKEY"),
        websocket.WebSocketBadStatusException("Handshake status %d %s", 400),
        FakeSocket([(TEXT, b"x")]),
    ]
    stream = ScriptedStream(fast(), Attempts(base_s=0.01, jitter_ratio=0.0))
    run_until(stream, lambda: bool(stream.frames))
    failed, refused, connected = stream.events
    assert (
        failed[0] is Reason.CONNECT_FAILED
        and "SECRETKEY" not in failed[1]
        and failed[1].startswith("OSError")
    )
    assert refused[:2] == (Reason.HANDSHAKE_REFUSED, "HTTP 400")
    assert connected == ("connected", "reconnect:handshake-refused")


def test_run_returns_the_exit_code_a_stream_chose_and_always_shuts_down(sockets: list[Any]) -> None:
    calls: list[str] = []

    class Failing(ScriptedStream):
        def initialize(self) -> None:
            calls.append("initialize")

        def on_frame(self, data: bytes) -> bool:
            self.exit_code = exitcodes.EXIT_TEMPFAIL
            return True

        def shutdown(self) -> None:
            calls.append("shutdown")
            super().shutdown()

    ws = FakeSocket([(TEXT, b"x")])
    sockets.append(ws)
    stream = Failing(fast(), attempts())
    assert stream.run() == exitcodes.EXIT_TEMPFAIL
    assert calls == ["initialize", "shutdown"] and ws.closed == "graceful"
    stopped = ScriptedStream(fast(), attempts())
    stopped.stop.set()
    assert stopped.run() == exitcodes.EXIT_OK


# -- graceful close drains -------------------------------------------------------------------------


def test_stop_drains_what_the_server_sent_before_its_close_frame(sockets: list[Any]) -> None:
    ws = FakeSocket(
        [(TEXT, b"1")],
        on_close=[(TEXT, b"2"), (PONG, b"x"), (TEXT, b"3"), (CLOSE, b""), (TEXT, b"never sent")],
    )
    sockets.append(ws)
    stream = ScriptedStream(fast(), attempts())
    run_until(stream, lambda: stream.frames == [b"1"])
    stream.stop.set()
    assert stream.run() == exitcodes.EXIT_OK  # the loop ends at once; shutdown closes gracefully
    assert stream.frames == [b"1", b"2", b"3"]  # nothing the server sent before its close frame is lost
    assert ws.close_sent == 1 and ws.closed == "graceful" and ws.read_after_drop == 0
    assert ws.script == [(TEXT, b"never sent")] and stream.ws is None


def test_a_planned_reconnect_drains_the_old_connection_first(sockets: list[Any]) -> None:
    old = FakeSocket([], on_close=[(TEXT, b"late"), (CLOSE, b"")])
    sockets += [old, FakeSocket([(TEXT, b"new")])]
    stream = ScriptedStream(fast(max_age_s=0.05), attempts(healthy_after_s=0.01))
    run_until(stream, lambda: b"new" in stream.frames)
    assert stream.frames == [b"late", b"new"] and old.closed == "graceful"
    assert stream.events[1:] == [(Reason.MAX_AGE, "", 0.0), ("connected", "reconnect:max-connection-age")]


class Firehose(FakeSocket):
    """A server that never answers our close frame and keeps sending."""

    def recv_data_frame(self, control_frame: bool = True) -> tuple[int, Any]:
        time.sleep(0.001)
        return TEXT, SimpleNamespace(data=b"more")


def test_the_drain_ends_at_its_deadline_and_the_socket_is_dropped(sockets: list[Any]) -> None:
    ws = Firehose([])
    sockets.append(ws)
    stream = ScriptedStream(fast(drain_timeout_s=0.05), attempts())
    run_until(stream, lambda: stream.ws is not None)
    assert stream.drain(ws) == len(stream.frames) > 0  # every frame read went to on_frame
    stream.ws = None
    quiet = FakeSocket([])  # nothing more, no close frame: the receive times out at the deadline
    assert stream.drain(quiet) == 0 and quiet.close_sent == 1
    broken = FakeSocket([OSError("reset by peer")])
    assert stream.drain(broken) == 0


def test_a_dead_connection_is_dropped_without_a_drain(sockets: list[Any]) -> None:
    ws = FakeSocket(
        [(TEXT, b"a"), websocket.WebSocketConnectionClosedException("gone")], on_close=[(TEXT, b"b")]
    )
    sockets.append(ws)
    stream = ScriptedStream(fast(), attempts())
    run_until(stream, lambda: bool(stream.disconnects()))
    assert stream.disconnects()[0][0] is Reason.CONNECTION_LOST
    assert ws.closed == "abrupt" and stream.frames == [b"a"]


def test_a_failing_on_frame_during_the_drain_still_drops_the_socket(sockets: list[Any]) -> None:
    class Refusing(ScriptedStream):
        def on_frame(self, data: bytes) -> bool:
            if self.stop.is_set():
                raise OSError("spool full")
            return super().on_frame(data)

    ws = FakeSocket([(TEXT, b"1")], on_close=[(TEXT, b"2"), (CLOSE, b"")])
    sockets.append(ws)
    stream = Refusing(fast(), attempts())
    run_until(stream, lambda: bool(stream.frames))
    stream.stop.set()
    with pytest.raises(OSError, match="spool full"):
        stream.close()
    assert ws.closed == "graceful" and stream.ws is None


def test_the_servers_close_of_a_healthy_connection_is_a_planned_reconnect(sockets: list[Any]) -> None:
    # healthy (up >= healthy_after_s): the 24 h rollover; reconnect at once, the close is already answered
    first = FakeSocket([(TEXT, b"a"), aged(0.35), (CLOSE, b"")])
    young = FakeSocket([(CLOSE, b"")])
    sockets += [first, young, FakeSocket([(TEXT, b"c")])]
    a = Attempts(base_s=0.05, jitter_ratio=0.0, healthy_after_s=0.3)
    stream = ScriptedStream(fast(), a)
    run_until(stream, lambda: b"c" in stream.frames)
    assert stream.disconnects() == [(Reason.SERVER_CLOSED, "", 0.0), (Reason.SERVER_CLOSED, "", 0.05)]
    assert stream.events[2] == ("connected", "reconnect:server-closed")  # the reconnect still reconciles
    assert first.closed == "abrupt" and first.close_sent == 0  # websocket-client answered the server's close
    # a young connection closed by the server stays a failure: it backed off and counts
    assert young.closed == "abrupt" and a.count == 1


def aged(seconds: float) -> tuple[int, Any]:
    """A script item: a pong, received ``seconds`` from now (the connection ages meanwhile)."""

    def later(s: FakeSocket) -> bytes:
        time.sleep(seconds)
        return b""

    return PONG, later


# -- reconnect pacing ------------------------------------------------------------------------------


def test_max_connection_age_is_jittered_per_account_bounded_fixed_and_spread() -> None:
    day = 23.5 * 3600
    ages = {i: jittered_max_age(day, 0.085, i) for i in range(1, 501)}
    assert all(day * (1 - 0.085) <= age <= day for age in ages.values())  # the last 2 h of 23.5 h
    assert ages == {i: jittered_max_age(day, 0.085, i) for i in range(1, 501)}  # fixed per account
    assert jittered_max_age(day, 0.0, 7) == day  # no jitter: exactly the max
    # evenly spread: the rollovers of 500 consecutive accounts never fall in the same second
    for n in (2, 10, 100, 500):
        ordered = sorted(ages[i] for i in range(1, n + 1))
        assert min(b - a for a, b in itertools.pairwise(ordered)) > 1.0
    assert max(ages.values()) - min(ages.values()) > 0.95 * 0.085 * day  # the whole range is used
    # a short max age (tests) keeps the same shape
    short = sorted(jittered_max_age(20.0, 0.5, i) for i in range(1, 13))
    assert 10.0 <= short[0] and short[-1] <= 20.0 and len(set(short)) == 12


def test_user_data_liveness_carries_the_accounts_age_and_the_reconnect_spread() -> None:
    settings = load_settings(None, environ={"KRAITE__binance__reconnect_spread_s": "0.7"})
    cfg = settings.user_data_stream
    assert liveness(settings).max_age_s == cfg.max_connection_age_s
    lv = liveness(settings, account_id=9)
    assert lv.max_age_s == jittered_max_age(cfg.max_connection_age_s, cfg.max_connection_age_jitter_ratio, 9)
    assert lv.max_age_s != liveness(settings, account_id=10).max_age_s
    assert lv.reconnect_spread_s == 0.7
    account = Account(id=9, name="a", exchange="binance", api_key="k" * 16, api_secret_token="t")
    assert UserDataStream(ChildContext(settings, "user-data", account), account).liveness == lv
    mark_price = MarkPriceStreamer(settings, ChildContext(settings, "mark-price"))
    assert mark_price.liveness.reconnect_spread_s == 0.7 and mark_price.liveness.max_age_s is None
    for key, bad, message in (
        ("user_data_stream__max_connection_age_jitter_ratio", "1", "max_connection_age_jitter_ratio"),
        ("user_data_stream__max_connection_age_jitter_ratio", "-0.1", "max_connection_age_jitter_ratio"),
        ("binance__reconnect_spread_s", "-1", "reconnect_spread_s"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, environ={f"KRAITE__{key}": bad})


class PacedStream(ScriptedStream):
    """A stream whose connection budget answers from a script: 0.0 = a token, > 0 = wait that long."""

    def __init__(self, lv: Liveness, a: Attempts, tokens: list[Any]) -> None:
        super().__init__(lv, a)
        self.tokens = list(tokens)
        self.asked = 0
        self.states: list[str | None] = []

    def before_connect(self) -> float:
        self.asked += 1
        answer = self.tokens.pop(0) if self.tokens else 0.0
        if isinstance(answer, BaseException):
            raise answer
        return float(answer)

    def beat(self, state: str | None = None) -> None:
        self.states.append(state)


def test_without_a_token_nothing_is_sent_the_stream_waits_paced_and_then_connects(sockets: list[Any]) -> None:
    ws = FakeSocket([(TEXT, b"x")])
    sockets.append(ws)
    stream = PacedStream(fast(), attempts(), tokens=[0.05, 0.05, 0.0])
    stream.loop()  # the first attempt: no token, nothing sent, the next try scheduled
    assert stream.ws is None and sockets == [ws] and stream.paced and stream.paced_waits == 1
    assert stream.disconnects() == []  # a wait for a token is not a failure: no backoff counted
    run_until(stream, lambda: stream.frames == [b"x"])
    assert stream.asked == 3 and sockets == [] and not stream.paced and stream.attempts.count == 0
    assert "paced" in stream.states and stream.events[0] == ("connected", "connect")
    assert stream.states.index("paced") < stream.states.index("connecting", 1)


def test_a_stop_cuts_a_paced_wait_short(sockets: list[Any]) -> None:
    stream = PacedStream(fast(recv_timeout_s=5.0), attempts(), tokens=[300.0])
    stream.loop()
    stream.stop.set()
    started = time.monotonic()
    assert stream.run() == exitcodes.EXIT_OK
    assert time.monotonic() - started < 5.0 and stream.asked == 1 and stream.ws is None


def test_a_failing_pacing_hook_is_logged_and_never_keeps_the_stream_dark(
    sockets: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    sockets.append(FakeSocket([(TEXT, b"x")]))
    stream = PacedStream(fast(), attempts(), tokens=[RuntimeError("budget bug")])
    with caplog.at_level(logging.ERROR, logger=stream.log.name):
        run_until(stream, lambda: bool(stream.frames))
    assert "connection pacing failed" in caplog.text and stream.events[0] == ("connected", "connect")


def test_every_attempt_asks_for_a_token_first_connects_reconnects_and_rollovers(sockets: list[Any]) -> None:
    sockets += [
        OSError("refused"),
        FakeSocket([(CLOSE, b"")]),
        FakeSocket([]),
        FakeSocket([(TEXT, b"last")]),
    ]
    stream = PacedStream(fast(max_age_s=0.05), Attempts(base_s=0.01, jitter_ratio=0.0), tokens=[])
    run_until(stream, lambda: b"last" in stream.frames)
    assert stream.asked == 4  # failed connect, server close, max-age rollover: one token each
    assert [e[0] for e in stream.disconnects()] == [
        Reason.CONNECT_FAILED,
        Reason.SERVER_CLOSED,
        Reason.MAX_AGE,
    ]


def test_reconnects_after_a_drop_are_spread_and_the_max_age_rollover_is_not(sockets: list[Any]) -> None:
    random.seed(3)
    delays = []
    for _ in range(40):
        stream = ScriptedStream(fast(reconnect_spread_s=0.5), attempts())
        stream.disconnect(Disconnect(Reason.SERVER_CLOSED, planned=True))  # a mass drop of healthy ones
        delays.append(stream.disconnects()[-1][2])
    assert all(0.0 <= d <= 0.5 for d in delays) and max(delays) - min(delays) > 0.25
    spread = stream.last_spread_s
    assert spread == delays[-1] and stream.delay_text(spread) == f"0.0s + {spread:.1f}s spread"
    assert len(set(delays)) == len(delays)
    rollover = ScriptedStream(fast(reconnect_spread_s=0.5), attempts())
    rollover.disconnect(Disconnect(Reason.MAX_AGE))
    assert rollover.disconnects() == [(Reason.MAX_AGE, "", 0.0)]  # spread by the account's own age already
    unplanned = ScriptedStream(fast(reconnect_spread_s=0.5), Attempts(base_s=1.0, jitter_ratio=0.0))
    unplanned.disconnect(Disconnect(Reason.CONNECTION_LOST))
    assert 1.0 <= unplanned.disconnects()[0][2] <= 1.5
