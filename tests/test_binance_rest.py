"""The Binance REST client against the local simulator: signing, clock offset, limits, errors, listenKeys."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kraite_mp.binance.errors import (
    InvalidCredentials,
    ListenKeyNotFound,
    OrderNotFound,
    RateLimited,
    TransientError,
    parse_retry_after,
)
from kraite_mp.binance.hosts import reset_host_state
from kraite_mp.binance.rest import BinanceRest, sign


@pytest.fixture(autouse=True)
def _fresh_host_state() -> Iterator[None]:
    """Ban/weight state is per base URL and process-wide: never let one test's ban leak into another."""
    reset_host_state()
    yield
    reset_host_state()


def client(sim: Any, index: int = 0, **kw: Any) -> BinanceRest:
    acct = sim.accounts[index]
    return BinanceRest(sim.rest_url, acct.api_key, acct.api_secret, **kw)


def fapi_requests(sim: Any) -> int:
    return sum(n for path, n in sim.stats()["requests"].items() if path.startswith("/fapi/"))


@pytest.mark.unit
def test_signature_matches_binance_documentation_example() -> None:
    # The worked example of Binance's "SIGNED endpoint security" documentation.
    secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
    query = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559"
    assert sign(secret, query) == "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


@pytest.mark.unit
def test_retry_after_parsing() -> None:
    assert parse_retry_after("7", 60) == 7.0
    assert parse_retry_after(None, 60) == 60
    assert parse_retry_after("soon", 120) == 120
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 5) == 0  # a date in the past: now


@pytest.mark.integration
def test_signed_queries_work_and_a_wrong_secret_is_a_clear_credentials_error(simulator: Any) -> None:
    sim = simulator
    key = sim.accounts[0].api_key
    order_id = sim.place_order(
        key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000.0"
    )
    algo_id = sim.place_algo(
        key, symbol="ETHUSDT", side="SELL", type="STOP_MARKET", quantity="0.5", trigger_price="1000.00"
    )
    with client(sim) as rest:
        assert [o["orderId"] for o in rest.open_orders()] == [order_id]
        assert [o["orderId"] for o in rest.open_orders("BTCUSDT")] == [order_id]
        assert rest.open_orders("ETHUSDT") == []
        assert rest.order("BTCUSDT", order_id=order_id)["status"] == "NEW"
        assert [a["algoId"] for a in rest.open_algo_orders("ETHUSDT")] == [algo_id]
        assert rest.algo_order(algo_id=algo_id)["algoStatus"] == "NEW"
        assert [o["orderId"] for o in rest.all_orders("BTCUSDT", start_time_ms=0)] == [order_id]
        with pytest.raises(OrderNotFound) as nf:
            rest.order("BTCUSDT", order_id=123)
        assert nf.value.code == -2013

    wrong_secret = "W" * 64
    with BinanceRest(sim.rest_url, key, wrong_secret) as bad, pytest.raises(InvalidCredentials) as exc:
        bad.open_orders("BTCUSDT")
    text = str(exc.value)
    assert exc.value.code == -1022
    assert "API secret does not match" in text
    assert wrong_secret not in text and "signature=" not in text and sim.accounts[0].api_secret not in text


@pytest.mark.integration
def test_invalid_api_key_is_invalid_credentials_without_secrets(simulator: Any) -> None:
    sim = simulator
    acct = sim.accounts[1]
    sim.invalidate_api_key(acct.api_key)
    with client(sim, 1) as rest:
        with pytest.raises(InvalidCredentials) as exc:
            rest.open_orders("BTCUSDT")
        assert exc.value.http_status == 401 and exc.value.code == -2015
        assert "credentials rejected" in str(exc.value)
        assert acct.api_secret not in str(exc.value) and acct.api_key not in str(exc.value)
        with pytest.raises(InvalidCredentials):
            rest.create_listen_key()


@pytest.mark.integration
@pytest.mark.parametrize("offset_ms", [30_000, -30_000])
def test_timestamp_outside_recv_window_resyncs_the_clock_and_retries_once(
    simulator: Any, offset_ms: int
) -> None:
    sim = simulator
    sim.set_clock_offset(offset_ms)
    with client(sim) as rest:
        assert rest.open_orders("BTCUSDT") == []
        assert abs(rest.time_offset_ms - offset_ms) < 5_000
        before = dict(sim.stats()["requests"])
        assert rest.open_orders("BTCUSDT") == []  # the offset is kept: no second -1021
        after = sim.stats()["requests"]
    assert after["/fapi/v1/openOrders"] - before["/fapi/v1/openOrders"] == 1
    assert after.get("/fapi/v1/time", 0) == before.get("/fapi/v1/time", 0) == 1
    # first call: -1021, /time, retry -> 2 openOrders; second call: 1
    assert after["/fapi/v1/openOrders"] == 3


@pytest.mark.integration
def test_429_blocks_every_client_of_the_host_until_retry_after(simulator: Any) -> None:
    sim = simulator
    sim.rate_limit(status=429, count=1, retry_after_s=2)
    a, b = client(sim, 0), client(sim, 1)
    with pytest.raises(RateLimited) as exc:
        a.open_orders("BTCUSDT")
    assert exc.value.http_status == 429 and not exc.value.banned and exc.value.retry_after_s >= 1
    sent = fapi_requests(sim)
    for _ in range(20):  # a would-be storm: none of it reaches the exchange
        for c in (a, b):
            with pytest.raises(RateLimited):
                c.open_orders("BTCUSDT")
    assert fapi_requests(sim) == sent == 1
    deadline = time.monotonic() + 30
    while a.blocked_for_s() > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.open_orders("BTCUSDT") == []  # after Retry-After calls go out again
    assert fapi_requests(sim) == 2
    a.close()
    b.close()


