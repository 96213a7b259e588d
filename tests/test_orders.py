"""The ordered, idempotent order update: parsing, ordering rules, concurrency."""

from __future__ import annotations

import json
import random
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kraite_mp.binance.fields import FrameError
from kraite_mp.binance.orders import algo_from_rest, algo_from_ws, order_from_rest, order_from_ws
from kraite_mp.binance.user import dispatch_key
from kraite_mp.store import db as kdb
from kraite_mp.store.accounts import add_account
from kraite_mp.store.orders import apply_order_update, is_newer

#: Recorded GET /fapi/v1/algoOrder and allAlgoOrders replies in the 2026-06-09 schema.
ALGO_REST_2026 = Path(__file__).resolve().parent / "fixtures" / "algo_rest_2026.json"


def algo_rest_2026() -> dict[str, Any]:
    with open(ALGO_REST_2026) as f:
        return dict(json.load(f))


def otu(
    i: int,
    x: str,
    status: str,
    t: int,
    z: str = "0",
    ap: str = "0",
    p: str = "100.10",
    q: str = "1.000",
    **extra: Any,
) -> dict[str, Any]:
    o = {
        "s": "BTCUSDT",
        "c": f"c{i}",
        "S": "BUY",
        "o": "LIMIT",
        "f": "GTC",
        "q": q,
        "p": p,
        "ap": ap,
        "sp": "0",
        "x": x,
        "X": status,
        "i": i,
        "l": "0",
        "z": z,
        "L": "0",
        "T": t,
        "t": 0,
        "R": False,
        "ps": "BOTH",
        "future_field": 1,
        **extra,
    }
    return {"e": "ORDER_TRADE_UPDATE", "E": t + 1, "T": t, "o": o}


def algo(aid: int, status: str, t: int, aq: str = "0") -> dict[str, Any]:
    return {
        "e": "ALGO_UPDATE",
        "T": t,
        "E": t + 2,
        "o": {
            "caid": f"ca{aid}",
            "aid": aid,
            "at": "CONDITIONAL",
            "o": "STOP_MARKET",
            "s": "ETHUSDT",
            "S": "SELL",
            "ps": "BOTH",
            "f": "GTC",
            "q": "0.50",
            "X": status,
            "ai": "" if status == "NEW" else "9001",
            "ap": "0",
            "aq": aq,
            "act": "0",
            "tp": "3000.5",
            "p": "0",
            "R": True,
        },
    }


@pytest.mark.unit
def test_parse_order_frame_keeps_exact_decimals_and_ignores_unknown_fields() -> None:
    s = order_from_ws(7, otu(11, "TRADE", "PARTIALLY_FILLED", 1000, z="0.300", ap="100.123456789"))
    assert s.exchange_order_id == 11 and s.kind == "regular" and s.status == "PARTIALLY_FILLED"
    assert s.filled_quantity == Decimal("0.300") and s.average_price == Decimal("100.123456789")
    assert s.transaction_time_ms == 1000 and s.event_time_ms == 1001


