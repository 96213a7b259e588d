"""REST reconciliation against real PostgreSQL and the simulator: the orders table ends equal to the truth."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from support import wait_for

from kraite_mp.binance.hosts import reset_host_state
from kraite_mp.binance.orders import algo_from_rest, order_from_rest, order_from_ws
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.binance.user import account_update_from_ws
from kraite_mp.config import Settings
from kraite_mp.reconcile.modes import choose_mode, mode_for_gap
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.reconcile.runner import reconcile_accounts, run_sync_child
from kraite_mp.reconcile.sweep import reconcile_account
from kraite_mp.store import account_state, audit, orders
from kraite_mp.store.accounts import Account, add_account, get_account
from kraite_mp.store.db import connect
from kraite_mp.supervisor.context import ChildContext
from kraite_mp.supervisor.runfiles import last_full_sweep_ms

#: What the test observer saw: (old status, new status, exchange order id).
OBSERVED: list[tuple[str | None, str, int]] = []


def record_observer(old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    OBSERVED.append((old["status"] if old else None, new["status"], new["exchange_order_id"]))


@pytest.fixture(autouse=True)
def _fresh_host_state() -> Iterator[None]:
    reset_host_state()
    OBSERVED.clear()
    yield
    reset_host_state()


@pytest.fixture()
def env(settings: Settings, simulator: Any, db: Any) -> dict[str, Any]:
    """Settings pointing at the simulator, and its three accounts in the database."""
    settings.binance.rest_url = simulator.rest_url
    settings.binance.ws_url = simulator.ws_url
    settings.jobs.observers = [f"{__name__}.record_observer"]
    accounts = [
        add_account(db, settings.secret_key, name=f"acct{i}", api_key=a.api_key, api_secret=a.api_secret)
        for i, a in enumerate(simulator.accounts)
    ]
    return {"settings": settings, "sim": simulator, "db": db, "accounts": accounts}


def stream_saw(db: Any, account: Account, truth: dict[str, Any]) -> None:
    """Pretend the stream delivered everything up to this truth snapshot."""
    with db.cursor() as cur:
        for o in truth["orders"]:
            orders.apply_order_update(cur, order_from_rest(account.id, o), frame_id=None)
        for a in truth["algo_orders"]:
            orders.apply_order_update(cur, algo_from_rest(account.id, a), frame_id=None)
    db.commit()


def db_orders(db: Any, account_id: int) -> dict[tuple[str, int], dict[str, Any]]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT kind, exchange_order_id, status, filled_quantity, quantity, price, average_price,"
            " actual_order_id, last_source FROM orders WHERE account_id = %s",
            (account_id,),
        )
        rows = cur.fetchall()
    db.commit()
    names = ("kind", "id", "status", "filled", "quantity", "price", "avg", "actual", "source")
    return {(r[0], int(r[1])): dict(zip(names, r, strict=True)) for r in rows}


def assert_equals_truth(db: Any, account_id: int, truth: dict[str, Any]) -> None:
    """The orders table holds exactly the truth, algo orders' fills included."""
    stored = db_orders(db, account_id)
    expected = {("regular", int(o["orderId"])) for o in truth["orders"]}
    expected |= {("algo", int(a["algoId"])) for a in truth["algo_orders"]}
    assert set(stored) == expected, f"missing {expected - set(stored)}, extra {set(stored) - expected}"
    for o in truth["orders"]:
        row = stored[("regular", int(o["orderId"]))]
        assert row["status"] == o["status"], (o["orderId"], row, o)
        assert row["filled"] == Decimal(o["executedQty"])
        assert row["quantity"] == Decimal(o["origQty"]) and row["price"] == Decimal(o["price"])
        if Decimal(o["executedQty"]) > 0:
            assert row["avg"] == Decimal(o["avgPrice"])
    for a in truth["algo_orders"]:
        row = stored[("algo", int(a["algoId"]))]
        assert row["status"] == a["algoStatus"], (a["algoId"], row, a)
        assert row["actual"] == (int(a["actualOrderId"]) if a["actualOrderId"] else None)
        if "actualQty" in a:  # once triggered: the filled quantity (2026-06-09 schema)
            assert row["filled"] == Decimal(a["actualQty"]), (a["algoId"], row, a)
            if Decimal(a["actualQty"]) > 0:
                assert row["avg"] == Decimal(a["actualPrice"]), (a["algoId"], row, a)


def audit_rows(db: Any, account_id: int) -> list[tuple[str, str, str, dict[str, Any]]]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT frame_id, source, outcome, payload FROM api_data_stream WHERE account_id = %s ORDER BY id",
            (account_id,),
        )
        rows = cur.fetchall()
    db.commit()
    return rows


def audit_event_types(db: Any, account_id: int) -> set[str]:
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT event_type FROM api_data_stream WHERE account_id = %s", (account_id,))
        types = {r[0] for r in cur.fetchall()}
    db.commit()
    return types


def db_positions(db: Any, account_id: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(symbol, side) -> the stored position row."""
    with db.cursor() as cur:
        cur.execute(
            "SELECT symbol, position_side, amount, entry_price, unrealized_pnl, margin_type, event_time_ms"
            " FROM account_positions WHERE account_id = %s",
            (account_id,),
        )
        rows = cur.fetchall()
    db.commit()
    names = ("amount", "entry", "upnl", "margin_type", "event_time_ms")
    return {(r[0], r[1]): dict(zip(names, r[2:], strict=True)) for r in rows}


def db_balances(db: Any, account_id: int) -> dict[str, dict[str, Any]]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT asset, wallet_balance, cross_wallet_balance, event_time_ms FROM account_balances"
            " WHERE account_id = %s",
            (account_id,),
        )
        rows = cur.fetchall()
    db.commit()
    return {r[0]: {"wallet": r[1], "cross": r[2], "event_time_ms": r[3]} for r in rows}


def stream_saw_account(db: Any, account: Account, truth: dict[str, Any], event_time_ms: int) -> None:
    """Pretend the stream delivered an ACCOUNT_UPDATE with these positions and this wallet at that time."""
    frame = {
        "e": "ACCOUNT_UPDATE",
        "E": event_time_ms,
        "T": event_time_ms,
        "a": {
            "m": "ORDER",
            "B": [{"a": "USDT", "wb": truth["wallet_balance"], "cw": truth["wallet_balance"], "bc": "0"}],
            "P": truth["positions"],
        },
    }
    with db.cursor() as cur:
        account_state.apply_account_update(cur, account_update_from_ws(account.id, frame))
    db.commit()


def assert_account_equals_truth(db: Any, account_id: int, truth: dict[str, Any]) -> None:
    """Every open position and the USDT wallet as the exchange has them; every other stored position is 0."""
    stored = db_positions(db, account_id)
    expected = {(p["s"], p["ps"]): p for p in truth["positions"]}
    open_rows = {k for k, row in stored.items() if row["amount"] != 0}
    assert open_rows == set(expected), f"open {sorted(open_rows)}, exchange {sorted(expected)}"
    for k, p in expected.items():
        assert stored[k]["amount"] == Decimal(p["pa"]) and stored[k]["entry"] == Decimal(p["ep"]), (
            k,
            stored[k],
            p,
        )
    usdt = db_balances(db, account_id).get("USDT")
    assert usdt is not None and usdt["wallet"] == Decimal(truth["wallet_balance"]), (
        usdt,
        truth["wallet_balance"],
    )


def write_heartbeat(
    settings: Settings, account_id: int, started: float, state: str = "streaming", **fields: Any
) -> None:
    """A user-data child's heartbeat file, as kraite_mp.supervisor.context.ChildContext writes it."""
    path = os.path.join(settings.run_dir, "heartbeats", f"user-data-{account_id}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "key": f"user-data-{account_id}",
                "state": state,
                "ts": time.time(),
                "started": started,
                "fields": fields,
            },
            f,
        )


