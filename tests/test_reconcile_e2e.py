"""End to end: `kraite-mp run` (real user-data child) + a real `dramatiq kraite_mp.jobs` worker.

The simulator loses the account's frames while the stream is gone (silent connection, listenKey
expiry); after the reconnect the child requests a reconciliation, the worker runs it, and the
orders table equals the simulator's truth within seconds -- with the gap closed by REST.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
from support import wait_for
from test_reconcile import (
    assert_account_equals_truth,
    assert_equals_truth,
    db_orders,
    db_positions,
    stream_saw,
)

from kraite_mp.store.accounts import add_account


def matches_truth(db: Any, account_id: int, truth: dict[str, Any]) -> bool:
    try:
        assert_equals_truth(db, account_id, truth)
    except AssertionError:
        return False
    return True


def rest_transitions(db: Any, account_id: int) -> int:
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM order_transitions WHERE account_id = %s AND source = 'rest'", (account_id,)
        )
        (count,) = cur.fetchone()
    db.commit()
    return int(count)


def start_daemon(
    sim: Any, db: Any, settings: Any, kraite_env: dict[str, str], processes: Any, run_dir: str, **extra: str
) -> dict[str, Any]:
    account = add_account(
        db,
        settings.secret_key,
        name="e2e",
        api_key=sim.accounts[0].api_key,
        api_secret=sim.accounts[0].api_secret,
    )
    env = dict(
        kraite_env,
        KRAITE_BINANCE_REST_URL=sim.rest_url,
        KRAITE_BINANCE_WS_URL=sim.ws_url,
        # only the on-reconnect reconciliation may close the gap: no periodic sync, no mark prices
        KRAITE__supervisor__sync_interval_s="0",
        KRAITE__supervisor__mark_price="false",
        # notice a silent connection within a few seconds
        KRAITE__user_data_stream__ping_interval_s="1",
        KRAITE__user_data_stream__pong_timeout_s="2",
        **extra,
    )
    processes.kraite("run", env=env, **processes.log_to(run_dir, "supervisor"))
    processes.start(
        [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "2"],
        env,
        **processes.log_to(run_dir, "dramatiq"),
    )
    key = sim.accounts[0].api_key
    assert sim.wait_for_connections(key, 1, timeout=60), "the user-data child never connected"
    return {"sim": sim, "db": db, "account": account, "key": key}


@pytest.fixture()
def daemon(
    simulator: Any, db: Any, settings: Any, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> dict[str, Any]:
    return start_daemon(simulator, db, settings, kraite_env, processes, run_dir)


def streamed_until_equal(d: dict[str, Any], message: str) -> None:
    sim, db, account, key = d["sim"], d["db"], d["account"], d["key"]
    wait_for(lambda: matches_truth(db, account.id, sim.truth(key)), timeout=60, message=message)


@pytest.mark.e2e
def test_orders_changed_while_the_stream_was_silent_equal_truth_after_reconnect(
    daemon: dict[str, Any],
) -> None:
    sim, db, account, key = daemon["sim"], daemon["db"], daemon["account"], daemon["key"]
    ids = [
        sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price=f"4000{i}.0")
        for i in range(4)
    ]
    algo = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.5", trigger_price="1000.00"
    )
    streamed_until_equal(daemon, "the stream to deliver the first orders")
    before_rest = rest_transitions(db, account.id)
    lost_before = sim.stats()["events_lost"].get(key, 0)

    sim.go_silent(key, 4.0)  # TCP stays open, nothing is delivered: every event now is lost
    sim.fill(key, ids[0])
    sim.fill(key, ids[1], qty="0.004")
    sim.cancel(key, ids[2])
    sim.trigger_algo(key, algo)  # the regular order it creates fills at once
    new = sim.place_order(key, symbol="SOLUSDT", side="SELL", type="LIMIT", quantity="3", price="300.000")
    assert sim.stats()["events_lost"].get(key, 0) > lost_before

    streamed_until_equal(
        daemon, "reconciliation after the reconnect to make the orders table equal the truth"
    )
    stored = db_orders(db, account.id)
    assert stored[("regular", ids[0])]["status"] == "FILLED" and stored[("regular", new)]["status"] == "NEW"
    assert rest_transitions(db, account.id) > before_rest  # the gap was closed by REST, not by frames


def account_matches_truth(db: Any, account_id: int, truth: dict[str, Any]) -> bool:
    try:
        assert_account_equals_truth(db, account_id, truth)
    except AssertionError:
        return False
    return True


@pytest.mark.e2e
def test_positions_and_balances_changed_while_the_stream_was_silent_equal_truth_after_reconnect(
    daemon: dict[str, Any],
) -> None:
    sim, db, account, key = daemon["sim"], daemon["db"], daemon["account"], daemon["key"]
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.020")
    sim.place_order(key, symbol="ETHUSDT", side="SELL", type="MARKET", quantity="1.000")
    wait_for(
        lambda: account_matches_truth(db, account.id, sim.truth(key)),
        timeout=60,
        message="the stream to deliver the first positions",
    )
    lost_before = sim.stats()["events_lost"].get(key, 0)

    sim.go_silent(key, 4.0)  # every ACCOUNT_UPDATE from now on is lost
    sim.place_order(key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.020")  # closed
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="0.250")  # reduced
    sim.place_order(key, symbol="XRPUSDT", side="BUY", type="MARKET", quantity="50")  # opened
    assert sim.stats()["events_lost"].get(key, 0) > lost_before

    wait_for(
        lambda: account_matches_truth(db, account.id, sim.truth(key)),
        timeout=60,
        message="reconciliation after the reconnect to make positions and balances equal the exchange's",
    )
    assert db_positions(db, account.id)[("BTCUSDT", "BOTH")]["amount"] == 0
    streamed_until_equal(daemon, "the orders table to equal the truth too")


@pytest.mark.e2e
def test_with_the_gap_sweep_a_silent_connection_gap_ends_equal_to_the_truth(
    simulator: Any, db: Any, settings: Any, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> None:
    """The gap sweep (supervisor.gap_sweep_max_s) after a half-open connection: the frames lost before the
    stream noticed (the gap's start) are found too, fills on a known and on a never-seen symbol included."""
    d = start_daemon(
        simulator, db, settings, kraite_env, processes, run_dir, KRAITE__supervisor__gap_sweep_max_s="3600"
    )
    sim, account, key = d["sim"], d["account"], d["key"]
    ids = [
        sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price=f"4000{i}.0")
        for i in range(3)
    ]
    sim.place_order(key, symbol="ETHUSDT", side="SELL", type="MARKET", quantity="1.000")
    streamed_until_equal(d, "the stream to deliver the first orders")
    wait_for(lambda: account_matches_truth(db, account.id, sim.truth(key)), timeout=60, message="positions")
    wait_for(
        lambda: sim.stats()["requests"].get("/fapi/v3/balance", 0) >= 1, timeout=60, message="first sweep"
    )
    accounts_before = sim.stats()["requests"].get("/fapi/v3/account", 0)

    sim.go_silent(key, 4.0)  # TCP stays open, nothing is delivered: every event now is lost
    sim.fill(key, ids[0])
    sim.cancel(key, ids[1])
    sim.place_order(key, symbol="DOGEUSDT", side="BUY", type="MARKET", quantity="100")  # never seen
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="0.400")  # reduced

    streamed_until_equal(d, "the gap sweep to make the orders table equal the truth")
    wait_for(
        lambda: account_matches_truth(db, account.id, sim.truth(key)),
        timeout=60,
        message="the gap sweep to make positions and balances equal the exchange's",
    )
    assert sim.stats()["requests"].get("/fapi/v3/account", 0) > accounts_before  # a gap sweep ran
    assert rest_transitions(db, account.id) > 0