@pytest.mark.unit
@pytest.mark.parametrize(
    "frame",
    [
        {"e": "ORDER_TRADE_UPDATE", "T": 1},
        {"e": "ORDER_TRADE_UPDATE", "T": 1, "o": {"i": "x", "s": "B", "X": "NEW"}},
        {"e": "ORDER_TRADE_UPDATE", "T": 1, "o": {"i": 1, "s": "B", "X": "NEW", "p": "abc"}},
        {"e": "ORDER_TRADE_UPDATE", "T": 1, "o": {"i": 1, "s": "B", "X": "NEW", "p": 1.5}},
        {"e": "ORDER_TRADE_UPDATE", "o": {"i": 1, "s": "B", "X": "NEW"}},
    ],
)
def test_parse_rejects_broken_frames_with_frame_error(frame: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        order_from_ws(1, frame)


@pytest.mark.unit
def test_dispatch_keys() -> None:
    assert dispatch_key(otu(1, "TRADE", "FILLED", 1)) == "TRADE"
    assert dispatch_key(algo(1, "NEW", 1)) == "ALGO_NEW"
    assert dispatch_key(algo(1, "FINISHED", 1, aq="0.5")) == "ALGO_FILLED"
    assert dispatch_key(algo(1, "FINISHED", 1, aq="0")) == "ALGO_FINISHED"
    assert dispatch_key({"e": "ACCOUNT_UPDATE"}) is None
    assert dispatch_key({"e": "ORDER_TRADE_UPDATE", "o": "junk"}) is None


@pytest.mark.unit
def test_is_newer_rules() -> None:
    stored = {
        "status": "PARTIALLY_FILLED",
        "filled_quantity": Decimal("0.5"),
        "last_transaction_time_ms": 100,
    }
    assert not is_newer(
        stored, order_from_ws(1, otu(1, "TRADE", "PARTIALLY_FILLED", 100, z="0.5"))
    )  # duplicate
    assert not is_newer(stored, order_from_ws(1, otu(1, "NEW", "NEW", 90)))  # older
    assert not is_newer(
        stored, order_from_ws(1, otu(1, "TRADE", "PARTIALLY_FILLED", 200, z="0.4"))
    )  # z never falls
    assert is_newer(stored, order_from_ws(1, otu(1, "TRADE", "FILLED", 100, z="1.0")))  # same ms, more filled
    done = {"status": "FILLED", "filled_quantity": Decimal("1"), "last_transaction_time_ms": 100}
    assert not is_newer(
        done, order_from_ws(1, otu(1, "AMENDMENT", "NEW", 500, z="1"))
    )  # terminal stays terminal
    rest_algo = algo_from_rest(
        1, {"algoId": 5, "symbol": "ETHUSDT", "algoStatus": "FINISHED", "updateTime": 300}
    )
    assert rest_algo.filled_quantity is None
    assert is_newer(
        {"status": "TRIGGERED", "filled_quantity": Decimal("0.5"), "last_transaction_time_ms": 200}, rest_algo
    )


def _opt_dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


@pytest.mark.unit
@pytest.mark.parametrize("case", algo_rest_2026()["algo_order"], ids=lambda c: str(c["note"])[:40])
def test_recorded_2026_algo_order_replies_parse_from_the_actual_fields(case: dict[str, Any]) -> None:
    s = algo_from_rest(3, case["reply"])
    want = case["expect"]
    assert s.kind == "algo" and s.source == "rest" and s.account_id == 3
    assert s.exchange_order_id == want["id"] and s.status == want["status"]
    assert s.execution_type == f"ALGO_{want['status']}"
    assert s.filled_quantity == _opt_dec(want["filled"])
    if want["filled"] is not None:
        assert str(s.filled_quantity) == want["filled"]  # the exact text, scale included
    assert s.average_price == _opt_dec(want["average"])
    assert s.actual_order_id == want["actual_order_id"]
    assert s.stop_price == Decimal(want["stop_price"]) and str(s.quantity) == want["quantity"]
    assert s.transaction_time_ms == want["time"] and s.event_time_ms is None


@pytest.mark.unit
def test_recorded_all_algo_orders_reply_parses_item_by_item() -> None:
    items = algo_rest_2026()["all_algo_orders"]
    parsed = [algo_from_rest(1, item) for item in items]
    assert [(p.exchange_order_id, p.status) for p in parsed] == [
        (3000000201, "FINISHED"),
        (3000000202, "EXPIRED"),
    ]
    filled, expired = parsed
    assert filled.filled_quantity == Decimal("0.500") and filled.average_price == Decimal("1200.00000000")
    assert filled.actual_order_id == 8000004501 and filled.order_type == "STOP_MARKET"
    assert expired.filled_quantity is None and expired.average_price is None
    assert expired.actual_order_id is None and expired.reduce_only is True


@pytest.mark.unit
@pytest.mark.parametrize("case", algo_rest_2026()["broken"], ids=lambda c: str(c["note"]))
def test_broken_2026_algo_replies_raise_a_frame_error_naming_the_field(case: dict[str, Any]) -> None:
    reply = dict(algo_rest_2026()["algo_order"][2]["reply"], **case["patch"])
    with pytest.raises(FrameError) as raised:
        algo_from_rest(1, reply)
    assert str(raised.value) == case["error"]


@pytest.mark.unit
def test_a_filled_2026_algo_reply_moves_a_triggered_order_to_its_fill() -> None:
    finished = algo_from_rest(1, algo_rest_2026()["algo_order"][2]["reply"])
    stored = {
        "status": "TRIGGERED",
        "filled_quantity": Decimal("0"),
        "last_transaction_time_ms": 1796021911870,
    }
    assert is_newer(stored, finished)
    already = {
        "status": "FINISHED",
        "filled_quantity": Decimal("12"),
        "last_transaction_time_ms": 1796021911874,
    }
    assert not is_newer(already, finished)  # the stream's copy of the same state: a no-op


def _lifecycle() -> list[dict[str, Any]]:
    frames = []
    for i in range(1, 21):
        t = 1_000_000 + i * 1000
        frames.append(otu(i, "NEW", "NEW", t))
        if i % 4 == 0:
            frames.append(otu(i, "AMENDMENT", "NEW", t + 10, p="101.5"))
            frames.append(otu(i, "CANCELED", "CANCELED", t + 20, p="101.5"))
        elif i % 4 == 1:
            frames.append(otu(i, "TRADE", "PARTIALLY_FILLED", t + 10, z="0.400", ap="100.10"))
            frames.append(otu(i, "TRADE", "FILLED", t + 20, z="1.000", ap="100.10"))
        elif i % 4 == 2:
            frames.append(otu(i, "EXPIRED", "EXPIRED", t + 30))
        else:
            frames.append(otu(i, "TRADE", "PARTIALLY_FILLED", t + 10, z="0.250", ap="100.10"))
    for aid in range(500, 505):
        t = 2_000_000 + aid * 1000
        frames += [
            algo(aid, "NEW", t),
            algo(aid, "TRIGGERING", t + 1),
            algo(aid, "TRIGGERED", t + 2),
            algo(aid, "FINISHED", t + 3, aq="0.50"),
        ]
    return frames


def _apply_all(url: str, account_id: int, frames: list[dict[str, Any]], threads: int) -> None:
    chunks = [frames[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def work(chunk: list[dict[str, Any]]) -> None:
        conn = kdb.connect(url)
        try:
            for n, frame in enumerate(chunk):
                state = (
                    algo_from_ws(account_id, frame)
                    if frame["e"] == "ALGO_UPDATE"
                    else order_from_ws(account_id, frame)
                )
                with conn.cursor() as cur:
                    apply_order_update(cur, state, frame_id=f"f{n}")
                conn.commit()
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            conn.close()

    workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors


def _snapshot(conn: Any, account_id: int) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT kind, exchange_order_id, status, price, quantity, filled_quantity, average_price,"
            " last_transaction_time_ms FROM orders WHERE account_id = %s ORDER BY kind, exchange_order_id",
            (account_id,),
        )
        rows = cur.fetchall()
    conn.commit()
    return rows


@pytest.mark.integration
def test_shuffled_duplicated_concurrent_updates_converge(db, database_url: str, secret_key: str) -> None:
    a = add_account(db, secret_key, name="ordered", api_key="K" * 16, api_secret="S" * 16)
    b = add_account(db, secret_key, name="chaos", api_key="L" * 16, api_secret="T" * 16)
    frames = _lifecycle()
    _apply_all(database_url, a.id, frames, threads=1)
    chaos = frames * 3
    random.Random(42).shuffle(chaos)
    _apply_all(database_url, b.id, chaos, threads=8)
    ordered, shuffled = _snapshot(db, a.id), _snapshot(db, b.id)
    assert len(ordered) == 25
    assert ordered == shuffled
    by_id = {(r[0], r[1]): r for r in ordered}
    assert by_id[("regular", 1)][2] == "FILLED" and by_id[("regular", 1)][5] == Decimal("1.000")
    assert by_id[("regular", 4)][2] == "CANCELED" and by_id[("regular", 4)][3] == Decimal("101.5")
    assert by_id[("regular", 3)][2] == "PARTIALLY_FILLED"
    assert by_id[("algo", 500)][2] == "FINISHED" and by_id[("algo", 500)][5] == Decimal("0.50")
    with db.cursor() as cur:
        # in order: every status change recorded once per order
        cur.execute(
            "SELECT count(*) FROM order_transitions t JOIN orders o ON o.id = t.order_id WHERE o.account_id = %s",
            (a.id,),
        )
        # 20 first sightings + 5 cancels + 5x2 fills + 5 expiries + 5 partials + 5 algo orders x 4 statuses
        assert cur.fetchone()[0] == 20 + 5 + 10 + 5 + 5 + 5 * 4


@pytest.mark.integration
def test_stale_rest_result_never_overwrites_newer_stream_state(db, secret_key: str) -> None:
    a = add_account(db, secret_key, name="rest", api_key="R" * 16, api_secret="S" * 16)
    with db.cursor() as cur:
        apply_order_update(
            cur, order_from_ws(a.id, otu(1, "TRADE", "FILLED", 5000, z="1.000", ap="100.1")), frame_id="w1"
        )
        stale = order_from_rest(
            a.id,
            {
                "orderId": 1,
                "symbol": "BTCUSDT",
                "status": "NEW",
                "executedQty": "0",
                "origQty": "1.000",
                "price": "100.10",
                "updateTime": 4000,
            },
        )
        assert apply_order_update(cur, stale, frame_id="r1") is None
        same = order_from_rest(
            a.id,
            {
                "orderId": 1,
                "symbol": "BTCUSDT",
                "status": "FILLED",
                "executedQty": "1.000",
                "updateTime": 5000,
            },
        )
        assert apply_order_update(cur, same, frame_id="r2") is None
        cur.execute("SELECT status, filled_quantity, last_source FROM orders WHERE account_id = %s", (a.id,))
        assert cur.fetchone() == ("FILLED", Decimal("1.000"), "ws")
    db.commit()