@pytest.mark.unit
def test_result_is_typed_and_prints_the_strings_operators_see() -> None:
    assert [s.value for s in ReconcileStatus] == [
        "ok",
        "invalid_credentials",
        "rate_limited",
        "transient",
        "error",
    ]
    result = ReconcileResult(7, "alice", mode="targeted", status=ReconcileStatus.RATE_LIMITED, error="429")
    assert result.summary() == (
        "account=7 name=alice mode=targeted status=rate_limited checked=0 updated=0"
        " transitions=0 not_found=0 positions=0 balances=0 requests=0 weight=0 error='429'"
    )
    assert ReconcileResult(1, "x").status is ReconcileStatus.OK


@pytest.mark.integration
def test_oracle_orders_changed_while_disconnected_equal_truth_after_reconcile(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account = env["accounts"][0]
    key = sim.accounts[0].api_key
    o_fill = sim.place_order(
        key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0"
    )
    o_part = sim.place_order(
        key, symbol="BTCUSDT", side="SELL", type="LIMIT", quantity="0.030", price="90000.0"
    )
    o_cancel = sim.place_order(
        key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1.000", price="1500.00"
    )
    o_amend = sim.place_order(key, symbol="SOLUSDT", side="BUY", type="LIMIT", quantity="2", price="100.000")
    o_expire = sim.place_order(
        key, symbol="SOLUSDT", side="SELL", type="LIMIT", quantity="3", price="300.000"
    )
    a_fill = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.5", trigger_price="1200.00"
    )
    a_cancel = sim.place_algo(
        key, symbol="BNBUSDT", side="BUY", type="TAKE_PROFIT_MARKET", quantity="1", trigger_price="500.00"
    )
    a_open = sim.place_algo(
        key, symbol="BNBUSDT", side="SELL", type="STOP", quantity="1", trigger_price="400.00", price="399.00"
    )
    a_reject = sim.place_algo(
        key, symbol="XRPUSDT", side="SELL", type="STOP_MARKET", quantity="10", trigger_price="0.5000"
    )
    stream_saw(db, account, sim.truth(key))

    # ---- the stream is gone: all of this is lost ----
    sim.fill(key, o_fill)
    sim.fill(key, o_part, qty="0.010")
    sim.cancel(key, o_cancel)
    sim.amend(key, o_amend, price="101.000")
    sim.expire(key, o_expire)
    sim.trigger_algo(key, a_fill)  # -> a regular order the database never heard of, filled at once
    sim.cancel_algo(key, a_cancel)
    sim.reject_algo(key, a_reject)
    new_open = sim.place_order(
        key, symbol="DOGEUSDT", side="BUY", type="LIMIT", quantity="100", price="0.05000"
    )
    sim.place_order(key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.005")  # placed and filled
    assert a_open

    result = reconcile_account(db, settings, account)
    truth = sim.truth(key)
    assert_equals_truth(db, account.id, truth)
    assert result.status is ReconcileStatus.OK and result.status == "ok" and result.mode == "full"
    assert result.transitions >= 9 and result.not_found == 0
    # transitions were recorded with source rest and the rest frame id
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM order_transitions WHERE account_id = %s AND source = 'rest'"
            " AND frame_id LIKE %s",
            (account.id, f"rest:{account.id}:%"),
        )
        assert cur.fetchone()[0] >= 9
    db.commit()
    assert ("NEW", "FILLED", o_fill) in OBSERVED and (None, "NEW", new_open) in OBSERVED
    assert last_full_sweep_ms(settings.run_dir, account.id) is not None

    # idempotent: a second pass changes nothing and audits nothing new
    audited = len(audit_rows(db, account.id))
    OBSERVED.clear()
    again = reconcile_account(db, settings, account)
    assert again.transitions == 0 and again.updated == 0 and again.audited == 0
    assert len(audit_rows(db, account.id)) == audited and OBSERVED == []
    assert_equals_truth(db, account.id, truth)


def stream_delivered(db: Any, account: Account, truth: dict[str, Any], received_at: datetime) -> None:
    """Pretend the stream delivered (and a worker applied) every order of this truth snapshot, each as one
    ORDER_TRADE_UPDATE frame received at ``received_at``: the orders as streamed, and their audit rows."""
    with db.cursor() as cur:
        for o in truth["orders"]:
            state = dataclasses.replace(order_from_rest(account.id, o), source="ws")
            orders.apply_order_update(cur, state, frame_id=None)
            t = int(o["updateTime"])
            audit.write(
                cur,
                frame_id=f"test-ws:{account.id}:{o['orderId']}:{t}:{o['status']}",
                account_id=account.id,
                source="ws",
                event_type="ORDER_TRADE_UPDATE",
                event_time_ms=t,
                payload_text=json.dumps(
                    {"e": "ORDER_TRADE_UPDATE", "E": t, "o": {"i": o["orderId"], "T": t}}
                ),
                received_at=received_at,
                outcome="dispatched",
                error=None,
            )
        for a in truth["algo_orders"]:
            orders.apply_order_update(
                cur, dataclasses.replace(algo_from_rest(account.id, a), source="ws"), frame_id=None
            )
    db.commit()


def requests_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {path: n - before.get(path, 0) for path, n in after.items() if n - before.get(path, 0)}


def gap_sweep(
    env: dict[str, Any], account: Account, gap_start_ms: int, history: str = "evidence"
) -> tuple[ReconcileResult, dict[str, int]]:
    """A gap sweep (``supervisor.gap_sweep_history = history``) and the requests the simulator received for
    it, by path."""
    env["settings"].supervisor.gap_sweep_history = history
    before = env["sim"].stats()["requests"]
    result = reconcile_account(env["db"], env["settings"], account, mode="gap", gap_start_ms=gap_start_ms)
    assert result.status is ReconcileStatus.OK and result.mode == "gap", result.summary()
    return result, requests_between(before, env["sim"].stats()["requests"])


def streamed_before_the_gap(env: dict[str, Any], index: int) -> tuple[Account, str, int]:
    """Account ``index`` with everything so far delivered by its stream; a gap starting now (ms)."""
    sim, db = env["sim"], env["db"]
    account, key = env["accounts"][index], sim.accounts[index].api_key
    truth = sim.truth(key)
    stream_delivered(db, account, truth, datetime.now(UTC) - timedelta(seconds=5))
    stream_saw_account(db, account, truth, sim.engine.now_ms())
    time.sleep(0.01)
    return account, key, int(time.time() * 1000)


@pytest.mark.integration
def test_gap_sweep_mode_is_chosen_only_for_a_known_gap_within_the_setting(env: dict[str, Any]) -> None:
    settings = env["settings"]
    gap_start_ms = int(time.time() * 1000)
    settings.supervisor.gap_sweep_max_s = 0.0
    assert mode_for_gap(settings, gap_start_ms) == "full"  # 0: always a full sweep
    settings.supervisor.gap_sweep_max_s = 900.0
    assert mode_for_gap(settings, gap_start_ms) == "gap"
    assert mode_for_gap(settings, None) == "full"  # the first connect: the gap is unknown
    assert mode_for_gap(settings, gap_start_ms - 900_001) == "full"