@pytest.mark.e2e
def test_orders_changed_around_a_listen_key_expiry_equal_truth(daemon: dict[str, Any]) -> None:
    sim, db, account, key = daemon["sim"], daemon["db"], daemon["account"], daemon["key"]
    ids = [
        sim.place_order(key, symbol="ETHUSDT", side="SELL", type="LIMIT", quantity="1", price=f"500{i}.00")
        for i in range(3)
    ]
    streamed_until_equal(daemon, "the stream to deliver the first orders")
    lost_before = sim.stats()["events_lost"].get(key, 0)
    opened_before = sim.stats()["ws_opened"].get(key, 0)

    sim.expire_listen_key(key)  # listenKeyExpired, then that connection gets nothing more
    sim.fill(key, ids[0])
    sim.cancel(key, ids[1])
    sim.amend(key, ids[2], price="5100.00")
    lost_now = sim.stats()["events_lost"].get(key, 0)
    assert lost_now > lost_before  # the changes fell into the gap: only REST can bring them

    wait_for(
        lambda: sim.stats()["ws_opened"].get(key, 0) > opened_before,
        timeout=60,
        message="a new connection with a new listenKey",
    )
    streamed_until_equal(daemon, "the orders table to equal the truth after the listenKey expiry")
    assert rest_transitions(db, account.id) > 0


@pytest.mark.e2e
def test_periodic_sync_child_closes_the_gap_without_any_worker(
    simulator: Any, db: Any, settings: Any, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> None:
    """No dramatiq worker runs, so the on-demand reconcile never happens: the supervisor's periodic
    sync child (mode auto -> full, nothing swept yet) must bring the orders table to the truth."""
    sim = simulator
    key = sim.accounts[1].api_key
    account = add_account(
        db, settings.secret_key, name="periodic", api_key=key, api_secret=sim.accounts[1].api_secret
    )
    ids = [
        sim.place_order(key, symbol="BNBUSDT", side="BUY", type="LIMIT", quantity="1", price=f"50{i}.00")
        for i in range(3)
    ]
    stream_saw(db, account, sim.truth(key))  # what an earlier run of the daemon had streamed
    sim.fill(key, ids[0])  # ... and what happened while no daemon ran at all: only REST knows it
    sim.cancel(key, ids[1])
    sim.place_order(key, symbol="BNBUSDT", side="SELL", type="MARKET", quantity="2")  # placed and filled
    env = dict(
        kraite_env,
        KRAITE_BINANCE_REST_URL=sim.rest_url,
        KRAITE_BINANCE_WS_URL=sim.ws_url,
        KRAITE__supervisor__sync_interval_s="2",
        KRAITE__supervisor__mark_price="false",
    )
    processes.kraite("run", env=env, **processes.log_to(run_dir, "supervisor"))
    wait_for(
        lambda: matches_truth(db, account.id, sim.truth(key)),
        timeout=90,
        message="the periodic sync child to reconcile the account",
    )
    assert rest_transitions(db, account.id) >= 3 + 3  # 3 first sightings by stream_saw, then 3 changes
    # the sync child remembers its full sweep right after committing it: wait for the file, don't race it
    state_path = os.path.join(env["KRAITE_RUN_DIR"], "reconcile", f"account-{account.id}.json")
    wait_for(lambda: os.path.exists(state_path), timeout=30, message="the sync child's sweep state")
    with open(state_path) as f:
        assert json.load(f)["last_full_ms"] > 0  # the sync child ran a full sweep and remembered it
