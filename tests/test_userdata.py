"""The user-data child end to end: simulator -> child process -> spool -> Redis -> Worker -> PostgreSQL."""

from __future__ import annotations

import glob
import http.server
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fixtures.userdata_helpers import (
    ALL_DISPATCH_KEYS,
    Recorder,
    add_sim_accounts,
    audit_count,
    run_scenario,
    running_worker,
    settings_from,
    sim_env,
    start_child,
    truth_mismatches,
)
from support import title_of, wait_for

from kraite_mp import exitcodes, jobs
from kraite_mp.config import Settings
from kraite_mp.messages import PROCESS_ACTOR, RECONCILE_ACTOR, broker_namespace
from kraite_mp.ops.embedded import RedisServer
from kraite_mp.store.accounts import get_account

pytestmark = pytest.mark.integration

#: Length of the Redis outage (30 s, a realistic restart; KRAITE_TEST_OUTAGE_S scales it down).
OUTAGE_S = float(os.environ.get("KRAITE_TEST_OUTAGE_S", "30"))


class Setup:
    """Simulator + accounts + env/settings for the child and a broker/worker for the jobs."""

    def __init__(self, env: dict[str, str], run_dir: str, processes: Any) -> None:
        self.env = env
        self.settings: Settings = settings_from(env)
        self.run_dir = run_dir
        self.processes = processes
        self.recorder = Recorder()
        self.broker = jobs.build_broker(self.settings)
        self.broker.add_middleware(self.recorder)
        self.children: dict[int, Any] = {}

    def log_path(self, account_id: int) -> str:
        return os.path.join(self.run_dir, f"child-{account_id}.log")

    def start_child(self, account_id: int) -> Any:
        proc = start_child(self.processes, self.env, account_id, self.log_path(account_id))
        self.children[account_id] = proc
        return proc

    def logs(self) -> str:
        text = ""
        for path in glob.glob(os.path.join(self.run_dir, "child-*.log")):
            with open(path, errors="replace") as f:
                text += f.read()
        return text

    def title(self, account_id: int) -> str:
        return title_of(self.children[account_id].pid)


def spool_acked(spool_dir: str) -> bool:
    """The spool's acknowledged cursor is past the last record on its disk: every spooled frame was sent
    and audited, nothing waits for a worker (the sent cursor's file lags while frames flow, so it is not
    the measure)."""
    try:
        with open(os.path.join(spool_dir, "acked")) as f:
            acked = json.load(f)
        ends = [
            (int(name[: -len(".seg")]), os.path.getsize(os.path.join(spool_dir, name)))
            for name in os.listdir(spool_dir)
            if name.endswith(".seg")
        ]
    except (OSError, ValueError):
        return False
    written = [end for end in ends if end[1] > 0]
    return not written or (acked["segment"], acked["offset"]) >= max(written)


@pytest.fixture()
def setup_factory(kraite_env: dict[str, str], run_dir: str, processes: Any) -> Iterator[Any]:
    made: list[Setup] = []

    def make(sim: Any, **overrides: str) -> Setup:
        env = sim_env(kraite_env, sim, **overrides)
        env.setdefault("KRAITE_REDIS_NAMESPACE", "")
        env["KRAITE_REDIS_NAMESPACE"] = f"{kraite_env['KRAITE_REDIS_NAMESPACE']}-{uuid.uuid4().hex[:8]}"
        s = Setup(env, run_dir, processes)
        made.append(s)
        return s

    yield make
    processes.stop_all()
    for s in made:  # shown by pytest when the test failed
        print(s.logs()[-20000:])
        print("processed:", len(s.recorder.done), [t for t in s.recorder.done if t[2] is not None][:5])
    for s in made:
        s.broker.close()


def wait_streaming(setup: Setup, sim: Any, account: Any, connections: int = 1, timeout: float = 30) -> None:
    wait_for(
        lambda: (
            sim.stats()["ws_opened"].get(account.api_key, 0) >= connections
            and sim.stats()["current_connections"].get(account.api_key, 0) >= 1
        ),
        timeout,
        message=f"child of account {account.id} connected ({connections})",
    )
    wait_for(lambda: "state=streaming" in setup.title(account.id), timeout, message="title says streaming")