@pytest.mark.integration
def test_the_gap_sweep_of_a_healthy_account_costs_the_account_call_and_one_listing_per_symbol(
    env: dict[str, Any],
) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    key = sim.accounts[0].api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0")
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1.000", price="1500.00")
    sim.place_algo(
        key, symbol="BNBUSDT", side="SELL", type="STOP_MARKET", quantity="1", trigger_price="200.00"
    )
    sim.place_order(key, symbol="SOLUSDT", side="BUY", type="MARKET", quantity="2")  # a position, streamed
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    audited = len(audit_rows(db, account.id))

    result, requests = gap_sweep(env, account, gap_start_ms)
    # account 5 + openOrders BTC, ETH (open in the DB) and SOL (the account lists its position) + openAlgoOrders BNB
    assert result.weight == 9 and result.requests == 5, result.summary()
    assert requests == {"/fapi/v3/account": 1, "/fapi/v1/openOrders": 3, "/fapi/v1/openAlgoOrders": 1}
    assert result.history_symbols == [] and result.transitions == 0 and result.positions == 0
    assert_equals_truth(db, account.id, sim.truth(key))
    assert_account_equals_truth(db, account.id, sim.truth(key))
    again, _ = gap_sweep(env, account, gap_start_ms)  # the same answers: nothing new to audit
    assert (
        again.weight == 9
        and again.audited == 0
        and len(audit_rows(db, account.id)) == audited + result.audited
    )
    assert last_full_sweep_ms(settings.run_dir, account.id) is None  # not a full sweep

    # an account with nothing open and no position: the account call alone
    quiet, requests = gap_sweep(env, env["accounts"][1], int(time.time() * 1000) - 5000)
    assert quiet.weight == 5 and requests == {"/fapi/v3/account": 1}, quiet.summary()


@pytest.mark.integration
def test_fills_inside_a_gap_on_a_known_symbol_and_on_one_never_seen_are_found(env: dict[str, Any]) -> None:
    sim, db = env["sim"], env["db"]
    key = sim.accounts[0].api_key
    resting = sim.place_order(
        key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0"
    )
    other = sim.place_order(
        key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1.000", price="1500.00"
    )
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    # ---- the gap: every event is lost ----
    sim.fill(key, resting, qty="0.004")  # a partial fill of a known order: still open, still listed
    doge = sim.place_order(key, symbol="DOGEUSDT", side="BUY", type="MARKET", quantity="100")  # never seen
    truth = sim.truth(key)

    result, requests = gap_sweep(env, account, gap_start_ms)
    assert_equals_truth(db, account.id, truth)
    assert_account_equals_truth(db, account.id, truth)
    stored = db_orders(db, account.id)
    assert stored[("regular", resting)]["status"] == "PARTIALLY_FILLED"
    assert stored[("regular", resting)]["filled"] == Decimal("0.004")
    assert stored[("regular", doge)]["status"] == "FILLED" and stored[("regular", other)]["status"] == "NEW"
    # the wallet moved where the stream was blind: the history of every symbol a full sweep would read
    assert result.history_symbols == ["BTCUSDT", "DOGEUSDT", "ETHUSDT"], result.summary()
    assert requests["/fapi/v3/positionRisk"] == 1 and requests["/fapi/v1/allOrders"] == 3
    assert result.weight == 5 + 3 + 5 + 3 * 10, result.summary()


@pytest.mark.integration
def test_a_cancel_inside_a_gap_is_found_with_one_lookup_and_no_history(env: dict[str, Any]) -> None:
    sim, db = env["sim"], env["db"]
    key = sim.accounts[0].api_key
    gone = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0")
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1.000", price="1500.00")
    stop = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="1", trigger_price="900.00"
    )
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    sim.cancel(key, gone)
    sim.cancel_algo(key, stop)

    result, requests = gap_sweep(env, account, gap_start_ms)
    assert_equals_truth(db, account.id, sim.truth(key))
    assert db_orders(db, account.id)[("regular", gone)]["status"] == "CANCELED"
    assert db_orders(db, account.id)[("algo", stop)]["status"] == "CANCELED"
    # account 5, openOrders BTC + ETH, openAlgoOrders ETH, the two lookups; nothing moved: no history
    assert result.weight == 5 + 2 + 1 + 2 and result.history_symbols == [], result.summary()
    assert requests["/fapi/v1/order"] == 1 and requests["/fapi/v1/algoOrder"] == 1
    assert result.transitions == 2


@pytest.mark.integration
def test_a_round_trip_inside_a_gap_on_an_active_symbol_is_found_through_the_wallet(
    env: dict[str, Any],
) -> None:
    sim, db = env["sim"], env["db"]
    key = sim.accounts[0].api_key
    sim.place_order(key, symbol="XRPUSDT", side="BUY", type="MARKET", quantity="10")
    sim.place_order(key, symbol="XRPUSDT", side="SELL", type="MARKET", quantity="10")  # XRP active, flat
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    buy = sim.place_order(key, symbol="XRPUSDT", side="BUY", type="MARKET", quantity="20")
    sell = sim.place_order(key, symbol="XRPUSDT", side="SELL", type="MARKET", quantity="20")
    truth = sim.truth(key)
    assert truth["positions"] == []  # nothing left on the account's positions: only the wallet moved

    result, _ = gap_sweep(env, account, gap_start_ms)
    assert result.history_symbols == ["XRPUSDT"], result.summary()
    stored = db_orders(db, account.id)
    assert stored[("regular", buy)]["status"] == "FILLED" and stored[("regular", sell)]["status"] == "FILLED"
    assert_equals_truth(db, account.id, truth)
    assert_account_equals_truth(db, account.id, truth)


@pytest.mark.integration
def test_a_fill_the_new_connection_delivered_is_no_evidence(env: dict[str, Any]) -> None:
    sim, db = env["sim"], env["db"]
    key = sim.accounts[0].api_key
    resting = sim.place_order(
        key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0"
    )
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    time.sleep(0.01)
    sim.fill(key, resting)  # after the reconnect: its frames came through the new connection
    truth = sim.truth(key)
    stream_delivered(db, account, truth, datetime.now(UTC))
    stream_saw_account(db, account, truth, sim.engine.now_ms())

    result, requests = gap_sweep(env, account, gap_start_ms)
    # account 5 + openOrders BTC (the account lists its position); the DB holds nothing open any more
    assert result.history_symbols == [] and result.weight == 6, result.summary()
    assert_equals_truth(db, account.id, truth)


