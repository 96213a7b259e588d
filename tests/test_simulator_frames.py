"""Every kind of user-data frame the exchange sends, from the simulator over a real socket, and what
kraite-mp's edge makes of it: each one parses (``binance.user.parse_frame``) into a known event with no
error, and ``store.dispatch.decide`` dispatches, applies or audits it, never fails it.

Frames: AMENDMENT with ``o.M``, TRAILING_STOP_MARKET's ``AP``/``cr``, ALGO ``ia``, an algo stuck in
TRIGGERING, EXPIRED_IN_MATCH, a liquidation (x=CALCULATED), hedge-mode and isolated positions,
DEPOSIT and FUNDING_FEE account updates (``a.S``), MARGIN_CALL, STRATEGY_UPDATE, GRID_UPDATE,
CONDITIONAL_ORDER_TRIGGER_REJECT, ACCOUNT_CONFIG_UPDATE with ``ai``, listenKeyExpired with ``E`` as a
string and as an int.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
import websocket

from kraite_mp.binance import user
from kraite_mp.binance.user import KNOWN_DISPATCH_KEYS
from kraite_mp.config import DEFAULT_DISPATCHED_EXECUTIONS
from kraite_mp.simulator import Simulator, SimulatorError
from kraite_mp.store.dispatch import AuditOutcome, decide

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

#: Everything, listenKeyExpired included (the simulator applies ``events`` as an allow-list).
EVENTS = "/".join(user.USER_DATA_EVENTS)
#: What the job may decide for a frame it understood.
GOOD_OUTCOMES = {AuditOutcome.DISPATCHED, AuditOutcome.APPLIED, AuditOutcome.AUDITED}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(accounts=2, symbols=20, seed=11, mark_price_interval_s=0.5)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def stream(sim: Simulator) -> Iterator[websocket.WebSocket]:
    """Account 0's user-data connection, every event subscribed."""
    api_key = sim.accounts[0].api_key
    key = requests.post(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": api_key}, timeout=5)
    ws = websocket.create_connection(
        f"{sim.ws_url}/private/ws?listenKey={key.json()['listenKey']}&events={EVENTS}", timeout=2
    )
    try:
        assert sim.wait_for_connections(api_key, 1, timeout=3)
        yield ws
    finally:
        ws.close(timeout=0.5)


def frames(ws: websocket.WebSocket, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any]] = []
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(out)} of {n} frames: {out}"
        ws.settimeout(left)
        out.append(json.loads(ws.recv()))
    return out


def understood(frame: dict[str, Any]) -> user.UserEvent:
    """The frame parses into a known event with no error, and the job has a good outcome for it."""
    event = user.parse_frame(1, json.dumps(frame))
    assert event.kind is user.FrameKind.EVENT and event.known, frame
    assert event.error is None, (event.error, frame)
    # every dispatch key allowed: an order frame must then parse into an order the store can apply
    outcome = decide(event, KNOWN_DISPATCH_KEYS)
    assert outcome.outcome in GOOD_OUTCOMES and outcome.error is None, (outcome, frame)
    assert decide(event, DEFAULT_DISPATCHED_EXECUTIONS).outcome in GOOD_OUTCOMES | {AuditOutcome.SKIPPED}
    return event