def frames_sent(sim: Any, api_key: str) -> int:
    return int(sim.stats()["frames_sent"].get(api_key, 0))


def test_scenario_through_child_and_worker_matches_truth(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator, user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS)
    accounts = add_sim_accounts(db, secret_key, simulator, 2)
    with running_worker(setup.broker, threads=8):
        for account in accounts:
            setup.start_child(account.id)
        for account in accounts:
            wait_streaming(setup, simulator, account)
        for account in accounts:
            run_scenario(simulator, account.api_key, steps=60)
        for account in accounts:
            sent = frames_sent(simulator, account.api_key)
            wait_for(
                lambda a=account, n=sent: audit_count(db, a.id) == n,
                60,
                message=f"every frame of account {account.id} audited",
            )
            wait_for(
                lambda a=account: truth_mismatches(db, a.id, simulator.truth(a.api_key)) == [],
                30,
                message=f"orders of account {account.id} equal the simulator's truth",
            )
        # one reconcile request per connect, through the same spool and queue
        wait_for(lambda: len(setup.recorder.actors(RECONCILE_ACTOR)) >= 2, 30, message="reconcile requests")
    assert sorted(k["account_id"] for k in setup.recorder.actors(RECONCILE_ACTOR)) == sorted(
        a.id for a in accounts
    )
    assert {k["reason"] for k in setup.recorder.actors(RECONCILE_ACTOR)} == {"connect"}
    title = setup.title(accounts[0].id)
    assert title.startswith(
        f"kraite-mp: user-data account={accounts[0].id} name=acct0 state=streaming frames="
    )
    assert f"frames={frames_sent(simulator, accounts[0].api_key)}" in title and "backlog=0" in title
    # every frame was enqueued once and processed once to the end (a message retried after a transient
    # error, PostgreSQL's deadlock detection once in CI, has more attempts but one success)
    for account in accounts:
        ok = [k["frame_id"] for k in setup.recorder.succeeded(PROCESS_ACTOR) if k["account_id"] == account.id]
        tried = {k["frame_id"] for k in setup.recorder.actors(PROCESS_ACTOR) if k["account_id"] == account.id}
        assert len(ok) == len(set(ok)) == len(tried) == frames_sent(simulator, account.api_key)
    assert setup.children[accounts[0].id].poll() is None


