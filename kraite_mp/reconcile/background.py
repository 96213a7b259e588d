"""The background history sweep a gap sweep defers (``supervisor.gap_sweep_history = "deferred"``).

A gap sweep restores what matters at once (balances, positions, open orders, fills) for 5 + 1 per listed
symbol. What its account call cannot show, an order placed *and* ended unfilled inside the gap, only the
order history shows: allOrders + allAlgoOrders from the gap start, 10 per symbol a full sweep would read.
That is most of a sweep's weight and none of its urgency, so it runs as its own ``reconcile_account_job``
message (``history`` set) after the gap sweep, and takes its whole weight from the egress's budget in one
atomic step, only while half the budget would still be left (``BinanceRest.prepay`` with
``background_leave``): after a mass drop the gap sweeps, the streams' listenKeys and the next accounts'
reconnects go first; the histories fill what they leave, and none stops halfway having spent weight on
what it must read again.

Earliest gap first (``HistoryLine``): a history sweep short of weight joins its egress's line, a Redis sorted
set by gap start beside the budget's keys (``<budget>:history:waiting``, ``:history:seen``). Only the head of
the line takes weight, or a sweep further back when the window holds its weight for it and for every sweep
ahead of it, so that after a mass drop the histories of the longest gaps are read first and none starves
behind gaps that opened later. A sweep that does not take weight gives its worker thread back at once and is
sent again: the head for when the budget's oldest entry leaves the window, the others after a second per
place (at most ``LINE_ASK_MAX_S``), each with a spread; a waiter not seen for ``LINE_TTL_S`` (its message
lost) leaves the line. Without Redis there is no line: the sweep is sent again for when the budget frees,
plus a spread that doubles per attempt (``next_delay_s``). It is skipped when a full sweep started after it
was asked for (that sweep read the same symbols' histories over a window that holds the gap), and given up
once ``supervisor.sync_full_interval_s`` has passed since it was asked for: by then the periodic full sweep
reads the same histories.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.endpoints import ENDPOINT_WEIGHTS
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.binance.waiting_line import WaitingLine
from kraite_mp.reconcile.fetch import history_symbols
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.reconcile.sweep import reconcile_account
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.binance.budget import EgressBudget
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)

#: The share of the egress's REST budget a history sweep leaves to everything else.
LEAVE_RATIO = 0.5
#: How long one call of a history sweep beyond what it prepaid waits for room before it is sent again.
BUDGET_WAIT_S = 1.0
#: The random spread added to a re-send's wait: doubled per attempt, capped.
RETRY_SPREAD_S = 5.0
RETRY_SPREAD_MAX_S = 60.0
#: A history sweep's weight per symbol: allOrders + allAlgoOrders.
WEIGHT_PER_SYMBOL = (
    ENDPOINT_WEIGHTS[("GET", "/fapi/v1/allOrders", True)]
    + ENDPOINT_WEIGHTS[("GET", "/fapi/v1/allAlgoOrders", True)]
)
#: Given up after this long when the periodic full sweep is off (``sync_full_interval_s`` otherwise).
MAX_AGE_WITHOUT_FULL_S = 3600.0
#: The line (``HistoryLine``): a waiter behind the head asks again after this much per place in it, at most
#: ``LINE_ASK_MAX_S``, plus up to ``LINE_JITTER_S`` (the head: when the budget frees, plus the same).
LINE_SPACING_S = 1.0
LINE_ASK_MAX_S = 30.0
LINE_JITTER_S = 1.0
#: The head asks again no sooner than this, however soon the budget's oldest entry leaves its window.
LINE_HEAD_MIN_S = 0.5
#: A waiter not seen this long (its message was lost, its account removed) leaves the line.
LINE_TTL_S = 150.0


class HistoryLine(WaitingLine):
    """The history sweeps of one egress waiting for weight, earliest gap first (module doc), by gap start
    (ms), beside ``budget``'s keys in its Redis."""

    def __init__(self, budget: EgressBudget) -> None:
        prefix = budget.key_prefix
        waiting, seen = f"{prefix}:history:waiting", f"{prefix}:history:seen"
        super().__init__(budget, waiting, seen, LINE_TTL_S, expire_s=int(LINE_TTL_S * 2) + 60)


