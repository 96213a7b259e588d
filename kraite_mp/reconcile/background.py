"""The background history sweep a gap sweep defers (``supervisor.gap_sweep_history = "deferred"``).

A gap sweep restores what matters at once (balances, positions, open orders, fills) for 5 + 1 per listed
symbol. What its account call cannot show, an order placed *and* ended unfilled inside the gap, only the
order history shows: allOrders + allAlgoOrders from the gap start, 10 per symbol a full sweep would read.
That is most of a sweep's weight and none of its urgency, so it runs as its own ``reconcile_account_job``
message (``history_since_ms`` set) after the gap sweep, and its calls take weight only while half the
egress's budget would still be left (``BinanceRest.background_leave``): after a mass drop the gap sweeps,
the streams' listenKeys and the next accounts' reconnects go first; the histories fill what they leave.

A history sweep that finds no room within ``BUDGET_WAIT_S`` gives its thread back at once and is sent
again for when the budget may have room (``next_delay_s``: spread ever wider, at most ``MAX_ATTEMPTS`` times; then the next full sweep,
``supervisor.sync_full_interval_s``, reads the same histories). One is skipped when a full sweep started
after it was asked for: that sweep read the same symbols' histories over a window that holds the gap.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.rest import BinanceRest
from kraite_mp.reconcile.sweep import ReconcileResult, ReconcileStatus, reconcile_account
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)

#: The share of the egress's REST budget a history sweep leaves to everything else.
LEAVE_RATIO = 0.5
#: How long one call of a history sweep waits for room before the sweep is sent again for later.
BUDGET_WAIT_S = 1.0
#: A history sweep that found no room runs again once the budget's oldest entry has left the window, plus a
#: random spread of up to this much (doubled per attempt, capped), so that deferred sweeps come back apart.
RETRY_SPREAD_S = 5.0
RETRY_SPREAD_MAX_S = 300.0
#: After this many sends a history sweep gives up: the next full sweep reads the same histories.
MAX_ATTEMPTS = 10


def next_delay_s(attempt: int, retry_after_s: float) -> float:
    """Seconds before send ``attempt`` (1 = the first re-send) of a history sweep: when the budget may have
    room again (``retry_after_s``: its oldest entry leaves the window, or Binance's Retry-After) plus a
    random spread doubling from ``RETRY_SPREAD_S`` up to ``RETRY_SPREAD_MAX_S``, so that the histories of
    a mass drop come back apart and ever less often while the budget stays busy."""
    spread: float = min(RETRY_SPREAD_S * 2.0 ** max(0, attempt - 1), RETRY_SPREAD_MAX_S)
    return max(0.0, retry_after_s) + random.uniform(0.0, spread)


def history_sweep(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    since_ms: int,
    requested_ms: int,
    attempt: int,
    send_again: Callable[[int, float], object],
) -> ReconcileResult | None:
    """Run one background history sweep of ``account`` from ``since_ms`` (the gap's start), asked for at
    ``requested_ms``; ``send_again(attempt, delay_s)`` queues it again when the budget had no room or the
    exchange said "later". None when a full sweep made it unnecessary."""
    last_full = runfiles.last_full_sweep_ms(settings.run_dir, account.id)
    if last_full is not None and last_full >= requested_ms:
        log.info("account %s: history sweep skipped: a full sweep started after it was asked for", account.id)
        return None
    client = BinanceRest.for_account(settings, account, max_budget_wait_s=BUDGET_WAIT_S)
    client.background_leave = int(client.budget.limit * LEAVE_RATIO)
    try:
        result = reconcile_account(
            conn, settings, account, rest=client, mode="history", gap_start_ms=since_ms
        )
    finally:
        client.close()
    if result.status in (ReconcileStatus.RATE_LIMITED, ReconcileStatus.TRANSIENT):
        if attempt + 1 >= MAX_ATTEMPTS:
            log.warning(
                "account %s: history sweep given up after %d attempts (%s); the next full sweep reads it",
                account.id,
                attempt + 1,
                result.error,
            )
            return result
        delay_s = next_delay_s(attempt + 1, float(result.retry_after_s or 0.0))
        send_again(attempt + 1, delay_s)
        log.info("account %s: history sweep sent again in %.0fs (%s)", account.id, delay_s, result.error)
        return result
    if result.status is not ReconcileStatus.OK:
        log.error("account %s: history sweep ended with %s: %s", account.id, result.status, result.error)
    else:
        log.info("%s", result.summary())
    return result