def test_redis_outage_loses_no_frame_and_replays_in_order(
    db: Any, secret_key: str, kraite_env: dict[str, str], setup_factory: Any, simulator: Any
) -> None:
    server = RedisServer().start()
    try:
        setup = setup_factory(
            simulator,
            KRAITE_REDIS_URL=server.url,
            user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS,
        )
        (account,) = add_sim_accounts(db, secret_key, simulator, 1)
        api_key = account.api_key
        # the server pings every second and drops a client that does not pong within 3 s: the pong path
        # must stay alive through the outage
        simulator.set_ping(interval_s=1.0, pong_timeout_s=3.0)
        child = setup.start_child(account.id)
        with running_worker(setup.broker, threads=8) as worker:
            wait_streaming(setup, simulator, account)
            simulator.step(api_key, n=20)
            before = frames_sent(simulator, api_key)
            wait_for(lambda: audit_count(db, account.id) == before, 60, message="frames before the outage")
            # ... and acknowledged to the child: nothing of them is left for a replay
            spool_dir = os.path.join(setup.settings.user_data_stream.spool_dir, str(account.id))
            wait_for(lambda: spool_acked(spool_dir), 20, message="every sent frame acknowledged")
            opened = simulator.stats()["ws_opened"][api_key]

            server.stop()  # the worker stays up through the outage too
            t_end = time.monotonic() + OUTAGE_S
            titles = []
            while time.monotonic() < t_end:
                simulator.step(api_key, n=3)
                titles.append(setup.title(account.id))
                time.sleep(0.5)
            assert all(t.is_alive() for t in worker.workers)
        # (the worker is stopped before Redis returns so that the queue can be inspected below)
        during = frames_sent(simulator, api_key) - before
        assert during > 0
        wait_for(
            lambda: f"backlog={during}" in setup.title(account.id), 20, message="title shows the backlog"
        )
        assert child.poll() is None
        assert simulator.stats()["ws_opened"][api_key] == opened  # never disconnected: pongs kept flowing
        assert "Redis unavailable" in setup.logs() and "backlog=" in setup.logs()
        assert any("backlog=" in t and "backlog=0" not in t for t in titles)

        server.start()  # same port, empty: only the spooled frames will be in the queue
        wait_for(
            lambda: "backlog=0" in setup.title(account.id), 60, message="spool drained after Redis is back"
        )
        client = redis.Redis.from_url(server.url)
        try:
            queue_key = f"{broker_namespace(setup.settings)}:{setup.settings.user_data_stream.queue_name}"
            message_ids = [m.decode() for m in client.lrange(queue_key, 0, -1)]
            payloads = client.hmget(queue_key + ".msgs", message_ids)
        finally:
            client.close()
        queued = [json.loads(p)["kwargs"] for p in payloads]
        frame_ids = [k["frame_id"] for k in queued]
        assert len(frame_ids) == len(set(frame_ids)) == during  # 0 frames lost, none twice
        event_times = [json.loads(k["frame"])["E"] for k in queued]
        assert event_times == sorted(event_times)  # ... which is the exchange's order

        with running_worker(setup.broker, threads=8):
            total = frames_sent(simulator, api_key)
            wait_for(lambda: audit_count(db, account.id) == total, 60, message="every frame processed")
            wait_for(
                lambda: truth_mismatches(db, account.id, simulator.truth(api_key)) == [],
                30,
                message="orders equal the truth",
            )
        assert child.poll() is None
    finally:
        server.cleanup()


def test_redis_restarted_empty_mid_burst_is_replayed_from_the_spool(
    db: Any, secret_key: str, setup_factory: Any, simulator: Any
) -> None:
    """Frames Redis accepted but no worker audited are lost with a Redis that restarts empty: the spool
    kept them (end-to-end acknowledgement), sees the broker's new epoch, re-sends them and asks for a
    reconciliation; every frame is audited exactly once and the orders equal the exchange's."""
    server = RedisServer().start()
    try:
        setup = setup_factory(
            simulator,
            KRAITE_REDIS_URL=server.url,
            user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS,
        )
        (account,) = add_sim_accounts(db, secret_key, simulator, 1)
        api_key = account.api_key
        setup.start_child(account.id)
        spool_dir = os.path.join(setup.settings.user_data_stream.spool_dir, str(account.id))
        with running_worker(setup.broker, threads=4):
            wait_streaming(setup, simulator, account)
            simulator.step(api_key, n=10)
            before = frames_sent(simulator, api_key)
            wait_for(lambda: audit_count(db, account.id) == before, 60, message="frames before the burst")
            wait_for(lambda: spool_acked(spool_dir), 20, message="acknowledged before the burst")
        # no worker now: the burst is accepted by Redis and sits in its queue, unaudited
        run_scenario(simulator, api_key, steps=40)
        total = frames_sent(simulator, api_key)
        assert total > before
        client = redis.Redis.from_url(server.url)
        queue_key = f"{broker_namespace(setup.settings)}:{setup.settings.user_data_stream.queue_name}"
        try:
            wait_for(lambda: client.llen(queue_key) >= total - before, 30, message="the burst is in Redis")
        finally:
            client.close()
        assert not spool_acked(spool_dir)  # kept: no worker acknowledged the burst
        server.stop()
        server.start()  # same port, empty: the queued burst is gone
        wait_for(lambda: "Redis lost its data" in setup.logs(), 30, message="the child saw the broker's loss")
        with running_worker(setup.broker, threads=8):
            wait_for(lambda: audit_count(db, account.id) == total, 60, message="every frame audited")
            wait_for(
                lambda: any(
                    k["reason"] == "broker-lost-data" for k in setup.recorder.actors(RECONCILE_ACTOR)
                ),
                30,
                message="a reconciliation after the replay",
            )
            wait_for(
                lambda: truth_mismatches(db, account.id, simulator.truth(api_key)) == [],
                30,
                message="orders equal the truth",
            )
            wait_for(lambda: spool_acked(spool_dir), 20, message="the replay acknowledged")
        with db.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(DISTINCT frame_id) FROM api_data_stream WHERE account_id = %s"
                " AND source = 'ws'",
                (account.id,),
            )
            assert cur.fetchone() == (total, total)  # 0 lost, none twice
    finally:
        server.cleanup()