def line_member(account_id: int, since_ms: int) -> str:
    """A history sweep's name in the line: its account and its gap's start (an account may have two)."""
    return f"{account_id}:{since_ms}"


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
    exchange said "later". None when nothing was swept (superseded, given up, no symbol, no room)."""
    client = BinanceRest.for_account(settings, account, max_budget_wait_s=BUDGET_WAIT_S)
    try:
        return _history_sweep(conn, settings, account, client, since_ms, requested_ms, attempt, send_again)
    finally:
        client.close()


def _history_sweep(
    conn: Any,
    settings: Settings,
    account: Account,
    client: BinanceRest,
    since_ms: int,
    requested_ms: int,
    attempt: int,
    send_again: Callable[[int, float], object],
) -> ReconcileResult | None:
    line, member = HistoryLine(client.budget), line_member(account.id, since_ms)
    last_full = runfiles.last_full_sweep_ms(settings.run_dir, account.id)
    if last_full is not None and last_full >= requested_ms:
        log.info("account %s: history sweep skipped: a full sweep started after it was asked for", account.id)
        line.leave(member)
        return None
    max_age_s = settings.supervisor.sync_full_interval_s
    if settings.supervisor.sync_interval_s <= 0 or max_age_s <= 0:
        max_age_s = MAX_AGE_WITHOUT_FULL_S
    if time.time() * 1000 - requested_ms > max_age_s * 1000:
        log.warning(
            "account %s: history sweep given up after %d attempts in %.0fs without room; the next full sweep"
            " reads it",
            account.id,
            attempt + 1,
            max_age_s,
        )
        line.leave(member)
        return None
    symbols = history_symbols(conn, settings, account.id)
    conn.commit()  # end the reads' transaction: the returns below must not leave it open
    if not symbols:
        line.leave(member)
        return None
    client.background_leave = int(client.budget.limit * LEAVE_RATIO)
    weight = WEIGHT_PER_SYMBOL * len(symbols)
    if weight <= client.budget.limit - client.background_leave:
        place = line.join(member, since_ms)
        if place and not _room_for_those_ahead(client, place, weight):
            delay_s = min(LINE_SPACING_S * place, LINE_ASK_MAX_S) + random.uniform(0.0, LINE_JITTER_S)
            send_again(attempt + 1, delay_s)
            log.info(
                "account %s: history sweep sent again in %.0fs (place %d in the egress's line)",
                account.id,
                delay_s,
                place,
            )
            return None
        taken, retry_in = client.prepay(weight)
        if not taken:
            if place is None:  # no line without Redis: the doubling spread keeps the re-sends apart
                _again(account, attempt, retry_in, "no room in the REST budget", send_again)
            else:
                delay_s = max(retry_in, LINE_HEAD_MIN_S) + random.uniform(0.0, LINE_JITTER_S)
                send_again(attempt + 1, delay_s)
                log.info(
                    "account %s: history sweep sent again in %.0fs (place %d in the egress's line, no room"
                    " in the REST budget)",
                    account.id,
                    delay_s,
                    place,
                )
            return None
    # served: out of the line (more than a prepay can hold too: call by call, each leaving half the budget)
    line.leave(member)
    result = reconcile_account(
        conn, settings, account, rest=client, mode="history", gap_start_ms=since_ms, history=symbols
    )
    if result.status in (ReconcileStatus.RATE_LIMITED, ReconcileStatus.TRANSIENT):
        _again(account, attempt, float(result.retry_after_s or 0.0), str(result.error), send_again)
    elif result.status is not ReconcileStatus.OK:
        log.error("account %s: history sweep ended with %s: %s", account.id, result.status, result.error)
    else:
        log.info("%s", result.summary())
    return result


def _room_for_those_ahead(client: BinanceRest, place: int, weight: int) -> bool:
    """Whether the budget's window holds ``weight`` for the sweep at ``place`` in the line and as much for
    each sweep ahead of it, beside what history sweeps leave to everything else (False when unknown)."""
    remaining = client.budget.remaining()
    return remaining is not None and remaining - client.background_leave >= (place + 1) * weight


def _again(
    account: Account, attempt: int, retry_after_s: float, why: str, send_again: Callable[[int, float], object]
) -> None:
    delay_s = next_delay_s(attempt + 1, retry_after_s)
    send_again(attempt + 1, delay_s)
    log.info("account %s: history sweep sent again in %.0fs (%s)", account.id, delay_s, why)
