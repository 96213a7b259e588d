"""The Dramatiq job: audit, dispatch, ordered order updates, observers (real PostgreSQL, Redis, Worker).

The unit tier at the end runs ``decide`` and the actors on a StubBroker, without any service.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from fixtures.userdata_helpers import (
    ALL_DISPATCH_KEYS,
    FIXTURES,
    FrameCollector,
    Recorder,
    add_sim_accounts,
    audit_count,
    run_scenario,
    running_worker,
    settings_from,
    sim_env,
    state_rows,
    truth_mismatches,
)
from support import wait_for

from kraite_mp import jobs
from kraite_mp.binance.user import FrameKind, parse_frame
from kraite_mp.config import DEFAULT_DISPATCHED_EXECUTIONS, Settings
from kraite_mp.config.load import load_settings
from kraite_mp.jobs import finish_reconcile
from kraite_mp.logs import RedactFilter, describe_error, register_secret
from kraite_mp.messages import (
    PROCESS_ACTOR,
    RECONCILE_ACTOR,
    FrameIds,
    build_producer_broker,
    frame_record,
    record_message,
)
from kraite_mp.observers import transitions_channel
from kraite_mp.ops.embedded import free_port
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.store.accounts import add_account
from kraite_mp.store.dispatch import AuditOutcome, Outcome, decide


def load_jsonl(name: str) -> list[dict[str, Any]]:
    with open(FIXTURES / name) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture()
def job_env(kraite_env: dict[str, str]) -> dict[str, str]:
    """Test env with a Redis namespace of its own (no queue shared with another test)."""
    env = dict(kraite_env)
    env["KRAITE_REDIS_NAMESPACE"] = f"{kraite_env['KRAITE_REDIS_NAMESPACE']}-{uuid.uuid4().hex[:8]}"
    env["KRAITE__jobs__retry_min_backoff_ms"] = "100"
    env["KRAITE__jobs__retry_max_backoff_ms"] = "500"
    return env


def make_settings(env: dict[str, str], **overrides: str) -> Settings:
    env = dict(env)
    for key, value in overrides.items():
        env["KRAITE__" + key] = value
    return settings_from(env)


@pytest.fixture()
def account_id(db: Any, secret_key: str) -> int:
    return add_account(db, secret_key, name="alice", api_key="k" * 64, api_secret="s" * 64).id


class Harness:
    """A broker bound to some settings, a Recorder, and helpers to send frames."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recorder = Recorder()
        self.broker = jobs.build_broker(settings)
        self.broker.add_middleware(self.recorder)
        assert self.broker.runner is not None
        self.runner: jobs.JobRunner = self.broker.runner
        self.actor = self.broker.get_actor(PROCESS_ACTOR)

    def send(self, account_id: int, frame: str, frame_id: str) -> None:
        self.actor.send(account_id=account_id, frame=frame, frame_id=frame_id, received_at=time.time() * 1000)

    def close(self) -> None:
        self.broker.close()


@pytest.fixture()
def harness_factory() -> Iterator[Any]:
    made: list[Harness] = []

    def make(settings: Settings) -> Harness:
        h = Harness(settings)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def scenario_frames(sim: Any, api_key: str, steps: int = 40) -> list[str]:
    collector = FrameCollector(sim, api_key)
    try:
        run_scenario(sim, api_key, steps=steps)
        expected = sim.stats()["frames_sent"][api_key]
        frames = collector.collect(lambda f: len(f) >= expected)
    finally:
        collector.close()
    assert len(frames) == expected
    return frames


def final_statuses(rows: dict[str, list[tuple[Any, ...]]]) -> dict[tuple[Any, ...], str]:
    """(account, kind, id) -> status, from the orders and from the last transition of each order."""
    by_order = {(r[0], r[1], r[2]): r[9] for r in rows["orders"]}
    assert {(t[0], t[1], t[2]) for t in rows["transitions"]} == set(by_order)
    return by_order


def fetch_audit(conn: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT frame_id, event_type, outcome, error, payload::text, raw_text FROM api_data_stream"
            " ORDER BY frame_id"
        )
        rows = cur.fetchall()
    conn.commit()
    return rows