@pytest.mark.integration
@pytest.mark.parametrize("history", ["evidence", "deferred"])
def test_the_gap_sweep_blind_spots_are_exactly_the_documented_ones(env: dict[str, Any], history: str) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    key = sim.accounts[0].api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0")
    account, key, gap_start_ms = streamed_before_the_gap(env, 0)
    quiet, requests = gap_sweep(env, env["accounts"][1], gap_start_ms, history)
    # nothing open, nothing active: the account call alone, and no history to defer
    assert quiet.weight == 5 and requests == {"/fapi/v3/account": 1} and not quiet.history_deferred
    # ---- the gap ----
    unfilled = sim.place_order(
        key, symbol="BTCUSDT", side="SELL", type="LIMIT", quantity="0.010", price="99000.0"
    )
    sim.cancel(key, unfilled)  # placed and canceled unfilled: changed no money, no position
    stop = sim.place_algo(
        key, symbol="SOLUSDT", side="SELL", type="STOP_MARKET", quantity="1", trigger_price="50.000"
    )
    still_open = sim.place_order(
        key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1.000", price="1500.00"
    )

    result, _ = gap_sweep(env, account, gap_start_ms, history)
    # account 5, openOrders BTC (open in the DB) + ETH (listed): nothing moved, no history in the sweep
    assert result.history_symbols == [] and result.weight == 5 + 2, result.summary()
    assert result.history_deferred is (history == "deferred")
    stored = db_orders(db, account.id)
    assert ("regular", still_open) in stored  # placed in the gap and still open: the account lists ETHUSDT
    # not seen: the order placed and canceled unfilled, the algo order placed on a symbol without DB-open algos
    assert ("regular", unfilled) not in stored and ("algo", stop) not in stored
    assert_account_equals_truth(db, account.id, sim.truth(key))  # balances and positions exact anyway

    if history == "deferred":
        # the background history sweep: the symbols a full sweep reads (BTC, ETH open in the DB) from the gap
        # start find the order placed and canceled unfilled; the algo on a symbol never active stays unseen
        before = sim.stats()["requests"]
        later = reconcile_account(db, settings, account, mode="history", gap_start_ms=gap_start_ms)
        requests = requests_between(before, sim.stats()["requests"])
        assert later.status == "ok" and later.history_symbols == ["BTCUSDT", "ETHUSDT"], later.summary()
        assert requests == {"/fapi/v1/allOrders": 2, "/fapi/v1/allAlgoOrders": 2}
        assert later.weight == 20 and later.transitions >= 1, later.summary()
        stored = db_orders(db, account.id)
        assert stored[("regular", unfilled)]["status"] == "CANCELED" and ("algo", stop) not in stored

    # the periodic full sweep finds both
    full = reconcile_account(db, settings, account, mode="full")
    assert full.status == "ok"
    stored = db_orders(db, account.id)
    assert stored[("regular", unfilled)]["status"] == "CANCELED" and stored[("algo", stop)]["status"] == "NEW"
    assert_equals_truth(db, account.id, sim.truth(key))


@pytest.mark.integration
def test_oracle_random_scenario_gap_equals_truth(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    seen_algos: dict[int, set[int]] = {}
    for index in (0, 1):
        account, key = env["accounts"][index], sim.accounts[index].api_key
        sim.step(key, n=60)
        snapshot = sim.truth(key)
        stream_saw(db, account, snapshot)
        seen_algos[index] = {int(a["algoId"]) for a in snapshot["algo_orders"]}
        sim.step(key, n=150)  # lost: fills, cancels, amendments, new orders, algo triggers ...
    results = reconcile_accounts(db, settings, env["accounts"][:2], mode="full", stop=threading.Event())
    assert [r.status for r in results] == ["ok", "ok"]
    for index in (0, 1):
        truth = sim.truth(sim.accounts[index].api_key)
        # algo orders placed *and* ended inside the gap included: GET /fapi/v1/allAlgoOrders finds them
        ended_in_gap = {
            int(a["algoId"])
            for a in truth["algo_orders"]
            if int(a["algoId"]) not in seen_algos[index] and orders.is_terminal("algo", a["algoStatus"])
        }
        assert ended_in_gap  # the scenario does produce them
        assert_equals_truth(db, env["accounts"][index].id, truth)


@pytest.mark.integration
def test_an_algo_order_placed_triggered_and_filled_inside_a_gap_is_reconciled(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    # before the gap: the stream saw one algo order on ETHUSDT (the symbol's only activity), and a full
    # sweep ran. No stream is ever connected in this test: every event from here on is lost.
    known = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.5", trigger_price="1000.00"
    )
    stream_saw(db, account, sim.truth(key))
    first = reconcile_account(db, settings, account)
    assert first.status == "ok" and first.transitions == 0

    # ---- the gap ----
    sim.cancel_algo(key, known)
    gap_algo = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.500", trigger_price="1200.00"
    )
    created = sim.trigger_algo(key, gap_algo)  # TRIGGERING, the regular order, TRIGGERED, filled, FINISHED
    truth = sim.truth(key)
    assert not sim.stats()["current_connections"].get(key)
    assert db_orders(db, account.id).keys() == {("algo", known)}  # the database heard of none of it

    before = sim.stats()["requests"]
    result = reconcile_account(db, settings, account)
    after = sim.stats()["requests"]
    assert result.status == "ok" and result.mode == "full" and result.not_found == 0
    assert after["/fapi/v1/allAlgoOrders"] - before.get("/fapi/v1/allAlgoOrders", 0) == 1
    # 5 positionRisk + 5 balance, 80 for the two no-symbol listings + 5 allOrders + 5 allAlgoOrders for
    # the one active symbol; both ended algo orders and the regular order come from the histories: no lookup
    assert result.weight == 100 and result.requests == 6
    stored = db_orders(db, account.id)
    algo_row = stored[("algo", gap_algo)]
    assert algo_row["status"] == "FINISHED" and algo_row["source"] == "rest"
    assert algo_row["filled"] == Decimal("0.500") and algo_row["quantity"] == Decimal("0.500")
    assert algo_row["avg"] == Decimal("1200.00000000") and algo_row["actual"] == created
    regular = stored[("regular", created)]
    assert regular["status"] == "FILLED" and regular["filled"] == Decimal("0.500")
    assert regular["avg"] == Decimal("1200.00000000")
    assert stored[("algo", known)]["status"] == "CANCELED"
    assert_equals_truth(db, account.id, truth)
    assert (None, "FINISHED", gap_algo) in OBSERVED and (None, "FILLED", created) in OBSERVED
    rows = [r for r in audit_rows(db, account.id) if r[0].startswith(f"rest:{account.id}:algo:{gap_algo}:")]
    assert len(rows) == 1 and rows[0][2] == "processed" and rows[0][3]["actualQty"] == "0.500"

    # idempotent: the same answers again change nothing
    again = reconcile_account(db, settings, account)
    assert again.status == "ok" and again.transitions == 0 and again.updated == 0


