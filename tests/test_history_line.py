"""The egress's line of background history sweeps short of weight: earliest gap first (issue 12).

A history sweep a gap sweep deferred takes its whole weight in one step, and only while half of the budget
stays free. After a mass drop hundreds of them find no room; the line (``reconcile.background.HistoryLine``,
a sorted set by gap start in the budget's Redis) makes the longest gaps read first, and keeps a later gap
from taking the weight an earlier one waits for.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from fixtures.userdata_helpers import add_sim_accounts, settings_from, sim_env

from kraite_mp.binance.budget import EgressBudget, reset_budgets, shared_budget
from kraite_mp.ops.embedded import free_port
from kraite_mp.reconcile import background
from kraite_mp.reconcile.background import LINE_TTL_S, HistoryLine, line_member
from kraite_mp.reconcile.result import ReconcileStatus
from kraite_mp.reconcile.sweep import reconcile_account


def _budget(redis_url: str, name: str) -> EgressBudget:
    return EgressBudget(name, 1200, redis_url=redis_url, key_prefix=f"test-line:{name}")


@pytest.mark.integration
def test_the_line_orders_waiters_by_gap_start_and_forgets_those_not_seen(redis_url: str) -> None:
    name = uuid.uuid4().hex[:8]
    line = HistoryLine(_budget(redis_url, name))
    client = redis.Redis.from_url(redis_url)
    try:
        assert line.waiting() == 0
        # joined in another order than their gaps opened: the earliest gap is the head
        assert line.join("3:3000", 3000) == 0
        assert line.join("1:1000", 1000) == 0
        assert line.join("2:2000", 2000) == 1
        assert line.join("3:3000", 3000) == 2  # asking again keeps the place
        assert line.waiting() == 3
        # a waiter whose message was lost stops asking: it leaves the line at the next join
        client.zadd(line.seen_key, {"1:1000": time.time() - LINE_TTL_S - 1})
        assert line.waiting() == 2
        assert line.join("3:3000", 3000) == 1
        assert client.zscore(line.waiting_key, "1:1000") is None
        line.leave("2:2000")  # served
        assert line.join("3:3000", 3000) == 0
        assert line.waiting() == 1
        assert 0 < int(client.ttl(line.waiting_key)) <= int(LINE_TTL_S * 2) + 60  # type: ignore[arg-type]
    finally:
        client.delete(line.waiting_key, line.seen_key)
        client.close()


@pytest.mark.integration
def test_without_redis_there_is_no_line_and_the_budget_falls_back() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    budget = _budget(dead, uuid.uuid4().hex[:8])
    line = HistoryLine(budget)
    assert line.join("1:1000", 1000) is None
    assert budget.fallback  # the budget keeps to its local share meanwhile
    assert line.waiting() is None
    line.leave("1:1000")  # nothing to leave, and no error
    local = HistoryLine(EgressBudget("local", 1200))
    assert (local.join("1:1000", 1000), local.waiting()) == (None, None)


@pytest.mark.integration
def test_a_later_gap_waits_for_the_earlier_one_and_makes_no_call_meanwhile(
    db: Any, simulator: Any, secret_key: str, kraite_env: dict[str, str]
) -> None:
    """Account B's gap opened after account A's. With room in the budget for A's history but not for both,
    B's history sweep sends itself again without a call; once A's is served, B is the head and reads its
    history."""
    a, b = add_sim_accounts(db, secret_key, simulator, 2)
    settings = settings_from(
        sim_env(kraite_env, simulator, binance__egress_id=f"line-{uuid.uuid4().hex[:8]}")
    )
    reset_budgets()
    budget = shared_budget(settings)
    line = HistoryLine(budget)
    try:
        simulator.place_order(
            a.api_key, symbol="BTCUSDT", side="BUY", type="LIMIT", quantity="0.010", price="50000"
        )
        for symbol in ("BTCUSDT", "ETHUSDT"):
            simulator.place_order(
                b.api_key, symbol=symbol, side="BUY", type="LIMIT", quantity="0.010", price="1000"
            )
        for account in (a, b):  # the first connects' full sweeps: the orders are open in the database
            assert reconcile_account(db, settings, account, mode="full").status is ReconcileStatus.OK
        weight_a, weight_b = background.WEIGHT_PER_SYMBOL, 2 * background.WEIGHT_PER_SYMBOL
        leave = int(budget.limit * background.LEAVE_RATIO)
        # room for A's history and then B's, but not for B's beside one ahead of it of its own weight
        remaining = budget.remaining()
        assert remaining is not None
        target = leave + weight_a + weight_b + 5
        assert remaining > target and budget.try_take(remaining - target)[0]

        gap_a, gap_b = int(time.time() * 1000) - 2000, int(time.time() * 1000) - 1000
        assert line.join(line_member(a.id, gap_a), gap_a) == 0  # A's sweep is waiting already
        sent: list[tuple[str, int, float]] = []

        def sweep(account: Any, gap: int, attempt: int) -> Any:
            return background.history_sweep(
                db,
                settings,
                account,
                since_ms=gap,
                requested_ms=int(time.time() * 1000),
                attempt=attempt,
                send_again=lambda n, delay: sent.append((account.name, n, delay)),
            )

        calls = simulator.stats()["requests"].get("/fapi/v1/allOrders", 0)
        assert sweep(b, gap_b, 0) is None
        assert len(sent) == 1 and sent[0][:2] == (b.name, 1) and 1.0 <= sent[0][2] <= 2.0, sent
        assert simulator.stats()["requests"].get("/fapi/v1/allOrders", 0) == calls  # no call meanwhile
        assert line.waiting() == 2

        result = sweep(a, gap_a, 1)  # the head: served, out of the line
        assert result is not None and result.status is ReconcileStatus.OK, result
        assert simulator.stats()["requests"].get("/fapi/v1/allOrders", 0) == calls + 1
        assert line.join(line_member(b.id, gap_b), gap_b) == 0  # B is first now

        result = sweep(b, gap_b, 1)
        assert result is not None and result.status is ReconcileStatus.OK, result
        assert simulator.stats()["requests"].get("/fapi/v1/allOrders", 0) == calls + 3
        assert line.waiting() == 0 and len(sent) == 1
    finally:
        client = budget.shared_client()
        if client is not None:
            client.delete(line.waiting_key, line.seen_key)
        reset_budgets()