# -- recorded frames -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_recorded_binance_samples_are_audited_with_their_outcome(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env))
    samples = load_jsonl("binance_samples.jsonl")
    for i, sample in enumerate(samples):
        outcome = h.runner.process_user_data_event(
            account_id, sample["frame"], f"sample-{i:03d}", time.time() * 1000
        )
        assert outcome == sample["outcome"], sample["note"]
    rows = {r[0]: r for r in fetch_audit(db)}
    assert len(rows) == len(samples)  # every frame audited exactly once, whatever it held
    for i, sample in enumerate(samples):
        assert rows[f"sample-{i:03d}"][2] == sample["outcome"], sample["note"]
    # the listenKey of listenKeyExpired is scrubbed; numbers kept exactly as sent
    expired = next(r for r in rows.values() if r[1] == "listenKeyExpired")
    assert "WsCMN0a4KHUPTQuX6IUnqEZfB1inxmv1qR4kbf1LuEjur5VdbzqvyxqG9TSjVVxv" not in (expired[4] or "")
    assert '"listenKey": "***"' in expired[4]
    assert all("WsCMN0a4KHUPTQuX6" not in (r[4] or "") + (r[5] or "") for r in rows.values())
    malformed = next(r for r in rows.values() if r[2] == "malformed")
    assert (
        malformed[4] is None
        and malformed[5].startswith('{"e":"ORDER_TRADE_UPDATE"')
        and "invalid JSON" in malformed[3]
    )
    nul = next(r for r in rows.values() if r[2] == "error")
    assert nul[4] is None and "nul" in nul[5]
    with db.cursor() as cur:
        cur.execute(
            "SELECT kind, exchange_order_id, status, filled_quantity, average_price FROM orders ORDER BY 2"
        )
        orders = cur.fetchall()
        cur.execute("SELECT asset, wallet_balance FROM account_balances ORDER BY 1")
        balances = cur.fetchall()
        cur.execute("SELECT symbol, position_side, amount, entry_price FROM account_positions ORDER BY 1, 2")
        positions = cur.fetchall()
    db.commit()
    assert orders == [
        ("algo", 2148719, "CANCELED", Decimal("0.00000"), Decimal("0.00000")),
        ("regular", 8886774, "CANCELED", Decimal("0"), Decimal("0")),
        ("regular", 8886775, "PARTIALLY_FILLED", Decimal("0.250"), Decimal("2500.10")),
    ]
    assert balances == [("BUSD", Decimal("1.00000000")), ("USDT", Decimal("122624.12345678"))]
    assert positions == [
        ("BTCUSDT", "BOTH", Decimal("0"), Decimal("0.00000")),
        ("BTCUSDT", "LONG", Decimal("20"), Decimal("6563.66500")),
    ]


@pytest.mark.integration
def test_recorded_simulator_session_replays_to_the_recorded_truth(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(
        make_settings(job_env, user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS)
    )
    frames = [r["frame"] for r in load_jsonl("sim_session_frames.jsonl")]
    with open(FIXTURES / "sim_session_truth.json") as f:
        truth = json.load(f)
    ids = FrameIds(account_id)
    for frame in frames:
        h.send(account_id, frame, ids.next())
    with running_worker(h.broker, threads=8):
        wait_for(lambda: audit_count(db) == len(frames), 60, message="every recorded frame audited")
        h.broker.join(h.settings.user_data_stream.queue_name, timeout=30_000)
    assert truth_mismatches(db, account_id, truth) == []
    with db.cursor() as cur:
        cur.execute(
            "SELECT wallet_balance FROM account_balances WHERE account_id = %s AND asset = 'USDT'",
            (account_id,),
        )
        assert cur.fetchone()[0] == Decimal(truth["wallet_balance"])
        cur.execute(
            "SELECT count(*) FROM api_data_stream WHERE outcome NOT IN ('dispatched', 'audited', 'applied')"
        )
        assert cur.fetchone()[0] == 0
    db.commit()


# -- ordering and idempotency --------------------------------------------------------------------------


@pytest.mark.integration
def test_shuffled_duplicated_frames_on_8_threads_give_identical_rows(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    accounts = add_sim_accounts(db, secret_key, simulator, 2)
    h = harness_factory(
        make_settings(job_env, user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS)
    )
    tagged: list[tuple[int, str, str]] = []
    for account in accounts:
        ids = FrameIds(account.id)
        tagged += [(account.id, ids.next(), f) for f in scenario_frames(simulator, account.api_key, steps=60)]

    # reference: every frame once, in order, one thread
    for account_id, frame_id, frame in tagged:
        h.runner.process_user_data_event(account_id, frame, frame_id, time.time() * 1000)
    reference = state_rows(db)
    for account in accounts:
        assert truth_mismatches(db, account.id, simulator.truth(account.api_key)) == []
    assert len(reference["orders"]) > 20 and reference["transitions"]

    with db.cursor() as cur:
        cur.execute(
            "TRUNCATE order_transitions, orders, api_data_stream, account_balances, account_positions"
        )
    db.commit()

    # the same frames shuffled, a third of them two or three times, on 8 worker threads
    rng = random.Random(4)
    messages = (
        list(tagged) + [t for t in tagged if rng.random() < 0.33] + [t for t in tagged if rng.random() < 0.1]
    )
    rng.shuffle(messages)
    for account_id, frame_id, frame in messages:
        h.send(account_id, frame, frame_id)
    with running_worker(h.broker, threads=8):
        wait_for(lambda: len(h.recorder.done) >= len(messages), 120, message="every message processed")
    assert all(exc is None for _, _, exc in h.recorder.done)
    assert audit_count(db) == len(tagged)  # duplicates audited once
    shuffled = state_rows(db)
    for table in ("orders", "balances", "positions"):
        assert shuffled[table] == reference[table], table
    # transitions depend on what each run saw (a shuffled run may skip an intermediate status), but
    # every order's transitions end at its final status and never run backwards
    assert final_statuses(shuffled) == final_statuses(reference)
    for account in accounts:
        assert truth_mismatches(db, account.id, simulator.truth(account.api_key)) == []


@pytest.mark.integration
def test_redelivered_frame_does_nothing_twice(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env))
    frame = load_jsonl("binance_samples.jsonl")[2]["frame"]  # a TRADE
    assert h.runner.process_user_data_event(account_id, frame, "f-1", 1.7e12) == "dispatched"
    assert h.runner.process_user_data_event(account_id, frame, "f-1", 1.7e12) == "duplicate"
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM api_data_stream")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM order_transitions")
        assert cur.fetchone()[0] == 1
    db.commit()