@pytest.mark.integration
def test_positions_and_balances_changed_in_a_gap_equal_the_exchange_after_reconcile(
    env: dict[str, Any],
) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    sim.place_order(key, symbol="ETHUSDT", side="SELL", type="MARKET", quantity="1.000")
    resting = sim.place_order(key, symbol="SOLUSDT", side="BUY", type="LIMIT", quantity="2", price="100.000")
    before = sim.truth(key)
    stream_saw(db, account, before)
    stream_saw_account(db, account, before, sim.engine.now_ms())
    assert_account_equals_truth(db, account.id, before)

    # ---- the gap: no stream is connected, every event is lost ----
    sim.place_order(key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.010")  # BTC closed
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="0.400")  # ETH reduced
    sim.fill(key, resting)  # SOL opened by a resting order
    sim.place_order(key, symbol="DOGEUSDT", side="BUY", type="MARKET", quantity="100")  # a symbol never seen
    truth = sim.truth(key)
    assert truth["wallet_balance"] != before["wallet_balance"]
    assert {p["s"] for p in truth["positions"]} == {"ETHUSDT", "SOLUSDT", "DOGEUSDT"}
    assert not sim.stats()["current_connections"].get(key)

    result = reconcile_account(db, settings, account)
    assert result.status == "ok" and result.mode == "full"
    assert_account_equals_truth(db, account.id, truth)
    stored = db_positions(db, account.id)
    assert stored[("BTCUSDT", "BOTH")]["amount"] == 0 and stored[("BTCUSDT", "BOTH")]["upnl"] == 0
    assert stored[("DOGEUSDT", "BOTH")]["margin_type"] == "cross"
    assert result.positions >= 4 and result.balances >= 1
    # a position opened in the gap makes its symbol active: the market order that opened it is found too
    assert_equals_truth(db, account.id, truth)
    assert {"REST_POSITIONS", "REST_BALANCES"} <= audit_event_types(db, account.id)

    # the same answers again: nothing new to audit, nothing changes
    audited = len(audit_rows(db, account.id))
    again = reconcile_account(db, settings, account)
    assert again.status == "ok" and len(audit_rows(db, account.id)) == audited
    assert_account_equals_truth(db, account.id, sim.truth(key))

    # everything closed in the next gap: positionRisk answers an empty list, every position becomes 0
    for p in truth["positions"]:
        side = "SELL" if Decimal(p["pa"]) > 0 else "BUY"
        sim.place_order(key, symbol=p["s"], side=side, type="MARKET", quantity=str(abs(Decimal(p["pa"]))))
    assert sim.truth(key)["positions"] == []
    reconcile_account(db, settings, account)
    assert {row["amount"] for row in db_positions(db, account.id).values()} == {0}
    assert_account_equals_truth(db, account.id, sim.truth(key))


@pytest.mark.integration
def test_hedge_mode_and_isolated_positions_converge_side_by_side(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][1], sim.accounts[1].api_key
    sim.set_position_mode(key, dual_side=True)
    sim.set_margin_type(key, "ETHUSDT", "ISOLATED")
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010", position_side="LONG")
    sim.place_order(
        key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.020", position_side="SHORT"
    )
    before = sim.truth(key)
    stream_saw_account(db, account, before, sim.engine.now_ms())
    # ---- the gap ----
    sim.place_order(key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.010", position_side="LONG")
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="1.000", position_side="LONG")
    truth = sim.truth(key)
    assert {(p["s"], p["ps"]) for p in truth["positions"]} == {("BTCUSDT", "SHORT"), ("ETHUSDT", "LONG")}
    assert reconcile_account(db, settings, account).status == "ok"
    assert_account_equals_truth(db, account.id, truth)
    stored = db_positions(db, account.id)
    assert stored[("BTCUSDT", "LONG")]["amount"] == 0  # the long side closed, the short side untouched
    assert stored[("BTCUSDT", "SHORT")]["amount"] == Decimal("-0.020")
    assert stored[("ETHUSDT", "LONG")]["margin_type"] == "isolated"
    assert stored[("BTCUSDT", "SHORT")]["margin_type"] == "cross"


@pytest.mark.integration
def test_a_rest_snapshot_never_regresses_a_newer_streamed_position_and_an_older_frame_loses_to_it(
    env: dict[str, Any],
) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.020")
    truth = sim.truth(key)
    # the stream is ahead of REST: frames newer than the sweep's request (E an hour from now) say BTC is
    # 0.5 and ETH is open; the exchange's answer (taken earlier) must not overwrite them
    future = sim.engine.now_ms() + 3_600_000
    ahead = dict(truth, wallet_balance="12345.00000000")
    ahead["positions"] = [
        dict(truth["positions"][0], pa="0.500"),
        dict(truth["positions"][0], s="ETHUSDT", pa="-2.000"),
    ]
    stream_saw_account(db, account, ahead, future)
    result = reconcile_account(db, settings, account)
    assert result.status == "ok"
    stored = db_positions(db, account.id)
    assert stored[("BTCUSDT", "BOTH")]["amount"] == Decimal("0.500")
    assert stored[("ETHUSDT", "BOTH")]["amount"] == Decimal("-2.000")  # absent from REST, yet newer: kept
    assert db_balances(db, account.id)["USDT"]["wallet"] == Decimal("12345.00000000")

    # without the frames from the future the snapshot wins; then a frame older than it, processed late,
    # changes nothing, and a newer one does
    with db.cursor() as cur:
        cur.execute("DELETE FROM account_positions WHERE account_id = %s", (account.id,))
        cur.execute("DELETE FROM account_balances WHERE account_id = %s", (account.id,))
    db.commit()
    old_frame_ms = sim.engine.now_ms()
    stream_saw_account(db, account, ahead, old_frame_ms - 1)  # ETH "open" as of just before the sweep
    reconcile_account(db, settings, account)
    assert_account_equals_truth(db, account.id, truth)
    snapshot_ms = db_positions(db, account.id)[("BTCUSDT", "BOTH")]["event_time_ms"]
    assert snapshot_ms >= old_frame_ms and db_positions(db, account.id)[("ETHUSDT", "BOTH")]["amount"] == 0
    stream_saw_account(db, account, ahead, old_frame_ms)  # older than the snapshot: loses
    assert_account_equals_truth(db, account.id, truth)
    stream_saw_account(db, account, ahead, snapshot_ms + 1)  # newer: wins
    assert db_positions(db, account.id)[("BTCUSDT", "BOTH")]["amount"] == Decimal("0.500")


@pytest.mark.integration
def test_an_unusable_position_snapshot_is_audited_and_changes_nothing(env: dict[str, Any]) -> None:
    db, settings, account = env["db"], env["settings"], env["accounts"][0]
    key = env["sim"].accounts[0].api_key
    env["sim"].place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    stream_saw_account(db, account, env["sim"].truth(key), 1)

    class BrokenPositions(BinanceRest):
        def position_risk(self, symbol: str | None = None) -> list[dict[str, Any]]:
            items = super().position_risk(symbol)
            return [*items, {"symbol": "ETHUSDT", "positionSide": "BOTH", "positionAmt": 1.5}]  # a float

    rest = BrokenPositions.for_account(settings, account)
    try:
        result = reconcile_account(db, settings, account, rest=rest)
    finally:
        rest.close()
    assert result.status == "ok" and result.invalid == 1
    # the broken snapshot is audited as an error and applied not at all (not even its good item)
    assert db_positions(db, account.id)[("BTCUSDT", "BOTH")]["event_time_ms"] == 1
    rows = [r for r in audit_rows(db, account.id) if r[0].startswith(f"rest:{account.id}:positions:")]
    assert len(rows) == 1 and rows[0][2] == "error"


def _account_frame(event_time_ms: int, wallet: str, positions: list[tuple[str, str]]) -> dict[str, Any]:
    """An ACCOUNT_UPDATE frame with this USDT wallet and these (symbol, amount) one-way positions."""
    return {
        "e": "ACCOUNT_UPDATE",
        "E": event_time_ms,
        "T": event_time_ms,
        "a": {
            "m": "ORDER",
            "B": [{"a": "USDT", "wb": wallet, "cw": wallet, "bc": "0"}],
            "P": [
                {
                    "s": s,
                    "pa": a,
                    "ep": "100",
                    "bep": "100",
                    "cr": "0",
                    "up": "0",
                    "mt": "cross",
                    "iw": "0",
                    "ps": "BOTH",
                }
                for s, a in positions
            ],
        },
    }


