"""Protocol conformance of the exchange simulator over real loopback sockets.

Plain ``requests`` and ``websocket-client`` on purpose: nothing of kraite-mp's own client code
is involved, so these tests pin the simulator to docs/PROTOCOL.md and not to our reading of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
import websocket
from support import wait_closed

from kraite_mp.simulator import MISSING_AIOHTTP, SimAccount, Simulator, SimulatorError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

REPO = Path(__file__).resolve().parent.parent
#: GET /fapi/v1/algoOrder fields of an untriggered algo order since 2026-06-09 (no tp*/sl*, no executedQty).
ALGO_REST_FIELDS = {
    "algoId", "clientAlgoId", "algoType", "orderType", "symbol", "side", "positionSide", "timeInForce",
    "quantity", "algoStatus", "actualOrderId", "actualPrice", "triggerPrice", "price", "icebergQuantity",
    "selfTradePreventionMode", "workingType", "priceMatch", "closePosition", "priceProtect", "reduceOnly",
    "createTime", "updateTime", "triggerTime", "goodTillDate",
}  # fmt: skip
ALL_EVENTS = "ORDER_TRADE_UPDATE/TRADE_LITE/ACCOUNT_UPDATE/ALGO_UPDATE/ACCOUNT_CONFIG_UPDATE/listenKeyExpired"
EIGHT_DECIMALS = re.compile(r"^-?\d+\.\d{8}$")


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def make_sim() -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(**kwargs: Any) -> Simulator:
        kwargs.setdefault("symbols", 20)
        kwargs.setdefault("mark_price_interval_s", 0.2)
        sim = Simulator(**kwargs)
        started.append(sim)
        return sim.start()

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., Simulator]) -> Simulator:
    return make_sim(accounts=2, seed=7)


@pytest.fixture
def sockets() -> Iterator[list[websocket.WebSocket]]:
    opened: list[websocket.WebSocket] = []
    yield opened
    for ws in opened:
        try:
            ws.close(timeout=0.5)
        except Exception:  # noqa: BLE001 - best effort teardown
            pass


def connect(sockets: list[websocket.WebSocket], url: str, timeout: float = 2.0) -> websocket.WebSocket:
    ws = websocket.create_connection(url, timeout=timeout)
    sockets.append(ws)
    return ws


def listen_key(sim: Simulator, account: SimAccount) -> str:
    r = requests.post(
        f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": account.api_key}, timeout=5
    )
    assert r.status_code == 200, r.text
    return str(r.json()["listenKey"])


def user_stream(
    sim: Simulator, sockets: list[websocket.WebSocket], account: SimAccount, events: str | None = ALL_EVENTS
) -> websocket.WebSocket:
    key = listen_key(sim, account)
    query = f"listenKey={key}" + (f"&events={events}" if events is not None else "")
    ws = connect(sockets, f"{sim.ws_url}/private/ws?{query}")
    assert sim.wait_for_connections(account.api_key, 1, timeout=3)
    return ws


def recv_json(ws: websocket.WebSocket, timeout: float = 2.0) -> Any:
    ws.settimeout(timeout)
    return json.loads(ws.recv())


def recv_n(ws: websocket.WebSocket, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any]] = []
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(out)} of {n} frames: {out}"
        out.append(recv_json(ws, left))
    return out


def assert_quiet(ws: websocket.WebSocket, seconds: float) -> None:
    """Nothing but control frames arrives for ``seconds``."""
    ws.settimeout(seconds)
    with pytest.raises(websocket.WebSocketTimeoutException):
        frame = ws.recv()
        pytest.fail(f"unexpected frame {frame[:200]!r}")


def signed(
    sim: Simulator,
    account: SimAccount,
    path: str,
    params: dict[str, Any] | None = None,
    secret: str | None = None,
    ts_offset_ms: int = 0,
    api_key: str | None = None,
) -> requests.Response:
    query = urlencode({**(params or {}), "timestamp": int(time.time() * 1000) + ts_offset_ms})
    sig = hmac.new((secret or account.api_secret).encode(), query.encode(), hashlib.sha256).hexdigest()
    headers = {"X-MBX-APIKEY": account.api_key if api_key is None else api_key}
    return requests.get(f"{sim.rest_url}{path}?{query}&signature={sig}", headers=headers, timeout=5)


def strip_times(orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = {"time", "updateTime", "createTime", "triggerTime"}
    return [{k: v for k, v in o.items() if k not in drop} for o in orders]


# ---------------------------------------------------------------------- REST: auth and listenKey
def test_signed_rest_good_bad_stale_and_unknown_key(sim: Simulator) -> None:
    acct = sim.accounts[0]
    good = signed(sim, acct, "/fapi/v1/openOrders")
    assert good.status_code == 200 and good.json() == []
    assert int(good.headers["X-MBX-USED-WEIGHT-1M"]) >= 40  # no symbol: weight 40

    bad = signed(sim, acct, "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}, secret="not-the-secret")
    assert bad.status_code == 400 and bad.json() == {
        "code": -1022,
        "msg": "Signature for this request is not valid.",
    }

    stale = signed(sim, acct, "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}, ts_offset_ms=-6000)
    assert stale.status_code == 400
    assert stale.json() == {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."}
    # a wider recvWindow accepts the same lag; more than 60000 is refused
    assert (
        signed(sim, acct, "/fapi/v1/openOrders", {"recvWindow": 10000}, ts_offset_ms=-6000).status_code == 200
    )
    assert signed(sim, acct, "/fapi/v1/openOrders", {"recvWindow": 70000}).status_code == 400

    for key in ("", "nope"):
        unknown = signed(sim, acct, "/fapi/v1/openOrders", api_key=key)
        assert unknown.status_code == 401
        assert unknown.json() == {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}

    t = requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5)
    assert abs(t.json()["serverTime"] - time.time() * 1000) < 5000
    assert "X-MBX-USED-WEIGHT-1M" in t.headers
    info = requests.get(f"{sim.rest_url}/fapi/v1/exchangeInfo", timeout=5).json()
    assert {s["symbol"] for s in info["symbols"]} >= {"BTCUSDT", "ETHUSDT"}
    assert all("_" not in s["symbol"] for s in info["symbols"])  # COIN-M is not on fapi


def test_listen_key_post_idempotent_put_delete(sim: Simulator) -> None:
    acct = sim.accounts[0]
    headers = {"X-MBX-APIKEY": acct.api_key}
    first = listen_key(sim, acct)
    assert len(first) == 64 and listen_key(sim, acct) == first
    assert listen_key(sim, sim.accounts[1]) != first
    put = requests.put(f"{sim.rest_url}/fapi/v1/listenKey", headers=headers, timeout=5)
    assert put.status_code == 200 and put.json() == {"listenKey": first}
    delete = requests.delete(f"{sim.rest_url}/fapi/v1/listenKey", headers=headers, timeout=5)
    assert delete.status_code == 200 and delete.json() == {}
    gone = requests.put(f"{sim.rest_url}/fapi/v1/listenKey", headers=headers, timeout=5)
    assert gone.status_code == 400 and gone.json() == {"code": -1125, "msg": "This listenKey does not exist."}
    assert listen_key(sim, acct) != first
    bad = requests.post(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": "x"}, timeout=5)
    assert bad.status_code == 401 and bad.json()["code"] == -2015


def test_unknown_listen_key_is_refused_on_private_route(sim: Simulator) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(
            f"{sim.ws_url}/private/ws?listenKey=nope&events=ORDER_TRADE_UPDATE", timeout=2
        )
    assert exc.value.status_code == 400


def test_listen_key_ttl_expiry(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, listen_key_ttl_s=0.6)
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    key = sim.truth(acct.api_key)["listen_key"]
    expired = recv_json(ws, 3.0)
    assert expired["e"] == "listenKeyExpired" and expired["listenKey"] == key and str(expired["E"]).isdigit()
    put = requests.put(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": acct.api_key}, timeout=5)
    assert put.json()["code"] == -1125
    sim.place_order(acct.api_key)  # nothing more on this connection
    assert_quiet(ws, 0.4)


# ---------------------------------------------------------------------- user-data events
def test_fill_sequence_fields_and_monotonic_times(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    oid = sim.place_order(
        acct.api_key, "BTCUSDT", "BUY", "LIMIT", "0.010", "86000.10", client_order_id="cid-1"
    )
    sim.fill(acct.api_key, oid, "0.004")
    sim.amend(acct.api_key, oid, price="86000.20")
    sim.fill(acct.api_key, oid)
    frames = recv_n(ws, 8)
    assert [(f["e"], f.get("o", {}).get("x")) for f in frames] == [
        ("ORDER_TRADE_UPDATE", "NEW"),
        ("TRADE_LITE", None),
        ("ORDER_TRADE_UPDATE", "TRADE"),
        ("ACCOUNT_UPDATE", None),
        ("ORDER_TRADE_UPDATE", "AMENDMENT"),
        ("TRADE_LITE", None),
        ("ORDER_TRADE_UPDATE", "TRADE"),
        ("ACCOUNT_UPDATE", None),
    ]
    new, lite1, trade1, acc1, amend, lite2, trade2, acc2 = frames
    assert set(new["o"]) >= set(
        "s c S o f q p ap sp x X i l z L N n T t b a m R wt ot ps cp rp pP si ss V pm gtd".split()
    )
    assert new["o"]["c"] == "cid-1" and new["o"]["i"] == oid and new["o"]["X"] == "NEW"
    assert (
        lite1["l"] == "0.004" and lite1["L"] == "86000.10" and lite1["i"] == oid and lite1["T"] == trade1["T"]
    )
    assert (
        trade1["o"]["X"] == "PARTIALLY_FILLED"
        and trade1["o"]["z"] == "0.004"
        and trade1["o"]["t"] == lite1["t"]
    )
    assert (
        acc1["a"]["m"] == "ORDER"
        and acc1["a"]["P"][0]["s"] == "BTCUSDT"
        and acc1["a"]["P"][0]["pa"] == "0.004"
    )
    assert amend["o"]["p"] == "86000.20" and amend["o"]["X"] == "PARTIALLY_FILLED"
    assert trade2["o"]["X"] == "FILLED" and trade2["o"]["z"] == "0.010" and trade2["o"]["l"] == "0.006"
    expected_avg = (
        Decimal("0.004") * Decimal("86000.10") + Decimal("0.006") * Decimal("86000.20")
    ) / Decimal("0.010")
    assert Decimal(trade2["o"]["ap"]) == expected_avg
    assert acc2["a"]["P"][0]["pa"] == "0.010"
    times = [(f["E"], f["T"]) for f in frames]
    assert [e for e, _ in times] == sorted(e for e, _ in times) and len({e for e, _ in times}) == len(times)
    for name in ("ORDER_TRADE_UPDATE", "TRADE_LITE", "ACCOUNT_UPDATE"):
        ts = [f["T"] for f in frames if f["e"] == name]
        assert ts == sorted(ts)
    rest = signed(sim, acct, "/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": oid}).json()
    assert (
        rest["status"] == "FILLED"
        and rest["executedQty"] == "0.010"
        and Decimal(rest["avgPrice"]) == expected_avg
    )
    assert Decimal(rest["cumQuote"]) == expected_avg * Decimal("0.010")


def test_events_filter_is_an_allow_list(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    only_orders = user_stream(sim, sockets, acct, events="ORDER_TRADE_UPDATE")
    everything = connect(sockets, f"{sim.ws_url}/private/ws?listenKey={listen_key(sim, acct)}")
    assert sim.wait_for_connections(acct.api_key, 2)
    oid = sim.place_order(acct.api_key)
    sim.fill(acct.api_key, oid)
    algo = sim.place_algo(acct.api_key)
    sim.cancel_algo(acct.api_key, algo)
    assert [f["o"]["x"] for f in recv_n(only_orders, 2)] == ["NEW", "TRADE"]
    assert_quiet(only_orders, 0.3)
    names = [f["e"] for f in recv_n(everything, 6)]
    assert names == [
        "ORDER_TRADE_UPDATE",
        "TRADE_LITE",
        "ORDER_TRADE_UPDATE",
        "ACCOUNT_UPDATE",
        "ALGO_UPDATE",
        "ALGO_UPDATE",
    ]


def test_algo_lifecycle_and_rest_shapes(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    aid = sim.place_algo(acct.api_key, "ETHUSDT", "SELL", "STOP_MARKET", "0.500", "3100.00")
    open_algos = signed(sim, acct, "/fapi/v1/openAlgoOrders").json()
    assert [a["algoId"] for a in open_algos] == [aid]
    assert set(open_algos[0]) == ALGO_REST_FIELDS and open_algos[0]["actualOrderId"] == ""
    assert signed(sim, acct, "/fapi/v1/openOrders").json() == []  # algo orders are not regular orders
    oid = sim.trigger_algo(acct.api_key, aid)
    frames = recv_n(ws, 8)
    algo = [f["o"] for f in frames if f["e"] == "ALGO_UPDATE"]
    assert [a["X"] for a in algo] == ["NEW", "TRIGGERING", "TRIGGERED", "FINISHED"]
    assert algo[0]["ai"] == "" and algo[2]["ai"] == str(oid) and algo[3]["aq"] == "0.500"
    assert Decimal(algo[3]["ap"]) == Decimal("3100.00")
    assert [f["e"] for f in frames] == [
        "ALGO_UPDATE", "ALGO_UPDATE", "ORDER_TRADE_UPDATE", "ALGO_UPDATE",
        "TRADE_LITE", "ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE", "ALGO_UPDATE",
    ]  # fmt: skip
    regular = frames[2]["o"]
    assert (
        regular["i"] == oid
        and regular["o"] == "MARKET"
        and regular["ot"] == "STOP_MARKET"
        and regular["sp"] == "3100.00"
    )
    rest = signed(sim, acct, "/fapi/v1/algoOrder", {"algoId": aid}).json()
    assert set(rest) == ALGO_REST_FIELDS | {"actualType", "actualQty"}  # the 2026-06-09 schema, triggered
    assert (
        rest["algoStatus"] == "FINISHED"
        and rest["actualOrderId"] == str(oid)
        and rest["algoType"] == "CONDITIONAL"
        and rest["actualType"] == "MARKET"
        and rest["actualQty"] == "0.500"
        and Decimal(rest["actualPrice"]) == Decimal("3100.00")
    )
    by_client = signed(sim, acct, "/fapi/v1/algoOrder", {"clientAlgoId": rest["clientAlgoId"]}).json()
    assert by_client == rest
    assert signed(sim, acct, "/fapi/v1/openAlgoOrders").json() == []
    missing = signed(sim, acct, "/fapi/v1/algoOrder", {"algoId": 1})
    assert missing.status_code == 400 and missing.json()["code"] == -2013

    rejected = sim.place_algo(acct.api_key, "ETHUSDT", "SELL", "TAKE_PROFIT", "0.5", "3300.00", "3300.00")
    sim.reject_algo(acct.api_key, rejected)
    expired = sim.place_algo(acct.api_key)
    sim.expire_algo(acct.api_key, expired)
    states = [f["o"]["X"] for f in recv_n(ws, 5)]
    assert states == ["NEW", "TRIGGERING", "REJECTED", "NEW", "EXPIRED"]
    with pytest.raises(SimulatorError):
        sim.cancel_algo(acct.api_key, expired)


def test_all_algo_orders_validates_its_parameters_window_and_limit(sim: Simulator) -> None:
    acct = sim.accounts[0]
    key = acct.api_key
    ids = [sim.place_algo(key, "ETHUSDT", "SELL", "STOP_MARKET", "0.500", f"30{i:02d}.00") for i in range(5)]
    other = sim.place_algo(key, "BTCUSDT", "BUY", "TAKE_PROFIT_MARKET", "0.010", "70000.00")
    filled_order = sim.trigger_algo(key, ids[1])
    sim.cancel_algo(key, ids[2])
    half = sim.trigger_algo(key, ids[3], fill=False)
    sim.fill(key, half, qty="0.200")

    reply = signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT"})
    assert reply.status_code == 200, reply.text
    rows = reply.json()
    assert [r["algoId"] for r in rows] == ids  # ended ones too, by algoId, only this symbol
    assert rows == [signed(sim, acct, "/fapi/v1/algoOrder", {"algoId": i}).json() for i in ids]
    by_id = {r["algoId"]: r for r in rows}
    assert by_id[ids[1]]["algoStatus"] == "FINISHED" and by_id[ids[1]]["actualOrderId"] == str(filled_order)
    assert by_id[ids[1]]["actualQty"] == "0.500" and Decimal(by_id[ids[1]]["actualPrice"]) == Decimal(
        "3001.00"
    )
    assert set(by_id[ids[2]]) == ALGO_REST_FIELDS and by_id[ids[2]]["algoStatus"] == "CANCELED"
    # triggered and partly filled: actualQty follows the regular order it created
    assert by_id[ids[3]]["algoStatus"] == "TRIGGERED" and by_id[ids[3]]["actualQty"] == "0.200"
    assert by_id[ids[3]]["actualType"] == "MARKET"
    assert int(reply.headers["X-MBX-USED-WEIGHT-1M"]) >= 5
    assert [
        r["algoId"] for r in signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "BTCUSDT"}).json()
    ] == [other]

    # limit: the newest n, or the first n from algoId on
    newest = signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT", "limit": 2}).json()
    assert [r["algoId"] for r in newest] == ids[-2:]
    from_id = signed(
        sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT", "algoId": ids[1], "limit": 2}
    ).json()
    assert [r["algoId"] for r in from_id] == ids[1:3]
    # window: by createTime; the one time given opens a 7-day window
    created = [r["createTime"] for r in rows]
    mid = signed(
        sim,
        acct,
        "/fapi/v1/allAlgoOrders",
        {"symbol": "ETHUSDT", "startTime": created[1], "endTime": created[3]},
    ).json()
    assert [r["algoId"] for r in mid] == ids[1:4]
    after = signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT", "startTime": created[4]})
    assert [r["algoId"] for r in after.json()] == ids[4:]
    before = signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT", "endTime": created[0] - 1})
    assert before.json() == []
    week = 7 * 86_400_000
    stale = signed(
        sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT", "endTime": created[0] - week - 1}
    )
    assert stale.json() == []  # the 7 days before endTime

    bad: list[tuple[dict[str, Any], int]] = [
        ({}, -1102),  # symbol is mandatory
        ({"symbol": ""}, -1102),
        ({"symbol": "ETHUSDT", "limit": 1001}, -1130),
        ({"symbol": "ETHUSDT", "limit": 0}, -1130),
        ({"symbol": "ETHUSDT", "limit": "many"}, -1102),
        ({"symbol": "ETHUSDT", "startTime": created[0], "endTime": created[0] + week + 1}, -4166),
        ({"symbol": "ETHUSDT", "startTime": created[1], "endTime": created[0]}, -1130),
        ({"symbol": "ETHUSDT", "algoId": "x"}, -1102),
    ]
    for params, code in bad:
        answer = signed(sim, acct, "/fapi/v1/allAlgoOrders", params)
        assert answer.status_code == 400 and answer.json()["code"] == code, (params, answer.text)
    unsigned = requests.get(
        f"{sim.rest_url}/fapi/v1/allAlgoOrders?symbol=ETHUSDT&timestamp={int(time.time() * 1000)}",
        headers={"X-MBX-APIKEY": key},
        timeout=5,
    )
    assert unsigned.status_code == 400 and unsigned.json()["code"] == -1102  # signature missing
    wrong = signed(sim, acct, "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT"}, secret="nope")
    assert wrong.status_code == 400 and wrong.json()["code"] == -1022
    assert signed(sim, sim.accounts[1], "/fapi/v1/allAlgoOrders", {"symbol": "ETHUSDT"}).json() == []


def test_truth_matches_rest_after_scenario(sim: Simulator) -> None:
    acct = sim.accounts[0]
    sim.step(acct.api_key, 300)
    truth = sim.truth(acct.api_key)
    orders, algos = truth["orders"], truth["algo_orders"]
    assert orders and algos
    statuses = {o["status"] for o in orders}
    assert {"NEW", "FILLED", "CANCELED"} <= statuses | {"NEW"}
    open_truth = [o for o in orders if o["status"] in ("NEW", "PARTIALLY_FILLED")]
    assert 0 < len(open_truth) <= 20
    assert signed(sim, acct, "/fapi/v1/openOrders").json() == open_truth
    for order in orders[:40]:
        by_id = signed(sim, acct, "/fapi/v1/order", {"symbol": order["symbol"], "orderId": order["orderId"]})
        assert by_id.json() == order
    sample = orders[0]
    by_client = signed(
        sim,
        acct,
        "/fapi/v1/order",
        {"symbol": sample["symbol"], "origClientOrderId": sample["clientOrderId"]},
    )
    assert by_client.json() == sample
    wrong_symbol = signed(sim, acct, "/fapi/v1/order", {"symbol": "NOPEUSDT", "orderId": sample["orderId"]})
    assert wrong_symbol.status_code == 400 and wrong_symbol.json() == {
        "code": -2013,
        "msg": "Order does not exist.",
    }
    btc = signed(sim, acct, "/fapi/v1/allOrders", {"symbol": "BTCUSDT"})
    assert btc.json() == [o for o in orders if o["symbol"] == "BTCUSDT"]
    assert int(btc.headers["X-MBX-USED-WEIGHT-1M"]) > 40
    for algo in algos[:10]:
        assert signed(sim, acct, "/fapi/v1/algoOrder", {"algoId": algo["algoId"]}).json() == algo
    for order in orders:
        z, price = Decimal(order["executedQty"]), Decimal(order["origQty"])
        assert Decimal(0) <= z <= price
    assert sim.truth(sim.accounts[1].api_key)["orders"] == []  # accounts are independent


#: GET /fapi/v3/positionRisk item fields (Position Information V3).
POSITION_RISK_FIELDS = {
    "symbol", "positionSide", "positionAmt", "entryPrice", "breakEvenPrice", "markPrice", "unRealizedProfit",
    "liquidationPrice", "isolatedMargin", "notional", "marginAsset", "isolatedWallet", "initialMargin",
    "maintMargin", "positionInitialMargin", "openOrderInitialMargin", "adl", "bidNotional", "askNotional",
    "updateTime",
}  # fmt: skip
#: GET /fapi/v3/balance item fields (Futures Account Balance V3).
BALANCE_FIELDS = {
    "accountAlias", "asset", "balance", "crossWalletBalance", "crossUnPnl", "availableBalance",
    "maxWithdrawAmount", "marginAvailable", "updateTime",
}  # fmt: skip


def test_position_risk_and_balance_answer_the_v3_shapes_and_weights(sim: Simulator) -> None:
    acct = sim.accounts[0]
    key = acct.api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.020")
    sim.place_order(key, symbol="ETHUSDT", side="SELL", type="MARKET", quantity="1.000")
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="1.000")  # ETH closed
    sim.place_order(key, symbol="SOLUSDT", side="BUY", type="LIMIT", quantity="2", price="100.000")  # resting
    truth = sim.truth(key)

    first = signed(sim, acct, "/fapi/v3/positionRisk")
    assert first.status_code == 200, first.text
    rows = first.json()
    # only what holds a position or an open order; the closed ETH position is absent
    assert [r["symbol"] for r in rows] == ["BTCUSDT", "SOLUSDT"]
    assert all(set(r) == POSITION_RISK_FIELDS for r in rows)
    btc, sol = rows
    [want] = [p for p in truth["positions"] if p["s"] == "BTCUSDT"]
    assert btc["positionAmt"] == want["pa"] == "0.020" and btc["entryPrice"] == want["ep"]
    assert btc["positionSide"] == "BOTH" and Decimal(btc["isolatedWallet"]) == 0 and btc["updateTime"] > 0
    assert Decimal(btc["notional"]) == Decimal(btc["positionAmt"]) * Decimal(btc["markPrice"])
    assert Decimal(sol["positionAmt"]) == 0 and Decimal(sol["bidNotional"]) == Decimal("200.000")
    assert all(
        EIGHT_DECIMALS.match(r[f]) for r in rows for f in ("markPrice", "unRealizedProfit", "notional")
    )
    # one symbol asked: that one, even flat
    eth = signed(sim, acct, "/fapi/v3/positionRisk", {"symbol": "ETHUSDT"})
    assert [(r["symbol"], Decimal(r["positionAmt"])) for r in eth.json()] == [("ETHUSDT", 0)]
    assert int(eth.headers["X-MBX-USED-WEIGHT-1M"]) - int(first.headers["X-MBX-USED-WEIGHT-1M"]) == 5

    balance = signed(sim, acct, "/fapi/v3/balance")
    assert int(balance.headers["X-MBX-USED-WEIGHT-1M"]) - int(eth.headers["X-MBX-USED-WEIGHT-1M"]) == 5
    assets = {b["asset"]: b for b in balance.json()}
    assert all(set(b) == BALANCE_FIELDS for b in assets.values()) and "USDT" in assets
    usdt = assets["USDT"]
    assert usdt["balance"] == usdt["crossWalletBalance"] == truth["wallet_balance"] != "10000.00000000"
    assert Decimal(usdt["crossUnPnl"]) == Decimal(btc["unRealizedProfit"]) and usdt["updateTime"] > 0
    assert all(b["balance"] == "0.00000000" for a, b in assets.items() if a != "USDT")
    account = signed(sim, acct, "/fapi/v3/account")
    assert int(account.headers["X-MBX-USED-WEIGHT-1M"]) - int(balance.headers["X-MBX-USED-WEIGHT-1M"]) == 5
    info = account.json()
    assert info["totalWalletBalance"] == truth["wallet_balance"]
    assert [(p["symbol"], p["positionAmt"]) for p in info["positions"]] == [
        (r["symbol"], r["positionAmt"]) for r in rows
    ]
    assert {a["asset"] for a in info["assets"]} == set(assets)
    assert signed(sim, acct, "/fapi/v3/balance", secret="x" * 64).json()["code"] == -1022
    assert signed(sim, sim.accounts[1], "/fapi/v3/positionRisk").json() == []  # accounts are independent


def test_scenario_is_deterministic_for_a_seed(make_sim: Callable[..., Simulator]) -> None:
    first, second = make_sim(accounts=1, seed=42), make_sim(accounts=1, seed=42)
    assert first.accounts == second.accounts
    for sim in (first, second):
        sim.step(sim.accounts[0].api_key, 150)
    a, b = first.truth(first.accounts[0].api_key), second.truth(second.accounts[0].api_key)
    assert strip_times(a["orders"]) == strip_times(b["orders"])
    assert strip_times(a["algo_orders"]) == strip_times(b["algo_orders"])
    assert a["wallet_balance"] == b["wallet_balance"]
    other = make_sim(accounts=1, seed=43)
    assert other.accounts != first.accounts


def test_background_rate_generates_bounded_events(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=2)
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    sim.set_rate(200)
    frames = recv_n(ws, 100, timeout=5)
    sim.set_rate(0)
    assert {"ORDER_TRADE_UPDATE", "TRADE_LITE", "ACCOUNT_UPDATE"} <= {f["e"] for f in frames}
    es = [int(f["E"]) for f in frames]
    assert es == sorted(es)
    for key in (a.api_key for a in sim.accounts):
        truth = sim.truth(key)
        assert truth["steps"] > 0
        assert len([o for o in truth["orders"] if o["status"] in ("NEW", "PARTIALLY_FILLED")]) <= 20


# ---------------------------------------------------------------------- connection rules
def test_server_pings_and_drops_clients_that_do_not_pong(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, ping_interval_s=0.2, pong_timeout_s=0.6)
    acct = sim.accounts[0]
    silent_client = user_stream(sim, sockets, acct)
    good_client = connect(
        sockets, f"{sim.ws_url}/private/ws?listenKey={listen_key(sim, acct)}&events={ALL_EVENTS}"
    )
    good_client.settimeout(0.5)
    opcode, payload = good_client.recv_data(control_frame=True)  # websocket-client pongs it back
    assert opcode == websocket.ABNF.OPCODE_PING and payload
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # keep answering pings for well over the pong timeout
        try:
            good_client.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            pass
    time.sleep(0.1)
    # the client that never read (so never ponged) is gone, the other is alive
    assert sim.stats()["current_connections"].get(acct.api_key) == 1
    assert sim.stats()["closed"].get("pong timeout") == 1
    wait_closed(silent_client, 1.0)
    sim.place_order(acct.api_key)
    deadline = time.monotonic() + 2
    while True:
        opcode, data = good_client.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_TEXT:
            assert json.loads(data)["e"] == "ORDER_TRADE_UPDATE"
            break
        assert time.monotonic() < deadline


def test_unsolicited_pongs_do_not_keep_a_connection_alive(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, ping_interval_s=0.2, pong_timeout_s=0.5)
    ws = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.wait_for_connections("market")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and sim.stats()["current_connections"].get("market"):
        ws.pong(b"unsolicited")
        time.sleep(0.15)
    assert not sim.stats()["current_connections"].get("market")


def test_stalled_market_reader_is_dropped(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    """A client that stops reading a busy stream fills the buffers; it must still be dropped."""
    sim = make_sim(symbols=570, mark_price_interval_s=0.02, ping_interval_s=0.2, pong_timeout_s=0.5)
    connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.wait_for_connections("market")
    deadline = time.monotonic() + 5
    while sim.stats()["current_connections"].get("market"):
        assert time.monotonic() < deadline, sim.stats()
        time.sleep(0.05)


def test_client_pings_are_answered(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    ws = connect(sockets, f"{sim.ws_url}/ws/whatever")
    ws.ping(b"hello")
    ws.settimeout(2)
    opcode, data = ws.recv_data(control_frame=True)
    assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"hello")


def test_more_than_ten_messages_per_second_disconnects(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    ws = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    for i in range(12):
        ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
    wait_closed(ws, 2.0)
    assert sim.stats()["closed"].get("too many messages") == 1


def test_max_connection_age(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    ws = user_stream(sim, sockets, sim.accounts[0])
    sim.set_max_connection_age(0.3)
    wait_closed(ws, 2.0)
    assert sim.stats()["closed"].get("max connection age") == 1


def _small_window_stream(sim: Simulator, sockets: list[websocket.WebSocket], account: SimAccount) -> Any:
    """A user stream whose receive buffer is small: the server's writer waits on this reader's pace."""
    key = listen_key(sim, account)
    ws = websocket.create_connection(
        f"{sim.ws_url}/private/ws?listenKey={key}",
        timeout=2.0,
        sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 8192),),
    )
    sockets.append(ws)
    assert sim.wait_for_connections(account.api_key, 1, timeout=3)
    return ws


#: Frames of 2 KB queued before an ordered close: far more than the socket buffers hold.
QUEUED_FRAMES = 4000


def test_an_ordered_close_delivers_every_queued_frame_to_a_slow_reader(
    sim: Simulator, sockets: list[websocket.WebSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection-age close goes out after the frames queued before it. A reader slower than the
    close deadline, but reading, gets every one of them and then the close frame (the deadline aborts
    only a connection that wrote nothing for a whole period; CI once lost a buffer's worth of frames
    counted as sent)."""
    # a deadline well above the reader's pauses: a loaded machine (CI, other runs) stalls a reader for
    # hundreds of milliseconds, which must not count as "stopped reading"
    close_deadline_s, pause_s = 2.0, 0.4
    monkeypatch.setattr("kraite_mp.simulator.streams.ORDERED_CLOSE_DEADLINE_S", close_deadline_s)
    account = sim.accounts[0]
    ws = _small_window_stream(sim, sockets, account)
    for i in range(QUEUED_FRAMES):
        sim.send_raw(account.api_key, json.dumps({"e": "PAD", "i": i, "pad": "x" * 2000}))
    sim.set_max_connection_age(0.01)
    got, started, close_code = [], time.monotonic(), None
    deadline = started + 60
    while time.monotonic() < deadline:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close_code = int.from_bytes(data[:2], "big")
            break
        if opcode == websocket.ABNF.OPCODE_TEXT:
            got.append(json.loads(data)["i"])
            if len(got) % 200 == 0:
                time.sleep(pause_s)  # slow, never stalled for a whole deadline
    took = time.monotonic() - started
    assert close_code == 1000 and got == list(range(QUEUED_FRAMES)), (close_code, len(got))
    assert took > 3 * close_deadline_s, (
        f"the reader took {took:.2f}s: not slower than the deadline, proves nothing"
    )
    assert sim.stats()["frames_sent"][account.api_key] == QUEUED_FRAMES