def test_spool_survives_a_killed_child(
    db: Any, secret_key: str, simulator: Any, setup_factory: Any, kraite_env: dict[str, str]
) -> None:
    server = RedisServer().start()
    try:
        setup = setup_factory(simulator, KRAITE_REDIS_URL=server.url)
        (account,) = add_sim_accounts(db, secret_key, simulator, 1)
        child = setup.start_child(account.id)
        wait_streaming(setup, simulator, account)
        wait_for(lambda: "backlog=0" in setup.title(account.id), 20, message="reconcile request sent")
        server.stop()
        simulator.step(account.api_key, n=15)
        sent = frames_sent(simulator, account.api_key)
        wait_for(lambda: f"frames={sent}" in setup.title(account.id), 20, message="frames received")
        wait_for(lambda: f"backlog={sent}" in setup.title(account.id), 20, message="frames spooled")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        server.start()
        setup.start_child(account.id)  # a new incarnation sends what the dead one spooled, first
        with running_worker(setup.broker, threads=4):
            wait_for(
                lambda: audit_count(db, account.id) == sent, 60, message="spooled frames of the dead child"
            )
        spool_dir = os.path.join(setup.settings.user_data_stream.spool_dir, str(account.id))
        segments = glob.glob(os.path.join(spool_dir, "*.seg"))
        assert len(segments) == 1  # drained segments of the dead child removed
    finally:
        server.cleanup()


def test_bad_frames_are_audited_and_child_and_worker_keep_running(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator)
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    child = setup.start_child(account.id)
    bad = [
        "this is not json",
        '{"e":"FROM_THE_FUTURE","E":1}',
        "[1,2,3]",
        '{"e":"ORDER_TRADE_UPDATE","o":{"x":"TRADE"}}',
        '{"pad":"' + "y" * (1536 * 1024) + '"}',
    ]
    with running_worker(setup.broker, threads=8):
        wait_streaming(setup, simulator, account)
        for text in bad:
            simulator.send_raw(account.api_key, text)
        simulator.step(account.api_key, n=10)
        sent = frames_sent(simulator, account.api_key)
        wait_for(lambda: audit_count(db, account.id) == sent, 60, message="all frames audited")
    with db.cursor() as cur:
        cur.execute("SELECT outcome, count(*) FROM api_data_stream GROUP BY 1")
        outcomes = dict(cur.fetchall())
    db.commit()
    assert outcomes["malformed"] == 1 and outcomes["unknown"] == 1 and outcomes["not_object"] == 1
    assert outcomes["invalid"] == 1 and outcomes["oversized"] == 1
    assert child.poll() is None
    assert simulator.stats()["ws_opened"][account.api_key] == 1


def test_listen_key_expired_frame_new_key_reconnect_and_reconcile(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator)
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    setup.start_child(account.id)
    with running_worker(setup.broker, threads=4):
        wait_streaming(setup, simulator, account)
        first_key = simulator.truth(account.api_key)["listen_key"]
        simulator.expire_listen_key(account.api_key)
        wait_streaming(setup, simulator, account, connections=2)
        second_key = simulator.truth(account.api_key)["listen_key"]
        assert second_key and second_key != first_key
        simulator.step(account.api_key, n=5)
        sent = frames_sent(simulator, account.api_key)
        wait_for(lambda: audit_count(db, account.id) == sent, 60, message="frames on the new connection")
        wait_for(
            lambda: len(setup.recorder.actors(RECONCILE_ACTOR)) >= 2, 30, message="reconcile after reconnect"
        )
    # the reconnects' own sweeps (a background history sweep a gap sweep deferred may follow)
    reasons = [k["reason"] for k in setup.recorder.actors(RECONCILE_ACTOR) if "history" not in k]
    assert sorted(reasons) == ["connect", "reconnect:listenKeyExpired"]  # (finished in any order)
    with db.cursor() as cur:
        cur.execute("SELECT payload::text FROM api_data_stream WHERE event_type = 'listenKeyExpired'")
        (payload,) = cur.fetchone()
    db.commit()
    assert first_key not in payload and '"listenKey": "***"' in payload