@pytest.mark.integration
def test_a_streamed_account_update_waits_for_a_reconciliation_of_the_same_account_instead_of_deadlocking(
    env: dict[str, Any], database_url: str
) -> None:
    """CI once hit PostgreSQL's "deadlock detected" between two writers of one account's balances and
    positions (the sweep wrote positions then balances, the stream balances then positions). Both now take
    the account's state lock first: the stream's transaction waits on it, not on a row, and then lands."""
    db, account = env["db"], env["accounts"][0]
    snapshot = account_update_from_ws(
        account.id, _account_frame(1_000, "10", [("BTCUSDT", "1"), ("ETHUSDT", "2")])
    )
    streamed = account_update_from_ws(
        account.id, _account_frame(2_000, "20", [("ETHUSDT", "3"), ("BTCUSDT", "4")])
    )
    other = connect(database_url)
    done: dict[str, Any] = {}

    def stream() -> None:
        try:
            with other.cursor() as c2:
                account_state.apply_account_update(c2, streamed)
            other.commit()
            done["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            other.rollback()
            done["error"] = e

    thread = threading.Thread(target=stream, daemon=True)
    try:
        with db.cursor() as cur:  # the sweep's order: the lock, positions, then balances
            account_state.lock_account_state(cur, account.id)
            account_state.upsert_positions(cur, account.id, [(p, 1_000) for p in snapshot.positions])
            thread.start()
            wait_for(
                lambda: _waiting_on_advisory_lock(database_url, other.get_backend_pid()),
                10,
                message="the streamed update waiting on the account's state lock",
            )
            account_state.upsert_balances(cur, account.id, [(b, 1_000) for b in snapshot.balances])
        db.commit()
        thread.join(10)
    finally:
        other.close()
    assert done == {"ok": True}, done
    assert db_balances(db, account.id)["USDT"]["wallet"] == Decimal("20")
    positions = db_positions(db, account.id)
    assert positions[("BTCUSDT", "BOTH")]["amount"] == Decimal("4")
    assert positions[("ETHUSDT", "BOTH")]["amount"] == Decimal("3")


def _waiting_on_advisory_lock(database_url: str, pid: int) -> bool:
    with connect(database_url) as watcher, watcher.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted", (pid,)
        )
        waiting = int(cur.fetchone()[0]) > 0
    watcher.close()
    return waiting


