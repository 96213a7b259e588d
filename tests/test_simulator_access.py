"""Every documented access style of the simulator over real loopback sockets (docs/PROTOCOL.md):
several listenKeys on ``/private/stream`` with wrapped frames, JSON SUBSCRIBE / UNSUBSCRIBE /
LIST_SUBSCRIPTIONS on ``/private``, ``/market`` and ``/public``, one symbol's mark price, the
``/public`` routes (and the retired unrouted forms, which serve only those), TradFi symbols in a second
array per tick, and the WebSocket API (``/ws-fapi/v1``, ``userDataStream.start/ping/stop``).

Plain ``requests`` and ``websocket-client``, as in test_simulator.py; where kraite-mp's own parsers
read what a style delivers, they are run on it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket
from support import wait_closed

from kraite_mp.binance import user
from kraite_mp.binance.market import parse_mark_price_frame
from kraite_mp.simulator import SimAccount, Simulator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(
        accounts=2, symbols=20, seed=5, mark_price_interval_s=0.2, tradfi_symbols=["XAUUSDT"]
    )
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def sockets() -> Iterator[list[websocket.WebSocket]]:
    opened: list[websocket.WebSocket] = []
    yield opened
    for ws in opened:
        try:
            ws.close(timeout=0.5)
        except Exception:  # noqa: BLE001 - best effort teardown
            pass


def connect(sockets: list[websocket.WebSocket], url: str) -> websocket.WebSocket:
    ws = websocket.create_connection(url, timeout=2)
    sockets.append(ws)
    return ws


def listen_key(sim: Simulator, account: SimAccount) -> str:
    r = requests.post(
        f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": account.api_key}, timeout=5
    )
    assert r.status_code == 200, r.text
    return str(r.json()["listenKey"])


def recv(ws: websocket.WebSocket, timeout: float = 2.0) -> Any:
    ws.settimeout(timeout)
    return json.loads(ws.recv())


def request(ws: websocket.WebSocket, method: str, params: Any = None, rid: int = 1) -> Any:
    """Send one JSON request and return its reply (skipping data frames that arrive meanwhile)."""
    body: dict[str, Any] = {"method": method, "id": rid}
    if params is not None:
        body["params"] = params
    ws.send(json.dumps(body))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        reply = recv(ws, max(0.05, deadline - time.monotonic()))
        if isinstance(reply, dict) and reply.get("id") == rid and ("result" in reply or "error" in reply):
            return reply
    pytest.fail(f"no reply to {method}")


def assert_quiet(ws: websocket.WebSocket, seconds: float) -> None:
    ws.settimeout(seconds)
    with pytest.raises(websocket.WebSocketTimeoutException):
        frame = ws.recv()
        pytest.fail(f"unexpected frame {frame[:200]!r}")


def data_frames(ws: websocket.WebSocket, n: int, timeout: float = 3.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    out: list[Any] = []
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(out)} of {n}: {out}"
        out.append(recv(ws, left))
    return out


# ---------------------------------------------------------------------- /private
def test_private_stream_carries_several_keys_wrapped_each_with_its_own_events(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    a, b = sim.accounts
    key_a, key_b = listen_key(sim, a), listen_key(sim, b)
    ws = connect(
        sockets,
        f"{sim.ws_url}/private/stream?listenKey={key_a}&events=ORDER_TRADE_UPDATE/listenKeyExpired"
        f"&listenKey={key_b}&events=ACCOUNT_UPDATE",
    )
    assert sim.wait_for_connections(a.api_key) and sim.wait_for_connections(b.api_key)
    sim.place_order(a.api_key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    sim.place_order(b.api_key, symbol="ETHUSDT", side="BUY", type="MARKET", quantity="1.000")
    got = data_frames(ws, 3)  # a: NEW and TRADE (no TRADE_LITE, no ACCOUNT_UPDATE); b: ACCOUNT_UPDATE
    assert [(f["stream"], f["data"]["e"]) for f in got] == [
        (key_a, "ORDER_TRADE_UPDATE"),
        (key_a, "ORDER_TRADE_UPDATE"),
        (key_b, "ACCOUNT_UPDATE"),
    ]
    # the product parses the wrapped frame as the event it carries, without the listenKey
    event = user.parse_frame(1, json.dumps(got[2]))
    assert event.event_type == "ACCOUNT_UPDATE" and event.account is not None
    assert key_b not in (event.payload_text or "")
    # DELETE of one key: its listenKeyExpired, then only that key is gone; the connection stays
    requests.delete(f"{sim.rest_url}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": a.api_key}, timeout=5)
    expired = recv(ws)
    assert expired["stream"] == key_a and expired["data"]["e"] == "listenKeyExpired"
    sim.place_order(a.api_key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    sim.deposit(b.api_key, "10")
    (after,) = data_frames(ws, 1)
    assert after["stream"] == key_b and after["data"]["a"]["m"] == "DEPOSIT"
    assert_quiet(ws, 0.3)


def test_unknown_key_on_private_stream_is_refused(sim: Simulator) -> None:
    key = listen_key(sim, sim.accounts[0])
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(f"{sim.ws_url}/private/stream?listenKey={key}&listenKey=nope", timeout=2)
    assert exc.value.status_code == 400


def test_subscribe_unsubscribe_and_list_on_private_routes(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    acct = sim.accounts[0]
    key = listen_key(sim, acct)
    sdk_style = connect(sockets, f"{sim.ws_url}/private/stream")  # the official SDK's way
    raw_style = connect(sockets, f"{sim.ws_url}/private/ws")
    assert request(sdk_style, "SUBSCRIBE", [key], 1) == {"result": None, "id": 1}
    assert request(raw_style, "SUBSCRIBE", [key, "not-a-key"], 2) == {"result": None, "id": 2}
    assert request(sdk_style, "LIST_SUBSCRIPTIONS", rid=3) == {"result": [key], "id": 3}
    assert sim.wait_for_connections(acct.api_key, 2)
    oid = sim.place_order(acct.api_key)
    wrapped, raw = recv(sdk_style), recv(raw_style)
    assert wrapped == {"stream": key, "data": raw} and raw["o"]["i"] == oid
    assert request(sdk_style, "UNSUBSCRIBE", [key], 4) == {"result": None, "id": 4}
    sim.place_order(acct.api_key)
    assert recv(raw_style)["e"] == "ORDER_TRADE_UPDATE"
    assert_quiet(sdk_style, 0.3)
    bad = request(raw_style, "SUBSCRIBE", "not-a-list", 5)
    assert bad["error"]["code"] == 2
    # the path form is dead: the handshake works and nothing ever arrives
    dead = connect(sockets, f"{sim.ws_url}/private/ws/{key}")
    sim.place_order(acct.api_key)
    assert_quiet(dead, 0.3)


def test_at_most_200_streams_per_connection(sim: Simulator, sockets: list[websocket.WebSocket]) -> None:
    ws = connect(sockets, f"{sim.ws_url}/market/ws")
    names = [f"tok{i}usdt@markPrice@1s" for i in range(200)]
    assert request(ws, "SUBSCRIBE", names, 1) == {"result": None, "id": 1}
    refused = request(ws, "SUBSCRIBE", ["btcusdt@markPrice@1s"], 2)
    assert refused["error"]["code"] == 2 and "200" in refused["error"]["msg"]
    assert len(request(ws, "LIST_SUBSCRIPTIONS", rid=3)["result"]) == 200


# ---------------------------------------------------------------------- /market, /public, retired
def test_market_route_single_symbol_mark_price_and_subscribe(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    single = connect(sockets, f"{sim.ws_url}/market/ws/btcusdt@markPrice@1s")
    item = recv(single)
    assert isinstance(item, dict) and item["e"] == "markPriceUpdate" and item["s"] == "BTCUSDT"
    combined = connect(sockets, f"{sim.ws_url}/market/stream?streams=ethusdt@markPrice@1s/btcusdt@bookTicker")
    frame = recv(combined)
    assert frame["stream"] == "ethusdt@markPrice@1s" and frame["data"]["s"] == "ETHUSDT"
    # the public stream on the market route was acked by the URL and is silent: only ETH arrives
    for frame in data_frames(combined, 3):
        assert frame["stream"] == "ethusdt@markPrice@1s"
    later = connect(sockets, f"{sim.ws_url}/market/ws")
    assert_quiet(later, 0.3)
    assert request(later, "SUBSCRIBE", ["!markPrice@arr@1s", "solusdt@markPrice"], 7) == {
        "result": None,
        "id": 7,
    }
    assert request(later, "LIST_SUBSCRIPTIONS", rid=8) == {
        "result": ["!markPrice@arr@1s", "solusdt@markPrice"],
        "id": 8,
    }
    kinds = set()
    # each tick sends two arrays (crypto, TradFi) and every third tick SOL after them: 7 frames at worst
    for frame in data_frames(later, 9):
        kinds.add("array" if isinstance(frame, list) else frame["s"])
    assert kinds == {"array", "SOLUSDT"}
    assert request(later, "UNSUBSCRIBE", ["!markPrice@arr@1s"], 9)["result"] is None
    # solusdt@markPrice (no @1s): every third tick only
    first, second = data_frames(later, 2)
    assert first["s"] == second["s"] == "SOLUSDT" and second["E"] > first["E"]


def test_tradfi_symbols_arrive_as_a_second_array_each_tick(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    ws = connect(sockets, f"{sim.ws_url}/market/ws/!markPrice@arr@1s")
    arrays = data_frames(ws, 4)
    sizes = [len(a) for a in arrays]
    assert 1 in sizes and 20 in sizes  # the 20 crypto symbols, then XAUUSDT on its own
    tradfi = next(a for a in arrays if len(a) == 1)
    assert tradfi[0]["s"] == "XAUUSDT" and tradfi[0]["st"] == 1
    # kraite-mp's parser takes each message as it comes
    parsed = [parse_mark_price_frame(json.dumps(a)) for a in arrays]
    assert {s for p in parsed for s in p.prices} >= {"XAUUSDT", "BTCUSDT"}
    assert ("XAUUSDT", 1) in sim.mark_symbols


def test_public_routes_and_the_retired_forms_serve_public_streams_only(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    book = connect(sockets, f"{sim.ws_url}/public/ws/btcusdt@bookTicker")
    ticker = recv(book)
    assert (
        ticker["e"] == "bookTicker" and ticker["s"] == "BTCUSDT" and float(ticker["b"]) < float(ticker["a"])
    )
    depth = connect(sockets, f"{sim.ws_url}/public/stream?streams=ethusdt@depth5@100ms/ethusdt@markPrice@1s")
    frame = recv(depth)
    assert frame["stream"] == "ethusdt@depth5@100ms" and frame["data"]["e"] == "depthUpdate"
    assert len(frame["data"]["b"]) == 5 and len(frame["data"]["a"]) == 5
    assert frame["data"]["pu"] < frame["data"]["U"] <= frame["data"]["u"]
    for frame in data_frames(depth, 3):  # the market stream on /public stays silent
        assert frame["stream"] == "ethusdt@depth5@100ms"
    legacy = connect(sockets, f"{sim.ws_url}/ws/solusdt@bookTicker")
    assert recv(legacy)["s"] == "SOLUSDT"
    legacy_market = connect(sockets, f"{sim.ws_url}/ws/solusdt@markPrice@1s")
    assert request(legacy_market, "SUBSCRIBE", ["!markPrice@arr@1s"], 3) == {"result": None, "id": 3}
    assert_quiet(legacy_market, 0.5)
    assert sim.wait_for_connections("public", 2) and sim.wait_for_connections("retired", 2)


# ---------------------------------------------------------------------- /ws-fapi/v1
def test_ws_api_starts_pings_and_stops_listen_keys(
    sim: Simulator, sockets: list[websocket.WebSocket]
) -> None:
    acct = sim.accounts[0]
    api = connect(sockets, sim.ws_api_url)

    def call(method: str, rid: str, **params: Any) -> dict[str, Any]:
        api.send(json.dumps({"id": rid, "method": method, "params": params}))
        reply: dict[str, Any] = recv(api)
        assert reply["id"] == rid and reply["rateLimits"][0]["rateLimitType"] == "REQUEST_WEIGHT"
        return reply

    started = call("userDataStream.start", "a1", apiKey=acct.api_key)
    assert started["status"] == 200 and len(started["result"]["listenKey"]) == 64
    key = started["result"]["listenKey"]
    assert call("userDataStream.start", "a2", apiKey=acct.api_key)["result"] == {"listenKey": key}
    pinged = call("userDataStream.ping", "a3", apiKey=acct.api_key)
    assert pinged["result"] == {"listenKey": key}
    assert pinged["rateLimits"][0]["count"] > started["rateLimits"][0]["count"]  # REST's weight pool
    stream = connect(sockets, f"{sim.ws_url}/private/ws?listenKey={key}")
    assert sim.wait_for_connections(acct.api_key)
    stopped = call("userDataStream.stop", "a4", apiKey=acct.api_key)
    assert stopped["status"] == 200 and stopped["result"] == {} and "error" not in stopped
    assert recv(stream)["e"] == "listenKeyExpired"  # like DELETE: pushed, then closed
    wait_closed(stream, 3)
    gone = call("userDataStream.ping", "a5", apiKey=acct.api_key)
    assert gone["status"] == 400 and gone["error"] == {"code": -1125, "msg": "This listenKey does not exist."}
    assert call("userDataStream.start", "a6", apiKey="x" * 64)["error"]["code"] == -2015
    assert call("userDataStream.start", "a7")["error"]["code"] == -1102
    assert call("session.logon", "a8", apiKey=acct.api_key)["error"]["code"] == -1100
    sim.rate_limit(status=429, count=1, retry_after_s=1)
    limited = call("userDataStream.ping", "a9", apiKey=acct.api_key)
    assert limited["status"] == 429 and limited["error"]["code"] == -1003


def test_a_route_that_does_not_exist_answers_404_at_the_handshake(sim: Simulator) -> None:
    """What a wrong ``ws_url`` meets (a client must report it as configuration, not blame its key)."""
    key = listen_key(sim, sim.accounts[0])
    for path in (f"/private/wss?listenKey={key}", f"/fstream/private/ws?listenKey={key}", "/market/nope/x"):
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            websocket.create_connection(f"{sim.ws_url}{path}", timeout=2)
        assert exc.value.status_code == 404, path
    assert sim.truth(sim.accounts[0].api_key)["listen_key"] == key  # the key is fine