@pytest.mark.integration
def test_real_weight_limit_429_is_honoured_so_no_418_ban_is_earned() -> None:
    from kraite_mp.simulator import Simulator

    with Simulator(accounts=1, symbols=10, seed=3, weight_limit_1m=100) as sim:
        # a client that believes in 2400/min hits the simulator's real 100/min limit
        with client(sim, slowdown_ratio=1.0) as rest:
            rest.open_orders()  # 40
            rest.open_orders()  # 80
            with pytest.raises(RateLimited) as exc:
                rest.open_orders()  # 120 > 100
            assert exc.value.http_status == 429 and exc.value.retry_after_s > 1
            for _ in range(10):
                with pytest.raises(RateLimited) as again:
                    rest.open_orders("BTCUSDT")
                assert again.value.http_status == 429  # refused locally, never a 418
            assert sim.stats()["requests"]["/fapi/v1/openOrders"] == 3


@pytest.mark.integration
def test_418_ban_refuses_calls_for_its_whole_length_across_clients(simulator: Any) -> None:
    sim = simulator
    sim.rate_limit(status=418, count=1, retry_after_s=600)
    with pytest.raises(RateLimited) as exc:
        client(sim, 0).open_orders("BTCUSDT")
    assert exc.value.banned and exc.value.retry_after_s >= 599
    later = client(sim, 2)  # a new client (another account) in the same process: same IP, same ban
    assert later.blocked_for_s() > 590
    for call in (later.open_orders, later.create_listen_key, lambda: later.algo_order(algo_id=1)):
        with pytest.raises(RateLimited) as refused:
            call()
        assert refused.value.banned and "banned" in str(refused.value)
    assert fapi_requests(sim) == 1


@pytest.mark.integration
def test_used_weight_is_read_from_every_reply(simulator: Any) -> None:
    sim = simulator
    with client(sim) as rest:
        rest.open_orders("BTCUSDT")
        first = rest.used_weight_1m
        rest.open_orders()
        assert rest.used_weight_1m - first == 40
        rest.open_algo_orders("BTCUSDT")
        assert rest.used_weight_1m - first == 41
        assert rest.weight_spent == 42 and rest.requests_sent == 3


@pytest.mark.integration
def test_positions_and_balances_cost_their_weight_from_the_budget_and_say_when_they_were_asked(
    simulator: Any,
) -> None:
    sim = simulator
    key = sim.accounts[0].api_key
    sim.place_order(key, symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    with client(sim) as rest:
        left = rest.budget.remaining()
        before_ms = int(time.time() * 1000)
        positions = rest.position_risk()
        assert before_ms <= rest.sent_at_ms <= int(time.time() * 1000)
        assert [(p["symbol"], p["positionAmt"]) for p in positions] == [("BTCUSDT", "0.010")]
        assert rest.position_risk("ETHUSDT")[0]["symbol"] == "ETHUSDT"
        balances = rest.balances()
        assert {b["asset"] for b in balances} >= {"USDT"}
        assert rest.weight_spent == 15 and rest.requests_sent == 3
        assert left is not None and rest.budget.remaining() == left - 15  # taken from the egress budget
        assert rest.used_weight_1m >= 15  # what the exchange counted


@pytest.mark.integration
def test_near_the_weight_limit_the_client_waits_for_the_window(simulator: Any) -> None:
    sim = simulator
    with client(sim, weight_limit_per_min=100, slowdown_ratio=0.5) as rest:
        rest.open_orders()  # 40: under 50
        assert rest.slowdown_slept_s == 0
        rest.open_orders()  # 80: the next call must wait first
        rest.stop.set()  # ... but a stopping process does not sit out the minute
        rest.open_orders("BTCUSDT")
        assert 0 < rest.slowdown_slept_s <= 61.5


@pytest.mark.integration
def test_listen_key_create_keepalive_expiry_and_close(simulator: Any) -> None:
    sim = simulator
    acct = sim.accounts[0]
    with client(sim) as rest:
        key = rest.create_listen_key()
        assert key and rest.create_listen_key() == key  # an active key comes back, extended
        assert rest.keepalive_listen_key() == key
        sim.expire_listen_key(acct.api_key)
        with pytest.raises(ListenKeyNotFound) as exc:
            rest.keepalive_listen_key()
        assert exc.value.code == -1125 and key not in str(exc.value)
        new_key = rest.create_listen_key()
        assert new_key != key
        rest.close_listen_key()
        with pytest.raises(ListenKeyNotFound):
            rest.keepalive_listen_key()
    # listenKeys are registered secrets: they never make it into a log line
    from kraite_mp.logs import redact

    assert new_key not in redact(f"connected with {new_key}")


@pytest.mark.integration
def test_network_errors_are_transient_and_carry_no_signature() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest = BinanceRest(f"http://127.0.0.1:{port}", "k" * 64, "s" * 64, timeout_s=2)
    with pytest.raises(TransientError) as exc:
        rest.open_orders("BTCUSDT")
    text = str(exc.value)
    assert "signature" not in text and "s" * 64 not in text and "timestamp=" not in text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