@pytest.mark.integration
def test_a_stale_rest_result_never_overwrites_a_newer_streamed_state(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    a = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0")
    b = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.020", price="51000.0")
    truth = {o["orderId"]: o for o in sim.truth(key)["orders"]}
    # the stream is ahead of what REST will answer: a partial fill of a, b filled
    frame_a = {
        "e": "ORDER_TRADE_UPDATE",
        "E": truth[a]["updateTime"] + 10_001,
        "T": truth[a]["updateTime"] + 10_000,
        "o": {
            "s": "BTCUSDT",
            "c": "x",
            "S": "BUY",
            "o": "LIMIT",
            "f": "GTC",
            "q": "0.010",
            "p": "50000.0",
            "ap": "50000.0",
            "sp": "0",
            "x": "TRADE",
            "X": "PARTIALLY_FILLED",
            "i": a,
            "z": "0.004",
            "T": truth[a]["updateTime"] + 10_000,
            "t": 77,
        },
    }
    frame_b = {
        "e": "ORDER_TRADE_UPDATE",
        "E": truth[b]["updateTime"] + 5,
        "T": truth[b]["updateTime"] + 4,
        "o": {
            "s": "BTCUSDT",
            "c": "y",
            "S": "BUY",
            "o": "LIMIT",
            "f": "GTC",
            "q": "0.020",
            "p": "51000.0",
            "ap": "51000.0",
            "sp": "0",
            "x": "TRADE",
            "X": "FILLED",
            "i": b,
            "z": "0.020",
            "T": truth[b]["updateTime"] + 4,
            "t": 78,
        },
    }
    with db.cursor() as cur:
        orders.apply_order_update(cur, order_from_ws(account.id, frame_a), frame_id="ws:a")
        orders.apply_order_update(cur, order_from_ws(account.id, frame_b), frame_id="ws:b")
    db.commit()
    OBSERVED.clear()
    result = reconcile_account(db, settings, account)
    stored = db_orders(db, account.id)
    assert stored[("regular", a)]["status"] == "PARTIALLY_FILLED" and stored[("regular", a)][
        "filled"
    ] == Decimal("0.004")
    assert stored[("regular", b)]["status"] == "FILLED" and stored[("regular", b)]["source"] == "ws"
    assert result.transitions == 0 and result.updated == 0 and OBSERVED == []
    # the stale answers were still audited, once each
    frames = [r[0] for r in audit_rows(db, account.id)]
    assert any(f.startswith(f"rest:{account.id}:regular:{a}:") for f in frames)
    assert any(f.startswith(f"rest:{account.id}:regular:{b}:") for f in frames)


@pytest.mark.integration
def test_nothing_missed_costs_at_most_two_weight_and_a_missed_fill_is_found(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    ids = [
        sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price=f"5000{i}.0")
        for i in range(4)
    ]
    for i in range(3):
        sim.place_algo(
            key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.5", trigger_price=f"100{i}.00"
        )
    stream_saw(db, account, sim.truth(key))
    rest = BinanceRest.for_account(settings, account)
    try:
        full = reconcile_account(db, settings, account, rest=rest)
        assert full.status == "ok" and full.weight >= 80

        before_header, before = rest.used_weight_1m, sim.stats()["requests"]
        targeted = reconcile_account(db, settings, account, rest=rest, mode="targeted")
        after = sim.stats()["requests"]
        assert targeted.status == "ok" and targeted.transitions == 0
        assert targeted.weight == 2 and targeted.requests == 2
        assert rest.used_weight_1m - before_header == 2  # what the exchange counted
        assert after["/fapi/v1/openOrders"] - before["/fapi/v1/openOrders"] == 1
        assert after["/fapi/v1/openAlgoOrders"] - before["/fapi/v1/openAlgoOrders"] == 1
        assert after.get("/fapi/v1/order", 0) == before.get("/fapi/v1/order", 0)

        sim.fill(key, ids[1])  # a lost fill of a known order
        found = reconcile_account(db, settings, account, rest=rest, mode="targeted")
        assert found.transitions == 1 and found.weight == 3  # 2 listings + 1 order lookup
        assert db_orders(db, account.id)[("regular", ids[1])]["status"] == "FILLED"
        assert ("NEW", "FILLED", ids[1]) in OBSERVED
    finally:
        rest.close()
    assert_equals_truth(db, account.id, sim.truth(key))


@pytest.mark.integration
def test_targeted_sweep_of_an_account_with_nothing_open_costs_nothing(env: dict[str, Any]) -> None:
    env["sim"].rate_limit(status=418, count=1, retry_after_s=60)  # any request at all would trip this
    result = reconcile_account(env["db"], env["settings"], env["accounts"][2], mode="targeted")
    assert result.status == "ok" and result.requests == 0 and result.weight == 0


@pytest.mark.integration
def test_auto_mode_is_full_unless_a_recent_full_sweep_and_a_healthy_stream(env: dict[str, Any]) -> None:
    settings, db, account = env["settings"], env["db"], env["accounts"][0]
    assert choose_mode(settings, account.id) == "full"  # never swept on this host
    write_heartbeat(settings, account.id, started=time.time() - 100)
    result = reconcile_account(db, settings, account, mode="auto")
    assert result.mode == "full" and result.status == "ok"
    assert choose_mode(settings, account.id) == "targeted"
    assert reconcile_account(db, settings, account, mode="auto").mode == "targeted"
    write_heartbeat(settings, account.id, started=time.time())  # the stream restarted: frames may be lost
    assert choose_mode(settings, account.id) == "full"
    for state in ("fatal", "backoff", "connecting"):
        write_heartbeat(settings, account.id, started=time.time() - 100, state=state)
        assert choose_mode(settings, account.id) == "full", state
    # reconnecting for no longer than gap_sweep_max_s: the reconnect's own sweep reads the gap, not this one
    long_ago = time.time() - settings.supervisor.gap_sweep_max_s - 60
    for state in ("paced", "backoff", "connecting"):
        write_heartbeat(
            settings, account.id, started=time.time() - 100, state=state, dark_since=time.time() - 30
        )
        assert choose_mode(settings, account.id) == "targeted", state
        write_heartbeat(settings, account.id, started=time.time() - 100, state=state, dark_since=long_ago)
        assert choose_mode(settings, account.id) == "full", state
    write_heartbeat(
        settings, account.id, started=time.time() - 100, state="fatal", dark_since=time.time() - 30
    )
    assert choose_mode(settings, account.id) == "full"
    write_heartbeat(settings, account.id, started=time.time() - 100)
    assert choose_mode(settings, account.id) == "targeted"
    later = int(time.time() * 1000 + settings.supervisor.sync_full_interval_s * 1000 + 1)
    assert choose_mode(settings, account.id, now_ms=later) == "full"  # the hourly full sweep is due
    os.remove(os.path.join(settings.run_dir, "heartbeats", f"user-data-{account.id}.json"))
    assert choose_mode(settings, account.id) == "full"  # no stream on this host: REST is all there is


@pytest.mark.integration
def test_invalid_key_and_bad_secret_are_marked_and_other_accounts_still_reconciled(
    env: dict[str, Any],
) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    keys = [a.api_key for a in sim.accounts]
    placed = {
        i: sim.place_order(
            keys[i], symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="40000.0"
        )
        for i in range(3)
    }
    for i in range(3):
        stream_saw(db, env["accounts"][i], sim.truth(keys[i]))
        sim.cancel(keys[i], placed[i])
    sim.invalidate_api_key(keys[1])
    # a fourth account whose stored secret is wrong: the exchange rejects the signature (-1022)
    bad = add_account(db, settings.secret_key, name="wrong-secret", api_key=keys[2], api_secret="Z" * 64)
    accounts = [env["accounts"][0], env["accounts"][1], bad, env["accounts"][2]]
    results = reconcile_accounts(db, settings, accounts, mode="full", stop=threading.Event())
    assert [r.status for r in results] == ["ok", "invalid_credentials", "invalid_credentials", "ok"]
    for r in results[1:3]:
        assert r.error and "credentials rejected" in r.error
        assert sim.accounts[1].api_secret not in r.error and "Z" * 64 not in r.error
    stored = get_account(db, env["accounts"][1].id)
    assert stored is not None and stored.credentials_error and "-2015" not in stored.name
    assert (
        "credentials rejected" in stored.credentials_error
        and sim.accounts[1].api_secret not in stored.credentials_error
    )
    wrong = get_account(db, bad.id)
    assert wrong is not None and wrong.credentials_error and "does not match" in wrong.credentials_error
    assert get_account(db, env["accounts"][0].id).credentials_error is None  # type: ignore[union-attr]
    for i in (0, 2):
        assert db_orders(db, env["accounts"][i].id)[("regular", placed[i])]["status"] == "CANCELED"
    assert db_orders(db, env["accounts"][1].id)[("regular", placed[1])]["status"] == "NEW"


@pytest.mark.integration
@pytest.mark.parametrize("status", [429, 418])
def test_rate_limit_stops_the_pass_without_a_request_storm(env: dict[str, Any], status: int) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    sim.rate_limit(status=status, count=1, retry_after_s=300)
    results = reconcile_accounts(db, settings, env["accounts"], mode="full", stop=threading.Event())
    assert len(results) == 1 and results[0].status == "rate_limited" and results[0].requests == 1
    assert results[0].retry_after_s is not None and results[0].retry_after_s >= 299
    assert sum(n for p, n in sim.stats()["requests"].items() if p.startswith("/fapi/")) == 1
    # a second pass (the next cycle, same process) sends nothing at all while the block lasts
    assert reconcile_accounts(db, settings, env["accounts"], mode="full", stop=threading.Event()) == []
    assert sum(n for p, n in sim.stats()["requests"].items() if p.startswith("/fapi/")) == 1
    assert last_full_sweep_ms(settings.run_dir, env["accounts"][0].id) is None


@pytest.mark.integration
def test_unknown_order_is_counted_and_left_alone(env: dict[str, Any]) -> None:
    db, settings, account = env["db"], env["settings"], env["accounts"][0]
    ghost = {
        "orderId": 42,
        "symbol": "BTCUSDT",
        "status": "NEW",
        "clientOrderId": "ghost",
        "price": "1",
        "origQty": "1",
        "executedQty": "0",
        "updateTime": int(time.time() * 1000),
        "side": "BUY",
    }
    stream_saw(db, account, {"orders": [ghost], "algo_orders": []})
    result = reconcile_account(db, settings, account)
    assert result.not_found == 1 and result.status == "ok"
    assert db_orders(db, account.id)[("regular", 42)]["status"] == "NEW"


@pytest.mark.integration
def test_shadow_mode_audits_only(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    settings.user_data_stream.binance.dispatched_executions = []
    oid = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="40000.0")
    stream_saw(db, account, sim.truth(key))
    sim.fill(key, oid)
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="LIMIT", quantity="1", price="1000.00")
    result = reconcile_account(db, settings, account)
    assert result.shadow and result.transitions == 0 and result.audited >= 2
    assert set(db_orders(db, account.id)) == {("regular", oid)}
    assert db_orders(db, account.id)[("regular", oid)]["status"] == "NEW"
    assert db_positions(db, account.id) == {} and db_balances(db, account.id) == {}
    assert result.positions == 0 and result.balances == 0
    rows = audit_rows(db, account.id)
    assert {r[2] for r in rows} == {"shadow"} and {r[1] for r in rows} == {"rest"}
    assert {"REST_POSITIONS", "REST_BALANCES"} <= audit_event_types(db, account.id)
    assert OBSERVED == []