def test_an_ordered_close_to_a_reader_that_stopped_is_aborted(
    sim: Simulator, sockets: list[websocket.WebSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kraite_mp.simulator.streams.ORDERED_CLOSE_DEADLINE_S", 0.3)
    account = sim.accounts[0]
    ws = _small_window_stream(sim, sockets, account)
    for i in range(QUEUED_FRAMES):
        sim.send_raw(account.api_key, json.dumps({"e": "PAD", "i": i, "pad": "x" * 2000}))
    sim.set_ping(interval_s=60.0)  # only the close deadline may drop it
    sim.set_max_connection_age(0.01)
    time.sleep(5 * 0.3)  # not reading: the writer is stuck on the full socket
    got, close_code, ended = 0, None, None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError) as e:
            ended = type(e).__name__
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close_code = int.from_bytes(data[:2], "big")
            break
        got += 1
    stats = sim.stats()
    assert ended is not None and close_code is None, (ended, close_code, got)  # dropped, no close handshake
    assert got < QUEUED_FRAMES
    assert stats["closed"].get("max connection age") == 1
    assert stats["frames_sent"][account.api_key] < QUEUED_FRAMES, "the stalled reader cannot have taken all"


# ---------------------------------------------------------------------- market streams and retired routes
def test_mark_price_array_frames(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(symbols=570)
    symbols = dict(sim.mark_symbols)
    assert len(symbols) == 570
    assert (
        symbols["BTCUSD_PERP"] == 2
        and symbols["BTCUSDT"] == 1
        and "1000SATSUSDT" in symbols
        and "BTCUSDC" in symbols
    )
    sim.set_mark_price_override("ETHUSDT", "3333.12345678")
    ws = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    t0 = time.monotonic()
    first, second = recv_json(ws), recv_json(ws)
    assert time.monotonic() - t0 < 1.5
    assert isinstance(first, list) and len(first) == 570 and len(second) == 570
    for item in first:
        assert set(item) == {"e", "E", "s", "p", "ap", "P", "i", "r", "T", "st"}
        assert item["e"] == "markPriceUpdate" and item["st"] in (1, 2)
        for k in ("p", "P", "i", "r"):
            assert EIGHT_DECIMALS.match(item[k]), item
        assert item["T"] > item["E"] and item["T"] % (8 * 3600 * 1000) == 0
    by_symbol = {item["s"]: item for item in first}
    assert by_symbol["ETHUSDT"]["p"] == "3333.12345678"
    assert 60000 < Decimal(by_symbol["BTCUSDT"]["p"]) < 120000
    assert second[0]["E"] > first[0]["E"]

    combined = connect(sockets, f"{sim.ws_url}/market/stream?streams=!markPrice@arr@1s")
    wrapped = recv_json(combined)
    assert wrapped["stream"] == "!markPrice@arr@1s" and len(wrapped["data"]) == 570

    sim.set_symbols(["BTCUSDT", "ETHUSDT", "ETHUSD_PERP"])
    deadline = time.monotonic() + 2
    while len(frame := recv_json(ws)) != 3:
        assert time.monotonic() < deadline
    assert [i["s"] for i in frame] == ["BTCUSDT", "ETHUSDT", "ETHUSD_PERP"] and frame[2]["st"] == 2


def test_retired_routes_accept_and_ack_but_deliver_nothing(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    acct = sim.accounts[0]
    key = listen_key(sim, acct)
    old_user = connect(sockets, f"{sim.ws_url}/ws/{key}")
    old_combined = connect(sockets, f"{sim.ws_url}/stream?streams={key}/!markPrice@arr@1s")
    old_market = connect(sockets, f"{sim.ws_url}/ws/!markPrice@arr@1s")
    old_user.send(json.dumps({"method": "SUBSCRIBE", "params": ["!markPrice@arr@1s"], "id": 5}))
    assert recv_json(old_user) == {"result": None, "id": 5}
    assert sim.wait_for_connections("retired", 3)
    oid = sim.place_order(acct.api_key)
    sim.fill(acct.api_key, oid)
    for ws in (old_user, old_combined, old_market):
        assert_quiet(ws, 0.45)  # two mark-price ticks and four user events went elsewhere
    assert sim.stats()["events_lost"][acct.api_key] == 4  # nobody on /private: lost


# ---------------------------------------------------------------------- faults
def test_drop_connections(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    a, b = sim.accounts
    ws_a, ws_b = user_stream(sim, sockets, a), user_stream(sim, sockets, b)
    market = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.wait_for_connections("market")
    assert sim.drop_connections(a.api_key) == 1
    wait_closed(ws_a, 2)
    sim.place_order(b.api_key)
    assert recv_json(ws_b)["e"] == "ORDER_TRADE_UPDATE"
    assert recv_json(market)[0]["e"] == "markPriceUpdate"
    assert sim.drop_connections(None, abrupt=True) == 2
    wait_closed(ws_b, 2)
    wait_closed(market, 2)
    assert sim.stats()["current_connections"] == {}


def test_go_silent_user_stream_loses_events_and_ignores_pings(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    assert sim.go_silent(acct.api_key, 0.8) == 1
    sim.place_order(acct.api_key)  # lost: written into the void
    ws.ping(b"anyone?")
    ws.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv_data(control_frame=True)
    time.sleep(0.5)
    oid = sim.place_order(acct.api_key)  # after the silence: delivered again
    frame = recv_json(ws)
    assert frame["o"]["i"] == oid
    assert sim.stats()["events_lost"][acct.api_key] == 1


def test_go_silent_market(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    ws = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    recv_json(ws)
    sim.go_silent("market", 0.7)
    assert_quiet(ws, 0.5)
    assert recv_json(ws, 1.0)[0]["e"] == "markPriceUpdate"


def test_send_raw(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    market = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.wait_for_connections("market")
    big = json.dumps({"e": "SOMETHING_NEW", "pad": "x" * 200_000})
    assert sim.send_raw(acct.api_key, "{not json") == 1
    sim.send_raw(acct.api_key, big)
    ws.settimeout(2)
    assert ws.recv() == "{not json"
    assert ws.recv() == big
    sim.send_market_raw('{"e":"weird"}')
    deadline = time.monotonic() + 2
    while (frame := market.recv()) != '{"e":"weird"}':
        assert time.monotonic() < deadline and str(frame).startswith("[")


def test_expire_listen_key_on_demand(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    muted = user_stream(sim, sockets, acct, events="ORDER_TRADE_UPDATE")  # listenKeyExpired not allowed
    ws = connect(sockets, f"{sim.ws_url}/private/ws?listenKey={listen_key(sim, acct)}&events={ALL_EVENTS}")
    assert sim.wait_for_connections(acct.api_key, 2)
    key = sim.expire_listen_key(acct.api_key)
    frame = recv_json(ws)
    assert frame == {"e": "listenKeyExpired", "E": frame["E"], "listenKey": key}
    assert_quiet(muted, 0.2)
    put = requests.put(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": acct.api_key}, timeout=5)
    assert put.status_code == 400 and put.json()["code"] == -1125
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"{sim.ws_url}/private/ws?listenKey={key}", timeout=2)
    sim.place_order(acct.api_key)
    assert_quiet(ws, 0.3)
    fresh = user_stream(sim, sockets, acct)
    sim.place_order(acct.api_key)
    assert recv_json(fresh)["e"] == "ORDER_TRADE_UPDATE"


def test_deleting_a_listen_key_pushes_listen_key_expired_then_closes(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    acct = sim.accounts[0]
    ws = user_stream(sim, sockets, acct)
    key = sim.truth(acct.api_key)["listen_key"]
    sim.set_listen_key_expired_e(as_string=False)  # the SDK's schema: an int
    headers = {"X-MBX-APIKEY": acct.api_key}
    assert requests.delete(f"{sim.rest_url}/fapi/v1/listenKey", headers=headers, timeout=5).json() == {}
    expired = recv_json(ws)
    assert expired == {"e": "listenKeyExpired", "E": expired["E"], "listenKey": key}
    assert isinstance(expired["E"], int)
    wait_closed(ws, 3)
    assert sim.stats()["closed"].get("listenKey deleted") == 1
    # the docs' string form is the default, and what an expiry sends
    sim.set_listen_key_expired_e()
    ws2 = user_stream(sim, sockets, acct)
    sim.expire_listen_key(acct.api_key)
    assert isinstance(recv_json(ws2)["E"], str)


def test_lose_or_keep_events_while_disconnected(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    sim.place_order(acct.api_key)  # nobody connected: lost (production behaviour)
    ws = user_stream(sim, sockets, acct)
    assert_quiet(ws, 0.2)
    ws.close()
    assert sim.wait_for_connections(acct.api_key, 0)
    sim.set_lose_while_disconnected(False)
    oid = sim.place_order(acct.api_key)
    deadline = time.monotonic() + 2
    while sim.stats()["current_connections"].get(acct.api_key):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sim.fill(acct.api_key, oid)
    kept = user_stream(sim, sockets, acct)
    assert [f["e"] for f in recv_n(kept, 4)] == [
        "ORDER_TRADE_UPDATE",
        "TRADE_LITE",
        "ORDER_TRADE_UPDATE",
        "ACCOUNT_UPDATE",
    ]
    assert len(sim.truth(acct.api_key)["orders"]) == 2


def test_invalidate_api_key(sim: Simulator) -> None:
    acct = sim.accounts[0]
    sim.invalidate_api_key(acct.api_key)
    r = signed(sim, acct, "/fapi/v1/openOrders")
    assert r.status_code == 401 and r.json() == {
        "code": -2015,
        "msg": "Invalid API-key, IP, or permissions for action.",
    }
    lk = requests.post(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": acct.api_key}, timeout=5)
    assert lk.status_code == 401 and lk.json()["code"] == -2015
    assert signed(sim, sim.accounts[1], "/fapi/v1/openOrders").status_code == 200
    sim.restore_api_key(acct.api_key)
    assert signed(sim, acct, "/fapi/v1/openOrders").status_code == 200


def test_injected_429_and_418_with_retry_after(sim: Simulator) -> None:
    acct = sim.accounts[0]
    sim.rate_limit(status=429, count=2, retry_after_s=7)
    for _ in range(2):
        r = signed(sim, acct, "/fapi/v1/openOrders")
        assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.json()["code"] == -1003
        assert "X-MBX-USED-WEIGHT-1M" in r.headers
    assert signed(sim, acct, "/fapi/v1/openOrders").status_code == 200
    sim.rate_limit(status=418, count=1, retry_after_s=120)
    banned = requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5)
    assert (
        banned.status_code == 418
        and banned.headers["Retry-After"] == "120"
        and banned.json()["code"] == -1003
    )
    assert requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code == 200


def test_weight_limit_429_then_418_ban(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(accounts=1, weight_limit_1m=100, ban_s=5)
    acct = sim.accounts[0]
    statuses = [signed(sim, acct, "/fapi/v1/openOrders").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # 40 + 40, the third would make 120
    refused = signed(sim, acct, "/fapi/v1/openOrders")
    assert 55 <= int(refused.headers["Retry-After"]) <= 60 and refused.json()["code"] == -1003
    assert refused.headers["X-MBX-USED-WEIGHT-1M"] == "80"
    # while told to wait even a light request is refused; the third one earns a ban
    statuses = [requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code for _ in range(3)]
    assert statuses == [429, 418, 418]
    assert requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).headers["Retry-After"] == "5"
    sim.reset_rate_limits()
    assert requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code == 200


def refused_handshake(url: str) -> websocket.WebSocketBadStatusException:
    """The handshake to ``url`` must be refused before the upgrade: its exception."""
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(url, timeout=2).close()
    return exc.value


def header(exc: websocket.WebSocketBadStatusException, name: str) -> str | None:
    return {k.lower(): v for k, v in (exc.resp_headers or {}).items()}.get(name.lower())


def test_stats_count_429_418_and_peak_weight(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(accounts=1, weight_limit_1m=100, ban_s=5)
    acct = sim.accounts[0]
    assert sim.stats()["rest_limits"] == {"sent_429": 0, "sent_418": 0, "peak_weight_1m": 0, "per_ip": {}}
    statuses = [signed(sim, acct, "/fapi/v1/openOrders").status_code for _ in range(3)]
    statuses += [requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429, 429, 418, 418]  # 40 + 40, over, two strikes, the ban
    sim.reset_rate_limits()
    sim.rate_limit(status=429, count=1, retry_after_s=1)  # injected ones are sent, so counted
    assert requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code == 429
    assert requests.get(f"{sim.rest_url}/fapi/v1/time", timeout=5).status_code == 200
    expected = {"sent_429": 4, "sent_418": 2, "peak_weight_1m": 80}  # the reset keeps the counts
    report = sim.stats()["rest_limits"]
    assert report == {**expected, "per_ip": {"127.0.0.1": expected}}
    assert requests.get(f"{sim.control_url}/stats", timeout=5).json()["rest_limits"] == report


def test_connection_attempt_limit_refuses_after_the_nth(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, connection_limit=4, connection_window_s=1.5)
    key = listen_key(sim, sim.accounts[0])
    private = f"{sim.ws_url}/private/ws?listenKey={key}&events={ALL_EVENTS}"
    market = f"{sim.ws_url}/market/ws/!markPrice@arr@1s"
    # every route and every attempt counts: an unknown listenKey's 400 too
    connect(sockets, private)
    connect(sockets, market)
    connect(sockets, f"{sim.ws_url}/ws/btcusdt@depth")
    assert refused_handshake(f"{sim.ws_url}/private/ws?listenKey=nope").status_code == 400
    retry_after = "0"
    for url in (market, private, f"{sim.ws_url}/market/stream?streams=!markPrice@arr@1s"):
        exc = refused_handshake(url)
        assert exc.status_code == 429 and json.loads(exc.resp_body or b"{}")["code"] == -1003
        retry_after = header(exc, "Retry-After") or "missing"
        assert retry_after in ("1", "2")
    assert sim.stats()["current_connections"] == {sim.accounts[0].api_key: 1, "market": 1, "retired": 1}
    report = sim.stats()["ws_handshakes"]
    counts = {"attempts": 7, "refused": 3, "refused_limit": 3, "refused_maintenance": 0, "peak_attempts": 7}
    assert report == {**counts, "limit": 4, "window_s": 1.5, "per_ip": {"127.0.0.1": counts}}
    # a client that waits Retry-After is admitted (polling meanwhile would count, and keep it out)
    time.sleep(int(retry_after))
    connect(sockets, market)
    assert sim.wait_for_connections("market", 2)


def test_burst_of_connects_counts_in_stats(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, connection_limit=10, connection_window_s=60.0)
    statuses: list[int] = []
    for _ in range(15):
        try:
            connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
            statuses.append(101)
        except websocket.WebSocketBadStatusException as exc:
            statuses.append(exc.status_code)
    assert statuses == [101] * 10 + [429] * 5
    assert sim.wait_for_connections("market", 10)
    stats = requests.get(f"{sim.control_url}/stats", timeout=5).json()["ws_handshakes"]
    assert (stats["attempts"], stats["refused_limit"], stats["peak_attempts"]) == (15, 5, 15)
    assert stats["per_ip"]["127.0.0.1"]["refused"] == 5
    sim.reset_rate_limits()  # forgets the window, keeps the counts
    connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.stats()["ws_handshakes"]["attempts"] == 16
    assert sim.stats()["ws_handshakes"]["peak_attempts"] == 15
    # the default is Binance's budget
    default = Simulator(accounts=1, symbols=5)  # never started
    assert (default.hub.connection_limit, default.hub.connection_window_s) == (300, 300.0)


def test_handshake_log_keeps_every_attempt_in_order_with_its_route_and_refusal(
    make_sim: Callable[..., Simulator], sockets: list[websocket.WebSocket]
) -> None:
    sim = make_sim(accounts=1, connection_limit=3, connection_window_s=60.0)
    key = listen_key(sim, sim.accounts[0])
    started = time.monotonic()
    connect(sockets, f"{sim.ws_url}/private/ws?listenKey={key}&events={ALL_EVENTS}")
    connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    # an unknown listenKey is admitted (counted), then refused with 400
    assert refused_handshake(f"{sim.ws_url}/private/ws?listenKey=nope").status_code == 400
    middle = time.monotonic()
    assert refused_handshake(f"{sim.ws_url}/ws/btcusdt@depth").status_code == 429
    log = sim.handshake_log()
    assert [(e["route"], e["refused"], e["ip"]) for e in log] == [
        ("private", None, "127.0.0.1"),
        ("market", None, "127.0.0.1"),
        ("private", None, "127.0.0.1"),
        ("retired", 429, "127.0.0.1"),
    ]
    times = [e["t"] for e in log]
    assert started <= times[0] <= times[1] <= times[2] <= middle <= times[3] <= time.monotonic()
    assert sim.handshake_log(since=middle) == log[3:]
    sim.set_connection_limit(limit=10)
    sim.refuse_connections(5.0)
    assert refused_handshake(f"{sim.ws_url}/ws-fapi/v1").status_code == 503
    sim.reset_rate_limits()  # forgets the window, not the log
    reply = requests.post(f"{sim.control_url}/handshake_log", json={"since": middle}, timeout=5)
    assert [(e["route"], e["refused"]) for e in reply.json()["result"]] == [("retired", 429), ("wsapi", 503)]
    assert len(sim.handshake_log()) == sim.stats()["ws_handshakes"]["attempts"] == 5


def test_maintenance_window_refuses_then_accepts(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    acct = sim.accounts[0]
    ws_a = user_stream(sim, sockets, acct)
    market = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    assert sim.wait_for_connections("market")
    dropped = requests.post(
        f"{sim.control_url}/refuse_connections", json={"seconds": 1.0, "drop": True}, timeout=5
    )
    assert dropped.status_code == 200 and dropped.json() == {"result": 2}
    wait_closed(ws_a, 2)
    wait_closed(market, 2)
    started = time.monotonic()
    key = listen_key(sim, acct)  # REST still works during the window
    private = f"{sim.ws_url}/private/ws?listenKey={key}&events={ALL_EVENTS}"
    for url in (private, f"{sim.ws_url}/market/ws/!markPrice@arr@1s", f"{sim.ws_url}/ws/x"):
        exc = refused_handshake(url)
        assert exc.status_code == 503 and header(exc, "Retry-After") == "1"
    deadline = started + 4.0
    while True:
        assert time.monotonic() < deadline, "the maintenance window never ended"
        try:
            connect(sockets, private)
            break
        except websocket.WebSocketBadStatusException as exc:
            assert exc.status_code == 503
            time.sleep(0.1)
    assert time.monotonic() - started >= 0.5  # refused for the window, not just once
    assert sim.wait_for_connections(acct.api_key)
    report = sim.stats()["ws_handshakes"]
    assert report["refused"] == report["refused_maintenance"] >= 3 and report["refused_limit"] == 0
    # a window can be ended early
    assert sim.refuse_connections(60) == 0
    assert refused_handshake(f"{sim.ws_url}/ws/x").status_code == 503
    sim.refuse_connections(0)
    connect(sockets, f"{sim.ws_url}/ws/x")
    assert sim.wait_for_connections("retired")


def test_manual_calls_validate(sim: Simulator) -> None:
    acct = sim.accounts[0]
    oid = sim.place_order(acct.api_key)
    with pytest.raises(SimulatorError):
        sim.fill(acct.api_key, oid, "1.0")  # more than the order
    sim.cancel(acct.api_key, oid)
    with pytest.raises(SimulatorError):
        sim.cancel(acct.api_key, oid)
    with pytest.raises(SimulatorError):
        sim.place_order("unknown-key")
    market = sim.place_order(acct.api_key, "ETHUSDT", "SELL", "MARKET", "0.100")
    assert sim.truth(acct.api_key)["orders"][-1]["orderId"] == market
    assert sim.truth(acct.api_key)["orders"][-1]["status"] == "FILLED"
    expired = sim.place_order(acct.api_key)
    sim.expire(acct.api_key, expired)
    assert sim.truth(acct.api_key)["orders"][-1]["status"] == "EXPIRED"


# ---------------------------------------------------------------------- control API and CLI
def test_control_api(sim: Simulator) -> None:
    acct = sim.accounts[0]
    step = requests.post(f"{sim.control_url}/step", json={"api_key": acct.api_key, "n": 30}, timeout=5)
    assert step.status_code == 200 and step.json() == {"result": None}
    placed = requests.post(
        f"{sim.control_url}/place_order", json={"api_key": acct.api_key, "price": "85000.00"}, timeout=5
    )
    oid = placed.json()["result"]
    truth = requests.get(f"{sim.control_url}/truth", params={"api_key": acct.api_key}, timeout=5).json()
    assert truth["orders"] == sim.truth(acct.api_key)["orders"] and truth["orders"][-1]["orderId"] == oid
    bad = requests.post(f"{sim.control_url}/fill", json={"api_key": acct.api_key, "order_id": 1}, timeout=5)
    assert bad.status_code == 400 and "unknown order" in bad.json()["error"]
    assert requests.post(f"{sim.control_url}/nope", json={}, timeout=5).status_code == 404
    requests.post(f"{sim.control_url}/invalidate_api_key", json={"api_key": acct.api_key}, timeout=5)
    assert signed(sim, acct, "/fapi/v1/openOrders").status_code == 401
    stats = requests.get(f"{sim.control_url}/stats", timeout=5).json()
    assert stats["requests"]["/fapi/v1/openOrders"] == 1 and stats["control_requests"]["step"] == 1
    requests.post(f"{sim.control_url}/set_symbols", json={"symbols": ["BTCUSDT", "BTCUSD_PERP"]}, timeout=5)
    assert sim.mark_symbols == [("BTCUSDT", 1), ("BTCUSD_PERP", 2)]
    silent = requests.post(
        f"{sim.control_url}/go_silent", json={"target": "market", "seconds": 0.1}, timeout=5
    )
    assert silent.json() == {"result": 0}
    accounts = requests.get(f"{sim.control_url}/accounts", timeout=5).json()
    assert accounts[0] == {"api_key": acct.api_key, "api_secret": acct.api_secret}


def test_simulator_refuses_non_loopback_and_stops_idempotently() -> None:
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")
    sim = Simulator(accounts=1, symbols=5)
    sim.stop()  # never started: fine
    with sim:
        url = sim.rest_url
        assert requests.get(f"{url}/fapi/v1/ping", timeout=5).json() == {}
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/fapi/v1/ping", timeout=2)
    with pytest.raises(RuntimeError):
        sim.start()


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "kraite_mp.simulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_cli_prints_one_json_line_and_exits_0_on_sigterm() -> None:
    proc = _cli("--accounts", "2", "--symbols", "10", "--seed", "3", "--mark-price-interval", "0.2")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        info = json.loads(line)
        assert set(info) == {"rest_url", "ws_url", "control_url", "ws_api_url", "accounts", "ca_file"}
        assert info["ca_file"] is None  # plain http/ws unless --tls-dir
        assert len(info["accounts"]) == 2 and set(info["accounts"][0]) == {"api_key", "api_secret"}
        assert info["rest_url"].startswith("http://127.0.0.1:") and info["ws_url"].startswith(
            "ws://127.0.0.1:"
        )
        assert requests.get(info["rest_url"] + "/fapi/v1/time", timeout=5).status_code == 200
        ws = websocket.create_connection(info["ws_url"] + "/market/ws/!markPrice@arr@1s", timeout=3)
        try:
            assert len(json.loads(ws.recv())) == 10
        finally:
            ws.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out == ""  # exactly one line in total
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_cli_with_a_tls_dir_serves_https_and_wss_trusted_through_its_ca_file(tmp_path: Path) -> None:
    proc = _cli("--accounts", "1", "--symbols", "5", "--tls-dir", str(tmp_path / "tls"))
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())  # bounded by the test timeout
        assert info["rest_url"].startswith("https://127.0.0.1:") and info["ws_url"].startswith("wss://")
        assert info["control_url"].startswith("https://") and os.path.isfile(info["ca_file"])
        assert requests.get(info["rest_url"] + "/fapi/v1/time", timeout=5, verify=info["ca_file"]).ok
        with pytest.raises(requests.exceptions.SSLError):  # not trusted without the test authority
            requests.get(info["rest_url"] + "/fapi/v1/time", timeout=5)
        ws = websocket.create_connection(
            info["ws_url"] + "/market/ws/!markPrice@arr@1s", timeout=3, sslopt={"ca_certs": info["ca_file"]}
        )
        try:
            assert len(json.loads(ws.recv())) == 5
        finally:
            ws.close()
        assert oct(os.stat(tmp_path / "tls" / "key.pem").st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_cli_refuses_non_loopback_host() -> None:
    proc = _cli("--host", "0.0.0.0")
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 2 and out == "" and "loopback" in err


#: Runs what follows as if the ``sim`` extra were not installed (a None entry makes ``import aiohttp`` fail).
WITHOUT_AIOHTTP = "import sys\nsys.modules['aiohttp'] = None\n"


def _without_aiohttp(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_AIOHTTP + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_import_without_aiohttp_names_the_extra() -> None:
    r = _without_aiohttp("import kraite_mp.simulator")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"kraite_mp.simulator.SimulatorUnavailable: {MISSING_AIOHTTP}"
    assert "'simulator'" in MISSING_AIOHTTP and "No module named" not in r.stderr
    caught = _without_aiohttp(
        "try:\n    import kraite_mp.simulator\nexcept ImportError as e:\n    print(e.name)"
    )
    assert caught.stdout.strip() == "aiohttp"  # an ImportError to code that imports the simulator


def test_simulate_command_without_aiohttp_is_one_line() -> None:
    r = _without_aiohttp("from kraite_mp.ops.cli import main\nsys.exit(main(['simulate']))")
    assert r.returncode == 1
    assert r.stdout == "" and r.stderr == f"Error: {MISSING_AIOHTTP}\n"