def test_keepalive_1125_gets_a_new_key(db: Any, simulator: Any, secret_key: str, setup_factory: Any) -> None:
    # the listenKeyExpired frame never arrives (the connection swallows what it is sent meanwhile):
    # only the keepalive can notice the dead key
    setup = setup_factory(simulator, user_data_stream__keepalive_interval_s="1")
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    setup.start_child(account.id)
    wait_streaming(setup, simulator, account)
    wait_for(
        lambda: simulator.stats()["requests"].get("/fapi/v1/listenKey", 0) >= 3, 20, message="keepalives sent"
    )
    first_key = simulator.truth(account.api_key)["listen_key"]
    simulator.go_silent(account.api_key, 3.0)
    simulator.expire_listen_key(account.api_key)
    wait_streaming(setup, simulator, account, connections=2)
    assert simulator.truth(account.api_key)["listen_key"] not in (None, first_key)
    assert "listenKey expired (keepalive -1125)" in setup.logs()


def test_half_open_connection_detected_by_pong_timeout(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(
        simulator, user_data_stream__ping_interval_s="0.5", user_data_stream__pong_timeout_s="1.5"
    )
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    setup.start_child(account.id)
    wait_streaming(setup, simulator, account)
    time.sleep(2.0)  # client pings answered: no reconnect
    assert simulator.stats()["ws_opened"][account.api_key] == 1
    simulator.go_silent(account.api_key, 6.0)
    wait_streaming(setup, simulator, account, connections=2, timeout=40)
    assert "pong-timeout" in setup.logs()


def test_reconnects_before_max_connection_age(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator, user_data_stream__max_connection_age_s="1.5")
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    setup.start_child(account.id)
    wait_streaming(setup, simulator, account, connections=3, timeout=40)
    # make before break: the new connection opens while the old one streams, no gap, no reconcile
    assert "rolled over to a new connection (max-connection-age), no gap" in setup.logs()
    assert "disconnected (max-connection-age)" not in setup.logs()


def test_server_close_reconnects_with_backoff(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator)
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    setup.start_child(account.id)
    wait_streaming(setup, simulator, account)
    simulator.drop_connections(account.api_key)
    wait_streaming(setup, simulator, account, connections=2, timeout=40)
    simulator.drop_connections(account.api_key, abrupt=True)
    wait_streaming(setup, simulator, account, connections=3, timeout=40)
    assert "reconnecting in" in setup.logs()


def test_invalid_credentials_exit_fatal_and_are_recorded(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any
) -> None:
    setup = setup_factory(simulator)
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    simulator.invalidate_api_key(account.api_key)
    child = setup.start_child(account.id)
    assert child.wait(30) == exitcodes.EXIT_FATAL_CREDENTIALS
    stored = get_account(db, account.id)
    assert stored is not None and stored.credentials_error and "-2015" in stored.credentials_error
    assert simulator.stats()["requests"].get("/fapi/v1/listenKey", 0) == 1  # no hot loop


def test_no_secret_or_listen_key_in_logs_titles_or_audit(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    setup = setup_factory(simulator, KRAITE_LOG_LEVEL="DEBUG", user_data_stream__keepalive_interval_s="1")
    accounts = add_sim_accounts(db, secret_key, simulator, 2)
    keys: set[str] = set()
    titles: list[str] = []
    with running_worker(setup.broker, threads=4):
        for account in accounts:
            setup.start_child(account.id)
        for account in accounts:
            wait_streaming(setup, simulator, account)
            keys.add(simulator.truth(account.api_key)["listen_key"])
        a = accounts[0]
        simulator.step(a.api_key, n=10)
        # a listenKeyExpired carrying the other account's key, then a real one, then an abrupt drop
        other_key = simulator.truth(accounts[1].api_key)["listen_key"]
        simulator.send_raw(a.api_key, json.dumps({"e": "listenKeyExpired", "E": 1, "listenKey": other_key}))
        wait_streaming(setup, simulator, a, connections=2)
        keys.add(simulator.truth(a.api_key)["listen_key"])
        simulator.expire_listen_key(a.api_key)
        wait_streaming(setup, simulator, a, connections=3)
        keys.add(simulator.truth(a.api_key)["listen_key"])
        simulator.drop_connections(a.api_key, abrupt=True)
        wait_streaming(setup, simulator, a, connections=4)
        for _ in range(10):
            titles += [setup.title(acc.id) for acc in accounts]
            time.sleep(0.2)
        simulator.step(a.api_key, n=10)

        def received() -> int:
            fields = dict(f.split("=", 1) for f in setup.title(a.id).split() if "=" in f)
            return int(fields.get("frames", "-1"))

        wait_for(
            lambda: (
                received() >= frames_sent(simulator, a.api_key) - 5 and audit_count(db, a.id) == received()
            ),
            60,
            message="every received frame audited",
        )
        simulator.invalidate_api_key(accounts[1].api_key)
        simulator.expire_listen_key(accounts[1].api_key)
        assert setup.children[accounts[1].id].wait(30) == exitcodes.EXIT_FATAL_CREDENTIALS
    secrets = {k for k in keys if k} | {acc.api_secret for acc in simulator.accounts}
    assert len(keys) >= 3
    with db.cursor() as cur:
        cur.execute(
            "SELECT coalesce(payload::text, '') || coalesce(raw_text, '') || coalesce(error, '')"
            " FROM api_data_stream"
        )
        audit = "\n".join(r[0] for r in cur.fetchall())
        cur.execute("SELECT coalesce(credentials_error, '') FROM accounts")
        audit += "\n".join(r[0] for r in cur.fetchall())
    db.commit()
    heartbeats = ""
    for path in glob.glob(os.path.join(setup.settings.run_dir, "heartbeats", "*.json")):
        with open(path) as f:
            heartbeats += f.read()
    spool = ""
    for path in glob.glob(os.path.join(setup.settings.user_data_stream.spool_dir, "*", "*")):
        with open(path, "rb") as f:
            spool += f.read().decode(errors="replace")
    logs = setup.logs()
    assert "DEBUG" in logs and "listenKeyExpired" in audit and spool
    for name, text in (
        ("child logs", logs),
        ("worker logs", caplog.text),
        ("titles", "\n".join(titles)),
        ("audit rows", audit),
        ("heartbeats", heartbeats),
        ("spool", spool),
    ):
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {name}"


def test_a_handshake_404_is_a_wrong_ws_url_not_a_bad_key(
    db: Any, simulator: Any, secret_key: str, setup_factory: Any, request: Any
) -> None:
    """The server has no such route: the child says binance.ws_url is wrong and exits FATAL (config),
    instead of throwing its (good) listenKey away and creating new ones in a loop."""

    # a host that is no Binance WebSocket server (a wrong ws_url): every path answers 404
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_error(404)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    request.addfinalizer(server.shutdown)
    setup = setup_factory(simulator, KRAITE_BINANCE_WS_URL=f"ws://127.0.0.1:{server.server_address[1]}")
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    child = setup.start_child(account.id)
    assert child.wait(timeout=60) == exitcodes.EXIT_FATAL_CONFIG
    logs = setup.logs()
    assert "HTTP 404 at the handshake" in logs and "check binance.ws_url" in logs
    created = [
        r for r in simulator.rest.request_log() if r.method == "POST" and r.path == "/fapi/v1/listenKey"
    ]
    assert len(created) == 1  # the key was never taken for the problem: no new key per attempt