@pytest.mark.integration
def test_audit_rows_hold_no_secrets(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    sim.step(key, n=30)
    reconcile_account(db, settings, account)
    rows = audit_rows(db, account.id)
    assert rows
    blob = json.dumps([r[3] for r in rows]) + " ".join(r[0] for r in rows)
    assert sim.accounts[0].api_secret not in blob and key not in blob and "signature" not in blob


@pytest.mark.integration
def test_sync_child_reconciles_every_owned_account(env: dict[str, Any]) -> None:
    sim, db, settings = env["sim"], env["db"], env["settings"]
    keys = [a.api_key for a in sim.accounts]
    placed = [
        sim.place_order(k, symbol="ETHUSDT", side="SELL", type="LIMIT", quantity="1", price="4000.00")
        for k in keys
    ]
    for i in range(3):
        stream_saw(db, env["accounts"][i], sim.truth(keys[i]))
        sim.fill(keys[i], placed[i], qty="0.4")
    os.makedirs(os.path.join(settings.run_dir, "heartbeats"), exist_ok=True)
    ctx = ChildContext(settings, "sync")
    assert run_sync_child(ctx) == 0
    assert ctx.state == "done" and ctx.fields["accounts"] == "3/3" and ctx.fields["failed"] == 0
    for i in range(3):
        row = db_orders(db, env["accounts"][i].id)[("regular", placed[i])]
        assert row["status"] == "PARTIALLY_FILLED" and row["filled"] == Decimal("0.4")
    with open(ctx.heartbeat_path) as f:
        assert json.load(f)["state"] == "done"


@pytest.mark.integration
def test_sync_child_skips_accounts_whose_credentials_binance_refused(env: dict[str, Any]) -> None:
    """Such an account costs weight on every pass and can only be refused: its stream retries it, and
    `accounts update` clears the mark; the periodic sweep leaves it alone until then."""
    from kraite_mp.store.accounts import mark_credentials_invalid

    sim, db, settings = env["sim"], env["db"], env["settings"]
    keys = [a.api_key for a in sim.accounts]
    placed = [
        sim.place_order(k, symbol="ETHUSDT", side="SELL", type="LIMIT", quantity="1", price="4000.00")
        for k in keys
    ]
    for i in range(3):
        stream_saw(db, env["accounts"][i], sim.truth(keys[i]))
        sim.fill(keys[i], placed[i], qty="0.4")
    mark_credentials_invalid(db, env["accounts"][1].id, "invalid API key (-2015)")
    os.makedirs(os.path.join(settings.run_dir, "heartbeats"), exist_ok=True)
    ctx = ChildContext(settings, "sync")
    assert run_sync_child(ctx) == 0
    assert (ctx.fields["accounts"], ctx.fields["skipped"], ctx.fields["failed"]) == ("2/2", 1, 0)
    statuses = [db_orders(db, a.id)[("regular", placed[i])]["status"] for i, a in enumerate(env["accounts"])]
    assert statuses == ["PARTIALLY_FILLED", "NEW", "PARTIALLY_FILLED"]  # the refused one was not asked


@pytest.mark.integration
def test_the_sync_pass_keeps_the_audit_partitions(env: dict[str, Any]) -> None:
    """The periodic sync child (one per fleet) also makes api_data_stream's next days and drops the days
    past audit.retention_days (docs/RETENTION.md): nobody has to remember a cron job."""
    from datetime import timedelta

    from psycopg2 import sql

    from kraite_mp.store import retention

    db, settings = env["db"], env["settings"]
    today = retention.db_today(db)
    old_day = today - timedelta(days=settings.audit.retention_days + 5)
    retention.ensure_partitions(db, today=old_day, ahead_days=0)  # a day long past the retention
    names = {p.name for p in retention.partitions(db)}
    assert retention.partition_name(old_day) in names
    with db.cursor() as cur:  # and a week ahead not made yet
        cur.execute(
            sql.SQL("DROP TABLE {}").format(
                sql.Identifier(retention.partition_name(today + timedelta(days=7)))
            )
        )
    db.commit()
    os.makedirs(os.path.join(settings.run_dir, "heartbeats"), exist_ok=True)
    assert run_sync_child(ChildContext(settings, "sync")) == 0
    names = {p.name for p in retention.partitions(db)}
    assert retention.partition_name(old_day) not in names
    assert {retention.partition_name(today + timedelta(days=d)) for d in range(-1, 8)} <= names


def _read_lines(stream: Any, sink: list[str]) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line.decode())


@pytest.mark.integration
def test_sync_orders_cli_one_pass_and_every_until_sigterm(
    env: dict[str, Any], kraite_env: dict[str, str], processes: Any
) -> None:
    sim, db = env["sim"], env["db"]
    key = sim.accounts[0].api_key
    oid = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="40000.0")
    stream_saw(db, env["accounts"][0], sim.truth(key))
    sim.cancel(key, oid)
    cli_env = dict(kraite_env, KRAITE_BINANCE_REST_URL=sim.rest_url, KRAITE_BINANCE_WS_URL=sim.ws_url)

    one = processes.kraite("sync-orders", "--account", str(env["accounts"][0].id), env=cli_env)
    out, err = one.communicate(timeout=60)
    assert one.returncode == 0, err.decode()
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1 and f"account={env['accounts'][0].id}" in lines[0]
    assert "mode=full" in lines[0] and "transitions=1" in lines[0] and "weight=" in lines[0]
    assert db_orders(db, env["accounts"][0].id)[("regular", oid)]["status"] == "CANCELED"

    loop = processes.kraite("sync-orders", "--every", "1", env=cli_env)
    seen: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(loop.stdout, seen), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(seen) < 6 and time.monotonic() < deadline and loop.poll() is None:  # two passes over 3 accounts
        time.sleep(0.1)
    assert len(seen) >= 6, (seen, loop.poll())
    assert all("status=ok" in line for line in seen[:6])
    assert sum("mode=full" in line for line in seen[:3]) == 3  # no stream on this host: full each time
    loop.send_signal(signal.SIGTERM)
    try:
        code = loop.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("sync-orders --every did not stop on SIGTERM")
    assert code == 0


@pytest.mark.integration
def test_concurrent_reconciliations_of_one_account_record_each_change_once(
    env: dict[str, Any], database_url: str
) -> None:
    from kraite_mp.store import db as kdb

    sim, db, settings = env["sim"], env["db"], env["settings"]
    account, key = env["accounts"][0], sim.accounts[0].api_key
    sim.step(key, n=40)
    snapshot = sim.truth(key)
    stream_saw(db, account, snapshot)
    sim.step(key, n=120)
    results: list[ReconcileResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        conn = kdb.connect(database_url)
        try:
            results.append(reconcile_account(conn, settings, account))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and [r.status for r in results] == ["ok"] * 3
    with db.cursor() as cur:
        cur.execute(
            "SELECT o.exchange_order_id, t.to_status, count(*) FROM order_transitions t JOIN orders o ON o.id = t.order_id"
            " WHERE t.account_id = %s AND t.source = 'rest' GROUP BY 1, 2 HAVING count(*) > 1",
            (account.id,),
        )
        assert cur.fetchall() == []  # no status change recorded twice
        cur.execute("SELECT frame_id, count(*) FROM api_data_stream GROUP BY 1 HAVING count(*) > 1")
        assert cur.fetchall() == []
    db.commit()
    assert_equals_truth(db, account.id, sim.truth(key))
    assert sum(r.transitions for r in results) == rest_transition_count(db, account.id)


def rest_transition_count(db: Any, account_id: int) -> int:
    with db.cursor() as cur:
        # stream_saw() writes with frame_id NULL; reconciliation with its rest:... frame id
        cur.execute(
            "SELECT count(*) FROM order_transitions WHERE account_id = %s AND source = 'rest'"
            " AND frame_id LIKE 'rest:%%'",
            (account_id,),
        )
        (count,) = cur.fetchone()
    db.commit()
    return int(count)