def signed_get(sim: Simulator, path: str, params: dict[str, Any] | None = None) -> Any:
    acct = sim.accounts[0]
    query = urlencode({**(params or {}), "timestamp": int(time.time() * 1000)})
    sig = hmac.new(acct.api_secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    r = requests.get(
        f"{sim.rest_url}{path}?{query}&signature={sig}", headers={"X-MBX-APIKEY": acct.api_key}, timeout=5
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_amendment_with_a_modify_id_and_expired_in_match(sim: Simulator, stream: websocket.WebSocket) -> None:
    key = sim.accounts[0].api_key
    oid = sim.place_order(key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="80000.0")
    sim.amend(key, oid, price="80001.0", modify_id="mod-7")
    sim.amend(key, oid, price="80002.0")  # an amendment without one: no M at all
    sim.expire_in_match(key, oid)
    new, with_m, without_m, expired = frames(stream, 4)
    assert with_m["o"]["x"] == "AMENDMENT" and with_m["o"]["M"] == "mod-7"
    assert "M" not in without_m["o"] and "M" not in new["o"]
    assert expired["o"]["x"] == "EXPIRED" and expired["o"]["X"] == "EXPIRED_IN_MATCH"
    for frame in (new, with_m, without_m, expired):
        understood(frame)
    ended = understood(expired)
    assert ended.order is not None and ended.order.status == "EXPIRED_IN_MATCH"
    assert (
        signed_get(sim, "/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": oid})["status"]
        == "EXPIRED_IN_MATCH"
    )


def test_trailing_stop_fields_algo_ia_and_an_algo_stuck_in_triggering(
    sim: Simulator, stream: websocket.WebSocket
) -> None:
    key = sim.accounts[0].api_key
    algo = sim.place_algo(
        key,
        symbol="ETHUSDT",
        side="SELL",
        type="TRAILING_STOP_MARKET",
        quantity="0.100",
        trigger_price="3000.00",
        activation_price="3100.00",
        callback_rate="2.5",
    )
    (placed,) = frames(stream, 1)
    assert placed["e"] == "ALGO_UPDATE" and placed["o"]["ia"] is False
    sim.start_triggering(key, algo)
    (triggering,) = frames(stream, 1)
    assert triggering["o"]["X"] == "TRIGGERING"
    assert [a["algoId"] for a in signed_get(sim, "/fapi/v1/openAlgoOrders")] == [algo]  # still open
    with pytest.raises(SimulatorError, match="-2011"):
        sim.cancel_algo(key, algo)
    order_id = sim.trigger_algo(key, algo)  # it goes on from TRIGGERING: no second TRIGGERING frame
    rest = frames(stream, 6)
    assert [(f["e"], f["o"].get("X")) for f in rest if f["e"] != "TRADE_LITE" and "o" in f] == [
        ("ORDER_TRADE_UPDATE", "NEW"),
        ("ALGO_UPDATE", "TRIGGERED"),
        ("ORDER_TRADE_UPDATE", "FILLED"),
        ("ALGO_UPDATE", "FINISHED"),
    ]
    created = rest[0]["o"]
    assert created["ot"] == "TRAILING_STOP_MARKET" and created["AP"] == "3100.00" and created["cr"] == "2.5"
    for frame in [placed, triggering, *rest]:
        understood(frame)
    order = signed_get(sim, "/fapi/v1/order", {"symbol": "ETHUSDT", "orderId": order_id})
    assert order["activatePrice"] == "3100.00" and order["priceRate"] == "2.5"
    # a stuck one can also be rejected by the matching engine
    other = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.1", trigger_price="1"
    )
    sim.start_triggering(key, other)
    sim.reject_algo(key, other)
    statuses = [f["o"]["X"] for f in frames(stream, 3)]
    assert statuses == ["NEW", "TRIGGERING", "REJECTED"]


def test_hedge_mode_and_isolated_positions_in_frames_and_position_risk(
    sim: Simulator, stream: websocket.WebSocket
) -> None:
    key = sim.accounts[0].api_key
    with pytest.raises(SimulatorError, match="-4061"):
        sim.place_order(
            key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010", position_side="LONG"
        )
    sim.set_position_mode(key, dual_side=True)
    sim.set_margin_type(key, "ETHUSDT", "ISOLATED")
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010", position_side="LONG")
    sim.place_order(
        key, symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.004", position_side="SHORT"
    )
    sim.place_order(key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="1.000", position_side="LONG")
    updates = [f for f in frames(stream, 12) if f["e"] == "ACCOUNT_UPDATE"]
    sides = [
        (u["a"]["P"][0]["s"], u["a"]["P"][0]["ps"], u["a"]["P"][0]["pa"], u["a"]["P"][0]["mt"])
        for u in updates
    ]
    assert sides == [
        ("BTCUSDT", "LONG", "0.010", "cross"),
        ("BTCUSDT", "SHORT", "-0.004", "cross"),
        ("ETHUSDT", "LONG", "1.000", "isolated"),
    ]
    eth = updates[-1]["a"]
    assert Decimal(eth["P"][0]["iw"]) > 0 and Decimal(eth["B"][0]["cw"]) < Decimal(eth["B"][0]["wb"])
    for update in updates:
        parsed = understood(update).account
        assert parsed is not None and parsed.positions[0].position_side in ("LONG", "SHORT")
    with pytest.raises(SimulatorError, match="-4068"):
        sim.set_position_mode(key, dual_side=False)
    risk = {(r["symbol"], r["positionSide"]): r for r in signed_get(sim, "/fapi/v3/positionRisk")}
    assert set(risk) == {("BTCUSDT", "LONG"), ("BTCUSDT", "SHORT"), ("ETHUSDT", "LONG"), ("ETHUSDT", "SHORT")}
    assert (
        risk[("BTCUSDT", "SHORT")]["positionAmt"] == "-0.004"
        and Decimal(risk[("ETHUSDT", "SHORT")]["positionAmt"]) == 0
    )
    assert risk[("ETHUSDT", "LONG")]["isolatedWallet"] == eth["P"][0]["iw"]
    parsed_risk = user.positions_from_rest(list(risk.values()), 1)
    assert {p.margin_type for p, _ in parsed_risk if p.amount} == {"cross", "isolated"}