@pytest.mark.integration
def test_account_update_is_monotonic_by_event_time(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env))

    def update(e: int, wb: str, pa: str) -> str:
        return json.dumps(
            {
                "e": "ACCOUNT_UPDATE",
                "E": e,
                "T": e - 1,
                "a": {
                    "m": "ORDER",
                    "B": [{"a": "USDT", "wb": wb, "cw": wb, "bc": "0"}],
                    "P": [
                        {
                            "s": "BTCUSDT",
                            "pa": pa,
                            "ep": "1",
                            "bep": "1",
                            "up": "0",
                            "mt": "cross",
                            "iw": "0",
                            "ps": "BOTH",
                        }
                    ],
                },
            }
        )

    h.runner.process_user_data_event(account_id, update(2000, "20.00000001", "2"), "a-2", None)
    h.runner.process_user_data_event(account_id, update(1000, "10", "1"), "a-1", None)  # older, arrives late
    with db.cursor() as cur:
        cur.execute("SELECT wallet_balance, event_time_ms FROM account_balances")
        assert cur.fetchall() == [(Decimal("20.00000001"), 2000)]
        cur.execute("SELECT amount, event_time_ms FROM account_positions")
        assert cur.fetchall() == [(Decimal("2"), 2000)]
    db.commit()
    h.runner.process_user_data_event(account_id, update(3000, "30", "0"), "a-3", None)
    with db.cursor() as cur:
        cur.execute("SELECT wallet_balance FROM account_balances")
        assert cur.fetchall() == [(Decimal("30"),)]
    db.commit()


# -- dispatch allowlist --------------------------------------------------------------------------------


