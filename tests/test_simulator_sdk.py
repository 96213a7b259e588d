"""The official SDK (``binance-sdk-derivatives-trading-usds-futures``) drives the simulator: its typed
REST response models validate every answer (with no field they do not know), its WebSocket streams
(mark prices for all symbols, user data, on /market, /public and /private with SUBSCRIBE) receive
frames, its WebSocket API starts, pings and stops a listenKey, and its own event models validate every
kind of user-data frame the simulator emits.

Skipped where the SDK is not installed (it is a test dependency only).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket

from kraite_mp.simulator import Simulator

pytest.importorskip("binance_sdk_derivatives_trading_usds_futures")

from binance_common.configuration import (  # noqa: E402
    ConfigurationRestAPI,
    ConfigurationWebSocketAPI,
    ConfigurationWebSocketStreams,
)
from binance_sdk_derivatives_trading_usds_futures.derivatives_trading_usds_futures import (  # noqa: E402
    DerivativesTradingUsdsFutures,
)
from binance_sdk_derivatives_trading_usds_futures.websocket_streams.models import (  # noqa: E402
    UserDataStreamEventsResponse,
)
from pydantic import BaseModel  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: The SDK's model class of each user-data event type.
EVENT_MODELS = {
    "ORDER_TRADE_UPDATE": "OrderTradeUpdate",
    "TRADE_LITE": "TradeLite",
    "ACCOUNT_UPDATE": "AccountUpdate",
    "ALGO_UPDATE": "AlgoUpdate",
    "MARGIN_CALL": "MarginCall",
    "ACCOUNT_CONFIG_UPDATE": "AccountConfigUpdate",
    "STRATEGY_UPDATE": "StrategyUpdate",
    "GRID_UPDATE": "GridUpdate",
    "CONDITIONAL_ORDER_TRIGGER_REJECT": "ConditionalOrderTriggerReject",
    "listenKeyExpired": "ListenKeyExpired",
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(accounts=1, symbols=12, seed=9, mark_price_interval_s=0.3)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def unknown_fields(model: Any, path: str = "") -> list[str]:
    """Fields of a response the SDK's models do not declare, anywhere in it (an event's ``e`` is
    never declared: skipped)."""
    found: list[str] = []
    if isinstance(model, BaseModel):
        extra = getattr(model, "additional_properties", None) or {}
        # some models list a field under its Python name only and keep it as "additional" too
        declared = {f.alias or name for name, f in type(model).model_fields.items()}
        found += [f"{path}.{k}" for k in extra if k != "e" and k not in declared]
        for name in type(model).model_fields:
            if name != "additional_properties":
                found += unknown_fields(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, item in enumerate(model):
            found += unknown_fields(item, f"{path}[{i}]")
    return found


def test_rest_answers_validate_as_the_sdk_models(sim: Simulator) -> None:
    acct = sim.accounts[0]
    key = acct.api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    resting = sim.place_order(
        key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0"
    )
    waiting = sim.place_algo(
        key, symbol="BTCUSDT", side="SELL", type="STOP_MARKET", quantity="0.010", trigger_price="40000"
    )
    filled = sim.place_algo(
        key,
        symbol="BTCUSDT",
        side="SELL",
        type="TRAILING_STOP_MARKET",
        quantity="0.005",
        trigger_price="40000",
    )
    created = sim.trigger_algo(key, filled)
    config = ConfigurationRestAPI(api_key=key, api_secret=acct.api_secret, base_path=sim.rest_url)
    rest = DerivativesTradingUsdsFutures(config_rest_api=config).rest_api
    answers = {
        "start": rest.start_user_data_stream().data(),
        "keepalive": rest.keepalive_user_data_stream().data(),
        "openOrders": rest.current_all_open_orders().data(),
        "order": rest.query_order("BTCUSDT", order_id=resting).data(),
        "allOrders": rest.all_orders("BTCUSDT").data(),
        "openAlgoOrders": rest.current_all_algo_open_orders().data(),
        "algoOrder": rest.query_algo_order(algo_id=filled).data(),
        "allAlgoOrders": rest.query_all_algo_orders("BTCUSDT").data(),
        "positionRisk": rest.position_information_v3().data(),
        "balance": rest.futures_account_balance_v3().data(),
        "account": rest.account_information_v3().data(),
    }
    for name, answer in answers.items():
        assert unknown_fields(answer) == [], name
    assert answers["start"].listen_key == answers["keepalive"].listen_key == sim.truth(key)["listen_key"]
    assert [o.order_id for o in answers["openOrders"]] == [resting]
    assert answers["order"].status == "NEW" and answers["order"].orig_qty == "0.010"
    assert {o.order_id for o in answers["allOrders"]} >= {resting, created}
    assert [a.algo_id for a in answers["openAlgoOrders"]] == [waiting]
    algo = answers["algoOrder"]
    assert (
        algo.algo_status == "FINISHED" and algo.actual_qty == "0.005" and algo.actual_order_id == str(created)
    )
    assert {a.algo_id for a in answers["allAlgoOrders"]} == {waiting, filled}
    [position] = answers["positionRisk"]
    assert position.symbol == "BTCUSDT" and position.position_amt == "0.005"
    assert any(
        b.asset == "USDT" and b.balance == sim.truth(key)["wallet_balance"] for b in answers["balance"]
    )
    account = answers["account"]
    assert account.total_wallet_balance == sim.truth(key)["wallet_balance"]
    assert [(p.symbol, p.position_amt) for p in account.positions] == [("BTCUSDT", "0.005")]
    assert {a.asset for a in account.assets} == {b.asset for b in answers["balance"]}
    rest.close_user_data_stream()
    assert sim.truth(key)["listen_key"] is None


def test_every_user_data_frame_validates_as_the_sdk_event_model(sim: Simulator) -> None:
    key = sim.accounts[0].api_key
    listen_key = requests.post(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": key}, timeout=5)
    ws = websocket.create_connection(
        f"{sim.ws_url}/private/ws?listenKey={listen_key.json()['listenKey']}", timeout=2
    )
    try:
        assert sim.wait_for_connections(key)
        oid = sim.place_order(
            key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="80000"
        )
        sim.amend(key, oid, price="80001", modify_id="m-1")
        sim.fill(key, oid)
        trailing = sim.place_algo(
            key,
            symbol="ETHUSDT",
            side="SELL",
            type="TRAILING_STOP_MARKET",
            quantity="0.1",
            trigger_price="3000",
        )
        sim.start_triggering(key, trailing)
        sim.trigger_algo(key, trailing)
        sim.liquidate(key, "BTCUSDT")
        other = sim.place_order(
            key, symbol="SOLUSDT", side="BUY", type="LIMIT", quantity="1", price="100.000"
        )
        sim.expire_in_match(key, other)
        sim.deposit(key, "5")
        sim.funding_fee(key, "ETHUSDT", "-0.1")
        sim.margin_call(key)
        sim.multi_assets_mode(key)
        sim.account_config_update(key, "BTCUSDT", 5)
        sim.strategy_update(key)
        sim.grid_update(key)
        sim.conditional_order_trigger_reject(key)
        sim.set_listen_key_expired_e(as_string=False)  # the SDK's model wants an int E
        sim.expire_listen_key(key)
        frames = []
        deadline = time.monotonic() + 5
        while not frames or frames[-1]["e"] != "listenKeyExpired":
            assert time.monotonic() < deadline, f"{len(frames)} frames, no listenKeyExpired"
            ws.settimeout(max(0.05, deadline - time.monotonic()))
            frames.append(json.loads(ws.recv()))
    finally:
        ws.close(timeout=0.5)
    assert {f["e"] for f in frames} == set(EVENT_MODELS)
    for frame in frames:
        event = UserDataStreamEventsResponse.from_dict(frame).actual_instance
        assert type(event).__name__ == EVENT_MODELS[frame["e"]], frame
        assert unknown_fields(event) == [], frame


def test_sdk_websocket_streams_and_api_work_against_the_simulator(sim: Simulator) -> None:
    acct = sim.accounts[0]

    async def run() -> dict[str, list[Any]]:
        client = DerivativesTradingUsdsFutures(
            config_ws_api=ConfigurationWebSocketAPI(
                api_key=acct.api_key,
                api_secret=acct.api_secret,
                stream_url=sim.ws_api_url,
                reconnect_attempts=1,
            ),
            config_ws_streams=ConfigurationWebSocketStreams(stream_url=sim.ws_url, reconnect_attempts=1),
        )
        got: dict[str, list[Any]] = {"mark": [], "user": [], "api": []}
        api = await client.websocket_api.create_connection()
        streams = None
        try:
            started = await api.start_user_data_stream()
            got["api"].append(started.data())
            listen_key = started.data().result.listen_key
            got["api"].append((await api.keepalive_user_data_stream()).data())
            streams = await client.websocket_streams.create_connection()
            marks = await streams.mark_price_stream_for_all_market(update_speed="1s")
            marks.on("message", lambda data: got["mark"].append(data))
            user = await streams.user_data(listen_key)
            user.on("message", lambda data: got["user"].append(data))
            deadline = time.monotonic() + 10
            while not got["mark"] or not sim.wait_for_connections(acct.api_key, timeout=0.01):
                assert time.monotonic() < deadline, "the SDK's streams received nothing"
                await asyncio.sleep(0.05)
            sim.place_order(acct.api_key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
            while len(got["user"]) < 4:  # NEW, TRADE_LITE, TRADE, ACCOUNT_UPDATE
                assert time.monotonic() < deadline, f"user data: {got['user']}"
                await asyncio.sleep(0.05)
            got["api"].append((await api.close_user_data_stream()).data())
        finally:
            if streams is not None:
                await streams.close_connection()
            await api.close_connection()
        return got

    got = asyncio.run(run())
    start, ping, stop = got["api"]
    assert start.status == ping.status == stop.status == 200
    assert start.result.listen_key == ping.result.listen_key
    assert sim.truth(acct.api_key)["listen_key"] is None  # stopped
    first = got["mark"][0]
    items = first if isinstance(first, list) else getattr(first, "actual_instance", None) or first.root
    assert len(items) == 12
    names = [type(getattr(u, "actual_instance", u)).__name__ for u in got["user"][:4]]
    assert names == ["OrderTradeUpdate", "TradeLite", "OrderTradeUpdate", "AccountUpdate"]