def test_liquidation_wallet_and_account_events(sim: Simulator, stream: websocket.WebSocket) -> None:
    key = sim.accounts[0].api_key
    sim.place_order(key, symbol="SOLUSDT", side="BUY", type="MARKET", quantity="3")
    frames(stream, 4)
    oid = sim.liquidate(key, "SOLUSDT")
    liquidation, after = frames(stream, 2)  # no TRADE_LITE for a liquidation
    assert liquidation["e"] == "ORDER_TRADE_UPDATE" and liquidation["o"]["x"] == "CALCULATED"
    assert liquidation["o"]["X"] == "FILLED" and liquidation["o"]["o"] == "LIQUIDATION"
    assert liquidation["o"]["c"].startswith("autoclose-") and liquidation["o"]["i"] == oid
    assert after["e"] == "ACCOUNT_UPDATE" and Decimal(after["a"]["P"][0]["pa"]) == 0
    assert sim.truth(key)["positions"] == []
    sim.deposit(key, "250")
    sim.funding_fee(key, "SOLUSDT", "-0.01000000")
    sim.margin_call(key)
    sim.multi_assets_mode(key, enabled=True)
    sim.account_config_update(key, "SOLUSDT", 10)
    sim.strategy_update(key, strategy_id=42, status="WORKING", symbol="BTCUSDT")
    sim.grid_update(key, strategy_id=42, symbol="BTCUSDT")
    sim.conditional_order_trigger_reject(key, "BTCUSDT", 12345, "Reduce only reject")
    got = frames(stream, 8)
    deposit, funding, margin, multi, leverage, strategy, grid, reject = got
    assert deposit["a"]["m"] == "DEPOSIT" and deposit["a"]["B"][0]["bc"] == "250.00000000"
    assert funding["a"]["m"] == "FUNDING_FEE" and funding["a"]["S"] == "SOLUSDT" and funding["a"]["P"] == []
    assert margin["e"] == "MARGIN_CALL" and margin["p"] == [] and "cw" in margin
    assert multi["e"] == "ACCOUNT_CONFIG_UPDATE" and multi["ai"] == {"j": True} and "ac" not in multi
    assert leverage["ac"] == {"s": "SOLUSDT", "l": 10}
    assert strategy["su"]["si"] == 42 and strategy["su"]["ss"] == "WORKING"
    assert grid["gu"]["si"] == 42 and reject["or"] == {"s": "BTCUSDT", "i": 12345, "r": "Reduce only reject"}
    applied = understood(funding).account
    assert applied is not None and applied.balances[0].balance_change == Decimal("-0.01000000")
    for frame in [liquidation, after, *got]:
        understood(frame)
    wallet = sim.truth(key)["wallet_balance"]
    usdt = [b for b in signed_get(sim, "/fapi/v3/balance") if b["asset"] == "USDT"][0]
    assert usdt["balance"] == wallet == funding["a"]["B"][0]["wb"]


def test_listen_key_expired_with_e_as_a_string_and_as_an_int(
    sim: Simulator, stream: websocket.WebSocket
) -> None:
    key = sim.accounts[0].api_key
    sim.expire_listen_key(key)
    (as_string,) = frames(stream, 1)
    assert isinstance(as_string["E"], str)
    event = understood(as_string)
    assert event.event_time_ms == int(as_string["E"]) and "***" in (event.payload_text or "")
    sim.set_listen_key_expired_e(as_string=False)
    second = requests.post(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": key}, timeout=5)
    ws = websocket.create_connection(
        f"{sim.ws_url}/private/ws?listenKey={second.json()['listenKey']}&events={EVENTS}", timeout=2
    )
    try:
        assert sim.wait_for_connections(key, 2)  # the server has it (the first, muted, is still open)
        sim.expire_listen_key(key)
        (as_int,) = frames(ws, 1)
    finally:
        ws.close(timeout=0.5)
    assert isinstance(as_int["E"], int) and understood(as_int).event_time_ms == as_int["E"]