@pytest.mark.integration
def test_shadow_mode_audits_and_touches_no_order(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    h = harness_factory(make_settings(job_env, user_data_stream__binance__dispatched_executions=""))
    assert h.settings.user_data_stream.binance.dispatched_executions == []
    frames = scenario_frames(simulator, account.api_key, steps=20)
    ids = FrameIds(account.id)
    for frame in frames:
        h.send(account.id, frame, ids.next())
    with running_worker(h.broker, threads=8):
        wait_for(lambda: audit_count(db) == len(frames), 60, message="all frames audited")
        h.broker.join(h.settings.user_data_stream.queue_name, timeout=30_000)
    rows = state_rows(db)
    assert (
        rows["orders"] == []
        and rows["balances"] == []
        and rows["positions"] == []
        and rows["transitions"] == []
    )
    with db.cursor() as cur:
        cur.execute("SELECT event_type, outcome, count(*) FROM api_data_stream GROUP BY 1, 2 ORDER BY 1, 2")
        counts = cur.fetchall()
    db.commit()
    assert ("ORDER_TRADE_UPDATE", "shadow") in [(e, o) for e, o, _ in counts]
    assert {o for e, o, _ in counts if e in ("ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE")} == {
        "shadow"
    }
    assert {o for e, o, _ in counts if e == "TRADE_LITE"} == {"audited"}


@pytest.mark.integration
def test_default_allowlist_skips_new_and_never_counts_trade_lite(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    h = harness_factory(make_settings(job_env))
    api_key = account.api_key
    collector = FrameCollector(simulator, api_key)
    try:
        o1 = simulator.place_order(
            api_key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="86000.10"
        )
        simulator.place_order(api_key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1", price="3000")
        simulator.fill(api_key, o1, qty="0.004")
        frames = collector.collect(lambda f: len(f) >= simulator.stats()["frames_sent"][api_key])
    finally:
        collector.close()
    ids = FrameIds(account.id)
    outcomes = [h.runner.process_user_data_event(account.id, f, ids.next(), None) for f in frames]
    kinds = [(json.loads(f)["e"], json.loads(f).get("o", {}).get("x")) for f in frames]
    assert dict(zip(kinds, outcomes, strict=True))[("ORDER_TRADE_UPDATE", "NEW")] == "skipped"
    assert dict(zip(kinds, outcomes, strict=True))[("ORDER_TRADE_UPDATE", "TRADE")] == "dispatched"
    assert dict(zip(kinds, outcomes, strict=True))[("TRADE_LITE", None)] == "audited"
    with db.cursor() as cur:
        cur.execute("SELECT exchange_order_id, status, filled_quantity FROM orders")
        # only the traded order exists (its NEW was skipped); the fill counted once despite TRADE_LITE
        assert cur.fetchall() == [(o1, "PARTIALLY_FILLED", Decimal("0.004"))]
    db.commit()


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_malformed_unknown_oversized_frames_never_stop_the_worker(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env))
    bad = [
        ("not json at all", "malformed"),
        ("", "malformed"),
        ("\udcff\ufffd garbage", "malformed"),
        ('{"e": 42}', "not_object"),
        ("null", "not_object"),
        ('{"e":"NEVER_SEEN","E":1}', "unknown"),
        ('{"e":"ORDER_TRADE_UPDATE","E":1,"o":"string"}', "invalid"),
        ('{"e":"ACCOUNT_UPDATE","E":1,"a":{"B":[{"a":"USDT","wb":"x"}]}}', "invalid"),
        ('{"e":"ACCOUNT_UPDATE","a":{"B":[]}}', "invalid"),
        (
            '{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","x":"TRADE","X":"FILLED","i":99999999999999999999999}}',
            "error",
        ),  # bigint overflow: PostgreSQL refuses, audited with the error
        (
            '{"e":"ORDER_TRADE_UPDATE","E":1,"o":' + '{"x":"TRADE","pad":"' + "x" * (1024 * 1024) + '"}}',
            "oversized",
        ),
    ]
    for i, (frame, _) in enumerate(bad):
        h.send(account_id, frame, f"bad-{i:02d}")
    good = load_jsonl("binance_samples.jsonl")[2]["frame"]
    h.send(account_id, good, "good-after-bad")
    with running_worker(h.broker, threads=4):
        wait_for(lambda: audit_count(db) == len(bad) + 1, 60, message="every frame audited")
        h.broker.join(h.settings.user_data_stream.queue_name, timeout=30_000)
    rows = {r[0]: r for r in fetch_audit(db)}
    for i, (_, outcome) in enumerate(bad):
        assert rows[f"bad-{i:02d}"][2] == outcome, bad[i][0][:80]
    assert rows["good-after-bad"][2] == "dispatched"
    assert len(rows["bad-10"][5]) <= 8192  # oversized: only a prefix kept
    # processed once each: nothing was retried
    assert len(h.recorder.done) == len(bad) + 1 and all(exc is None for _, _, exc in h.recorder.done)


@pytest.mark.integration
def test_database_down_retries_then_succeeds(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    settings = make_settings(job_env)
    real_url = settings.database_url
    settings.database_url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    h = harness_factory(settings)
    frame = load_jsonl("binance_samples.jsonl")[2]["frame"]
    h.send(account_id, frame, "retry-me")
    with running_worker(h.broker, threads=2):
        wait_for(lambda: len(h.recorder.done) >= 2, 30, message="at least two failed attempts")
        assert audit_count(db) == 0
        assert all(isinstance(exc, dramatiq.Retry) for _, _, exc in h.recorder.done)
        settings.database_url = real_url  # PostgreSQL "comes back"
        wait_for(lambda: audit_count(db) == 1, 30, message="the retried frame audited")
    with db.cursor() as cur:
        cur.execute("SELECT outcome FROM api_data_stream WHERE frame_id = 'retry-me'")
        assert cur.fetchone()[0] == "dispatched"
    db.commit()


# -- observers -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_transitions_published_and_failing_observer_loses_nothing(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        job_env,
        jobs__observers="kraite_mp.observers.publish_transition,no_such_module.observer",
        user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS,
    )
    h = harness_factory(settings)
    client = redis.Redis.from_url(settings.redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(transitions_channel(settings))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    samples = load_jsonl("binance_samples.jsonl")
    try:
        h.runner.process_user_data_event(account_id, samples[0]["frame"], "o-new", None)
        h.runner.process_user_data_event(account_id, samples[1]["frame"], "o-cancel", None)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            m = pubsub.get_message(timeout=1)
            if m and m["type"] == "message":
                got.append(json.loads(m["data"]))
    finally:
        pubsub.close()
        client.close()
    assert [(g["from"], g["to"], g["exchange_order_id"]) for g in got] == [
        (None, "NEW", 8886774),
        ("NEW", "CANCELED", 8886774),
    ]
    assert got[1]["order"]["price"] == "0" and got[1]["account_id"] == account_id
    assert "observer no_such_module.observer failed" in caplog.text
    with db.cursor() as cur:
        cur.execute("SELECT status FROM orders")
        assert cur.fetchall() == [("CANCELED",)]
    db.commit()


# -- broker ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_consumer_idle_poll_is_capped_only_for_the_frame_queue(
    job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env, jobs__idle_poll_ms="7"))
    assert h.broker.consume("user-data-stream", prefetch=4, timeout=1000).timeout == 7
    assert h.broker.consume("reconcile", prefetch=4, timeout=1000).timeout == 1000


@pytest.mark.integration
def test_spool_record_round_trip_to_the_actor(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    """What the child enqueues (a spool record -> Message on a bare producer broker) the worker runs."""
    settings = make_settings(job_env)
    h = harness_factory(settings)
    producer = build_producer_broker(settings)
    frame = load_jsonl("binance_samples.jsonl")[4]["frame"]
    producer.enqueue(
        record_message(
            frame_record(settings.user_data_stream.queue_name, account_id, frame, "rt-1", time.time() * 1000)
        )
    )
    producer.close()
    with running_worker(h.broker, threads=2):
        wait_for(lambda: audit_count(db) == 1, 30, message="frame audited")
    assert h.recorder.actors(PROCESS_ACTOR)[0]["frame_id"] == "rt-1"


@pytest.mark.integration
def test_dramatiq_cli_runs_the_module_as_is(
    db: Any, account_id: int, job_env: dict[str, str], run_dir: str, processes: Any
) -> None:
    """``dramatiq kraite_mp.jobs``: the module sets the broker from load_settings()."""
    settings = make_settings(job_env)
    log_path = os.path.join(run_dir, "dramatiq.log")
    with open(log_path, "wb") as out:
        proc = processes.start(
            [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "2"],
            job_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    producer = build_producer_broker(settings)
    try:
        frame = load_jsonl("binance_samples.jsonl")[2]["frame"]
        producer.enqueue(
            record_message(
                frame_record(
                    settings.user_data_stream.queue_name, account_id, frame, "cli-1", time.time() * 1000
                )
            )
        )
        wait_for(lambda: audit_count(db) == 1, 60, message="the dramatiq CLI worker processed the frame")
    finally:
        producer.close()
    assert proc.poll() is None
    with db.cursor() as cur:
        cur.execute("SELECT outcome FROM api_data_stream")
        assert cur.fetchone()[0] == "dispatched"
    db.commit()


@pytest.mark.integration
def test_concurrent_duplicates_of_one_frame_audit_once(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(make_settings(job_env))
    frame = load_jsonl("binance_samples.jsonl")[5]["frame"]  # ACCOUNT_UPDATE
    results: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        out = h.runner.process_user_data_event(account_id, frame, "same-id", None)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["applied"] + ["duplicate"] * 7
    assert audit_count(db) == 1


@pytest.mark.integration
def test_last_trade_id_does_not_depend_on_arrival_order(
    db: Any, account_id: int, job_env: dict[str, str], harness_factory: Any
) -> None:
    h = harness_factory(
        make_settings(job_env, user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS)
    )
    trade = {
        "e": "ORDER_TRADE_UPDATE",
        "E": 11,
        "T": 10,
        "o": {
            "s": "XRPUSDT",
            "i": 77,
            "x": "TRADE",
            "X": "PARTIALLY_FILLED",
            "q": "10",
            "z": "4",
            "l": "4",
            "ap": "2",
            "p": "2",
            "T": 10,
            "t": 555,
        },
    }
    expired = {
        "e": "ORDER_TRADE_UPDATE",
        "E": 21,
        "T": 20,
        "o": {
            "s": "XRPUSDT",
            "i": 77,
            "x": "EXPIRED",
            "X": "EXPIRED",
            "q": "10",
            "z": "4",
            "l": "0",
            "ap": "2",
            "p": "2",
            "T": 20,
            "t": 0,
        },
    }
    h.runner.process_user_data_event(account_id, json.dumps(expired), "late-2", None)
    h.runner.process_user_data_event(account_id, json.dumps(trade), "late-1", None)
    with db.cursor() as cur:
        cur.execute("SELECT status, filled_quantity, last_trade_id FROM orders")
        row = cur.fetchone()
    db.commit()
    assert row == ("EXPIRED", Decimal("4"), 555)


@pytest.mark.integration
def test_reconcile_job_reads_the_exchange_and_retries_after_a_429(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    h = harness_factory(settings_from(sim_env(job_env, simulator)))
    order_id = simulator.place_order(
        account.api_key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="86000.10"
    )
    simulator.rate_limit(status=429, count=1, retry_after_s=1.0)
    h.broker.get_actor(RECONCILE_ACTOR).send(account_id=account.id, reason="reconnect:test")
    with running_worker(h.broker, threads=2):
        wait_for(
            lambda: any(exc is None for _, _, exc in h.recorder.done), 60, message="a successful reconcile"
        )
    attempts = [exc for actor, _, exc in h.recorder.done if actor == RECONCILE_ACTOR]
    assert (
        isinstance(attempts[0], dramatiq.Retry) and attempts[-1] is None
    )  # 429 -> retried after Retry-After
    with db.cursor() as cur:
        cur.execute(
            "SELECT exchange_order_id, status, last_source FROM orders WHERE account_id = %s", (account.id,)
        )
        assert cur.fetchall() == [(order_id, "NEW", "rest")]
    db.commit()


def order_status(db: Any, account_id: int, order_id: int) -> str | None:
    with db.cursor() as cur:
        cur.execute(
            "SELECT status FROM orders WHERE account_id = %s AND kind = 'regular' AND exchange_order_id = %s",
            (account_id, order_id),
        )
        row = cur.fetchone()
    db.commit()
    return None if row is None else str(row[0])


@pytest.mark.integration
def test_a_gap_sweep_defers_the_history_to_a_background_sweep_that_leaves_half_the_budget(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    from kraite_mp.binance.budget import reset_budgets, shared_budget
    from kraite_mp.messages import broker_namespace

    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    settings = settings_from(sim_env(job_env, simulator, binance__egress_id=f"hist-{uuid.uuid4().hex[:8]}"))
    assert (settings.supervisor.gap_sweep_max_s, settings.supervisor.gap_sweep_history) == (
        3600.0,
        "deferred",
    )
    h = harness_factory(settings)
    key = account.api_key
    simulator.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0")
    reconcile = h.broker.get_actor(RECONCILE_ACTOR)
    client = redis.Redis.from_url(settings.redis_url)
    delayed = f"{broker_namespace(settings)}:reconcile.DQ.msgs"
    try:
        with running_worker(h.broker, threads=2):
            reconcile.send(account_id=account.id, reason="connect")  # the first connect: a full sweep
            wait_for(lambda: len(h.recorder.succeeded(RECONCILE_ACTOR)) == 1, 60, message="the full sweep")

            def gap(price: str) -> tuple[int, int]:
                """A gap in which an order is placed and canceled unfilled on the active symbol."""
                start_ms = int(time.time() * 1000)
                time.sleep(0.01)
                order = simulator.place_order(
                    key, symbol="BTCUSDT", side="SELL", type="LIMIT", quantity="0.010", price=price
                )
                simulator.cancel(key, order)
                return start_ms, order

            start_ms, unfilled = gap("99000.0")
            history_calls = simulator.stats()["requests"].get("/fapi/v1/allOrders", 0)
            reconcile.send(account_id=account.id, reason="reconnect", gap_start_ms=start_ms)
            wait_for(
                lambda: len(h.recorder.succeeded(RECONCILE_ACTOR)) == 3,
                60,
                message="the gap and history sweeps",
            )
            # the gap sweep sent the history sweep, which found the order the gap sweep could not see
            assert [k.get("history", {}).get("attempt") for k in h.recorder.succeeded(RECONCILE_ACTOR)] == [
                None,
                None,
                0,
            ]
            assert order_status(db, account.id, unfilled) == "CANCELED"
            assert simulator.stats()["requests"].get("/fapi/v1/allOrders", 0) == history_calls + 1

            # more than half of the budget's window spent by others: the history sweep sends itself again for
            # later instead of taking the weight, and gives its worker thread back
            budget = shared_budget(settings)
            assert budget.try_take(budget.limit // 2 + 10)[0]
            start_ms, hidden = gap("98000.0")
            history_calls = simulator.stats()["requests"].get("/fapi/v1/allOrders", 0)
            reconcile.send(account_id=account.id, reason="reconnect", gap_start_ms=start_ms)
            wait_for(
                lambda: len(h.recorder.succeeded(RECONCILE_ACTOR)) == 5, 60, message="the deferred sweep"
            )
            wait_for(lambda: client.hlen(delayed) == 1, 30, message="the history sweep sent again")
            (later,) = [json.loads(v) for v in client.hvals(delayed)]
            assert (
                later["kwargs"]["history"]["attempt"] == 1
                and later["options"]["eta"] > time.time() * 1000 + 29_000
            )
            assert simulator.stats()["requests"].get("/fapi/v1/allOrders", 0) == history_calls  # nothing sent
            assert order_status(db, account.id, hidden) is None
    finally:
        client.close()
        reset_budgets()


@pytest.mark.integration
def test_reconcile_job_with_rejected_key_marks_the_account_and_ends(
    db: Any, simulator: Any, secret_key: str, job_env: dict[str, str], harness_factory: Any
) -> None:
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    h = harness_factory(settings_from(sim_env(job_env, simulator)))
    simulator.invalidate_api_key(account.api_key)
    h.broker.get_actor(RECONCILE_ACTOR).send(account_id=account.id, reason="connect")
    with running_worker(h.broker, threads=2):
        wait_for(lambda: h.recorder.actors(RECONCILE_ACTOR), 60, message="the reconcile job ran")
        time.sleep(0.5)
    assert [exc for _, _, exc in h.recorder.done] == [None]  # not retried
    with db.cursor() as cur:
        cur.execute("SELECT credentials_error FROM accounts WHERE id = %s", (account.id,))
        assert "-2015" in cur.fetchone()[0]
    db.commit()


# -- unit tier: decide() and the actors on a StubBroker, no services --------------------------------------

ALL_KEYS = ALL_DISPATCH_KEYS.split(",")


def dead_db_settings(**environ: str) -> Settings:
    """Settings whose PostgreSQL refuses connections (a closed port; the URL carries a password)."""
    env = {
        "KRAITE_DATABASE_URL": f"postgresql://postgres:hunter2hunter2@127.0.0.1:{free_port()}/nothing",
        "KRAITE__jobs__retry_min_backoff_ms": "60000",
        **environ,
    }
    return load_settings(None, environ=env)


@pytest.mark.unit
def test_decide_gives_every_recorded_sample_its_recorded_outcome() -> None:
    for i, sample in enumerate(load_jsonl("binance_samples.jsonl")):
        outcome = decide(parse_frame(1, sample["frame"]), DEFAULT_DISPATCHED_EXECUTIONS)
        # "error" samples are refused by PostgreSQL itself: decide() audits them like their event type
        expected = "audited" if sample["outcome"] == "error" else sample["outcome"]
        assert outcome.outcome == expected, (i, sample["note"])
        assert (outcome.order is not None) == (expected == "dispatched"), sample["note"]
        assert (outcome.account is not None) == (expected == "applied"), sample["note"]


@pytest.mark.unit
def test_decide_checks_shadow_then_dispatch_key_then_allowlist_then_body() -> None:
    broken_trade = parse_frame(
        1, '{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"B","x":"TRADE","X":"FILLED"}}'
    )
    no_key = parse_frame(1, '{"e":"ORDER_TRADE_UPDATE","E":1,"o":"string"}')
    broken_new = parse_frame(1, '{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"B","x":"NEW","X":"NEW"}}')
    broken_account = parse_frame(1, '{"e":"ACCOUNT_UPDATE","a":{"B":[]}}')
    assert broken_trade.error == "o.i: missing"
    for event in (broken_trade, no_key, broken_new, broken_account):
        assert decide(event, []) == Outcome(AuditOutcome.SHADOW)  # shadow mode audits anything known
    assert decide(no_key, ALL_KEYS) == Outcome(AuditOutcome.INVALID, "no dispatch key (o.x / o.X missing)")
    assert decide(broken_new, DEFAULT_DISPATCHED_EXECUTIONS) == Outcome(
        AuditOutcome.SKIPPED, "NEW is not dispatched"
    )
    assert decide(broken_trade, ALL_KEYS) == Outcome(AuditOutcome.INVALID, "o.i: missing")
    assert decide(broken_account, ALL_KEYS) == Outcome(AuditOutcome.INVALID, "E: missing event time")
    unknown = decide(parse_frame(1, '{"e":"NEW_THING","E":1}'), ALL_KEYS)
    assert unknown == Outcome(AuditOutcome.UNKNOWN, "unknown event type 'NEW_THING'")
    malformed = decide(parse_frame(1, "{oops"), ALL_KEYS)
    assert malformed.outcome == "malformed" and malformed.error and malformed.error.startswith("invalid JSON")
    # the persisted strings are exactly the old ones
    assert {o.value for o in AuditOutcome} == {
        "dispatched",
        "skipped",
        "shadow",
        "applied",
        "audited",
        "unknown",
        "malformed",
        "not_object",
        "oversized",
        "invalid",
        "error",
        "duplicate",
    }
    assert {k.value for k in FrameKind} - {"event"} <= {o.value for o in AuditOutcome}


@pytest.mark.unit
def test_finish_reconcile_retries_only_when_the_exchange_says_later() -> None:
    def result(status: ReconcileStatus, **kw: Any) -> ReconcileResult:
        return ReconcileResult(1, "alice", status=status, **kw)

    with pytest.raises(dramatiq.Retry) as limited:
        finish_reconcile(1, "connect", result(ReconcileStatus.RATE_LIMITED, retry_after_s=2.5))
    assert limited.value.delay == 2500
    with pytest.raises(dramatiq.Retry) as unknown_wait:
        finish_reconcile(1, "connect", result(ReconcileStatus.RATE_LIMITED))
    assert unknown_wait.value.delay == 60_000
    with pytest.raises(dramatiq.Retry) as short:
        finish_reconcile(1, "connect", result(ReconcileStatus.RATE_LIMITED, retry_after_s=0.01))
    assert short.value.delay == 1000
    with pytest.raises(dramatiq.Retry) as transient:
        finish_reconcile(1, "connect", result(ReconcileStatus.TRANSIENT, error="timed out"))
    assert transient.value.delay is None
    for status in (ReconcileStatus.OK, ReconcileStatus.INVALID_CREDENTIALS, ReconcileStatus.ERROR):
        finish_reconcile(1, "connect", result(status))  # ends here: no retry


@pytest.mark.unit
def test_actors_on_a_stub_broker_retry_while_postgres_is_down(
    stub_broker: StubBroker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dead_db_settings()
    runner = jobs.declare_actors(stub_broker, settings)
    assert runner.settings is settings
    process = stub_broker.get_actor(PROCESS_ACTOR)
    reconcile_job = stub_broker.get_actor(RECONCILE_ACTOR)
    assert (process.queue_name, reconcile_job.queue_name) == ("user-data-stream", "reconcile")
    recorder = Recorder()
    stub_broker.add_middleware(recorder)
    process.send(
        account_id=5,
        frame=load_jsonl("binance_samples.jsonl")[2]["frame"],
        frame_id="stub-1",
        received_at=1.7e12,
    )
    reconcile_job.send(account_id=5, reason="connect")
    with caplog.at_level("WARNING", logger="kraite_mp.jobs"), running_worker(stub_broker, threads=2):
        wait_for(lambda: len(recorder.done) >= 2, 10, message="both messages tried once")
    assert sorted(actor for actor, _, _ in recorder.done) == [PROCESS_ACTOR, RECONCILE_ACTOR]
    assert all(isinstance(exc, dramatiq.Retry) for _, _, exc in recorder.done)
    assert "frame stub-1: PostgreSQL unavailable (" in caplog.text
    assert "reconcile of account 5: PostgreSQL unavailable (" in caplog.text
    assert "the message will be retried" in caplog.text and "hunter2hunter2" not in caplog.text


@pytest.mark.unit
def test_redact_filter_and_describe_error_keep_secrets_out_of_log_lines() -> None:
    import logging

    register_secret("S3CR3TS3CR3TS3CR3T")
    record = logging.LogRecord(
        "dramatiq", logging.ERROR, __file__, 1, "failed with %s", ("S3CR3TS3CR3TS3CR3T",), None
    )
    assert RedactFilter().filter(record) and record.getMessage() == "failed with ***"
    assert describe_error(ValueError("bad S3CR3TS3CR3TS3CR3T\nsecond line")) == "bad ***"
    assert describe_error(ValueError("  ")) == "ValueError"
    assert describe_error(KeyError(), "lookup failed") == "lookup failed"


@pytest.mark.unit
def test_transient_failures_are_retried_without_limit_and_bugs_max_retries_times() -> None:
    policy = jobs.transient_retry_policy(3)
    retry = dramatiq.Retry("PostgreSQL unavailable: OperationalError")
    assert all(policy(n, retry) for n in (0, 3, 20, 10_000))  # a database outage never dead-letters a frame
    assert [policy(n, ValueError("bug")) for n in range(5)] == [True, True, True, False, False]
    retries = next(m for m in jobs.job_middleware(load_settings(None, environ={})) if isinstance(m, Retries))
    assert retries.retry_when is not None and retries.retry_when(500, retry)
