"""The REST half of one reconciliation: which calls each sweep makes, collected in a ``Sweep``.

Nothing here touches the database but to read what it holds (open orders, active symbols, stored
positions, what the stream delivered around a gap); ``kraite_mp.reconcile.sweep`` writes what was
fetched. Raises ``BinanceError`` subclasses; what was fetched before one stays in the ``Sweep``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.errors import BinanceError, OrderNotFound
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.reconcile.result import ReconcileResult
from kraite_mp.store import account_state, orders
from kraite_mp.store.accounts import Account
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: At this many symbols one no-symbol call (weight 40) is cheaper than one call per symbol.
NO_SYMBOL_WEIGHT = 40
#: allOrders and allAlgoOrders: the exchange answers at most this many orders per call ...
ALL_ORDERS_LIMIT = 1000
#: ... and looks back at most 7 days; stay a little inside that.
ALL_ORDERS_MAX_LOOKBACK_MS = 7 * 86_400_000 - 3_600_000
#: Overlap of the history window with the previous sweep (clock skew, in-flight orders).
HISTORY_OVERLAP_MS = 120_000


@dataclass
class Fetched:
    """One REST answer about one order."""

    kind: str  # "regular" | "algo"
    data: dict[str, Any]
    received_at: datetime


@dataclass
class Snapshot:
    """One REST answer about the whole account: its positions or its balances."""

    kind: str  # "positions" | "balances"
    data: list[dict[str, Any]]
    asked_at_ms: int  #: server time (as the client knows it) the request was sent
    received_at: datetime


class Sweep:
    """The REST half of one reconciliation: collects answers, never touches the database."""

    def __init__(self, rest: BinanceRest, result: ReconcileResult) -> None:
        self.rest = rest
        self.result = result
        #: (kind, id) -> the newest answer seen in this sweep
        self.fetched: dict[tuple[str, int], Fetched] = {}
        self.listed_regular: set[int] = set()
        self.listed_algo: set[int] = set()
        self.snapshots: list[Snapshot] = []

    def snapshot(self, kind: str, fetch: Callable[[], list[dict[str, Any]]]) -> Snapshot:
        data = fetch()
        snap = Snapshot(kind, data, self.rest.sent_at_ms, datetime.now(UTC))
        self.snapshots.append(snap)
        return snap

    def add(self, kind: str, items: list[dict[str, Any]], *, listed: bool = False) -> None:
        now = datetime.now(UTC)
        key_name = "algoId" if kind == "algo" else "orderId"
        for data in items:
            try:
                oid = int(data[key_name])
            except (KeyError, TypeError, ValueError):
                oid = -1 - len(self.fetched)  # unparseable: still audited (as invalid) under its own key
            if listed:
                (self.listed_algo if kind == "algo" else self.listed_regular).add(oid)
            prev = self.fetched.get((kind, oid))
            if prev is None or update_time(data) >= update_time(prev.data):
                self.fetched[(kind, oid)] = Fetched(kind, data, now)

    def lookup_order(self, symbol: str, order_id: int) -> None:
        self._lookup(
            "regular", lambda: self.rest.order(symbol, order_id=order_id), f"order {order_id} ({symbol})"
        )

    def lookup_algo(self, algo_id: int) -> None:
        self._lookup("algo", lambda: self.rest.algo_order(algo_id=algo_id), f"algo order {algo_id}")

    def _lookup(self, kind: str, fetch: Callable[[], dict[str, Any]], what: str) -> None:
        """Add the one order ``fetch`` returns; an order unknown to the exchange is counted and left."""
        try:
            self.add(kind, [fetch()])
        except OrderNotFound:
            self.result.not_found += 1
            log.warning(
                "account %s: %s is unknown to the exchange (-2013): left as it is",
                self.result.account_id,
                what,
            )


def update_time(data: dict[str, Any]) -> int:
    for key in ("updateTime", "time", "createTime"):
        try:
            return int(data[key])
        except (KeyError, TypeError, ValueError):
            continue
    return 0


def _history_window(conn: Any, settings: Settings, account_id: int, now_ms: int) -> int | None:
    """Start (ms) of the allOrders and allAlgoOrders window: the previous full sweep, else the last
    activity we know of."""
    since = runfiles.last_full_sweep_ms(settings.run_dir, account_id)
    if since is None:
        since = orders.last_activity_ms(conn, account_id)
    if since is None:
        return None  # nothing known about this account yet: its open orders are all we need
    return max(since - HISTORY_OVERLAP_MS, now_ms - ALL_ORDERS_MAX_LOOKBACK_MS)


def fetch(
    conn: Any,
    settings: Settings,
    account: Account,
    sweep: Sweep,
    gap_start_ms: int | None = None,
    history: list[str] | None = None,
) -> None:
    """All REST calls of one sweep. Raises BinanceError subclasses; what was fetched stays in the sweep.

    Request weight: openOrders / openAlgoOrders cost 1 with a symbol, 40 without; order / algoOrder 1;
    allOrders, allAlgoOrders, positionRisk and balance 5 each. ``full``: positionRisk and balance (10:
    the account's positions and balances; a symbol holding a position is active), the two no-symbol
    listings (80: every open order, including ones the database never saw), allOrders and allAlgoOrders
    for each active symbol since the previous full sweep (regular and algo orders placed *and* ended in
    the gap), then the lookups below: 90 + 10 per active symbol (5 + 5) + 1 per missed order.
    ``targeted``: one listing per symbol holding open orders in the database (the no-symbol call from
    ``NO_SYMBOL_WEIGHT`` symbols on), then the lookups: 2 for open orders on one symbol per kind, 0 for
    an account with nothing open; it cannot see an order the database never heard of (the next full
    sweep does). ``gap`` (``_fetch_gap``): account 5 + 1 per listed symbol and kind + the lookups, and
    only on evidence positionRisk 5 and 10 per symbol whose history is read.
    """
    rest, result = sweep.rest, sweep.result
    if result.mode == "history":
        assert gap_start_ms is not None
        _fetch_history(conn, settings, account, sweep, gap_start_ms, history)
        return  # histories only: what they show is written, the open orders were the gap sweep's
    db_open = orders.open_orders(conn, account.id)
    regular_symbols = {sym for kind, _, sym, _, _ in db_open if kind == "regular"}
    algo_symbols = {sym for kind, _, sym, _, _ in db_open if kind == "algo"}
    # a TRIGGERED algo is consistent while the regular order it created is open: list that symbol too
    regular_symbols |= {
        sym for kind, _, sym, status, _ in db_open if kind == "algo" and status == "TRIGGERED"
    }

    if result.mode == "full":
        # positions first: a symbol where a position opened during the gap is active (its history is read)
        positions = sweep.snapshot("positions", rest.position_risk)
        sweep.snapshot("balances", rest.balances)
        sweep.add("regular", rest.open_orders(), listed=True)
        sweep.add("algo", rest.open_algo_orders(), listed=True)
        now_ms = int(time.time() * 1000)
        since = _history_window(conn, settings, account.id, now_ms)
        if since is not None:
            symbols = orders.active_symbols(conn, account.id, since) | regular_symbols
            symbols |= {str(f.data["symbol"]) for f in sweep.fetched.values() if f.data.get("symbol")}
            symbols |= _position_symbols(positions.data)
            _read_histories(account.id, sweep, sorted(symbols), since)
    elif result.mode == "gap":
        assert gap_start_ms is not None
        _fetch_gap(conn, settings, account, sweep, gap_start_ms, regular_symbols, algo_symbols)
    else:
        _list_by_symbol(sweep, "regular", regular_symbols, rest.open_orders)
        _list_by_symbol(sweep, "algo", algo_symbols, rest.open_algo_orders)

    # orders the database holds open that the exchange no longer lists: ask for their final state (1 each)
    for kind, oid, symbol, status, actual in db_open:
        if kind == "regular":
            if oid not in sweep.listed_regular and ("regular", oid) not in sweep.fetched:
                sweep.lookup_order(symbol, oid)
        elif oid not in sweep.listed_algo and ("algo", oid) not in sweep.fetched:
            if status == "TRIGGERED" and actual is not None and actual in sweep.listed_regular:
                continue  # waiting for its (open) regular order: nothing missed
            sweep.lookup_algo(oid)

    _follow_triggered(conn, account.id, sweep)


def _fetch_gap(
    conn: Any,
    settings: Settings,
    account: Account,
    sweep: Sweep,
    gap_start_ms: int,
    regular_symbols: set[str],
    algo_symbols: set[str],
) -> None:
    """The REST calls of a gap sweep.

    The gap sweep pays for what the gap can hide, on evidence. Frames lost in a gap leave traces in one
    account-wide call, ``GET /fapi/v3/account`` (weight 5): every asset with its ``updateTime`` (the last
    wallet change) and a position item, with its ``updateTime`` (the last fill), for every symbol holding a
    position or an open regular order. A change at an exchange time the stream covered is no evidence: the
    audit rows of the ORDER_TRADE_UPDATE frames the stream applied say up to which transaction time the old
    connection delivered (received before the gap's start) and from which the new one did (received after),
    and Binance sends one type's events in ``T`` order; a change older than the gap start less
    ``HISTORY_OVERLAP_MS`` (a half-open connection is noticed well within it) is none either. Then:

    - the assets are written as the balances (always: they came with the call);
    - every symbol with DB-open regular orders or listed by the account gets its openOrders listing, every
      symbol with DB-open algo orders its openAlgoOrders listing (1 each): cancels, expiries, fills and
      amendments of known orders, and regular orders placed in the gap and still open;
    - a DB-open order the listing lacks is looked up (1 each);
    - a position updated where the stream was blind, or one the database holds open that the account no
      longer lists: positionRisk (5: the entry prices) and the history (allOrders + allAlgoOrders, 10) of
      its symbol from the gap start;
    - a wallet changed where the stream was blind (a fill, funding, a transfer): the history from the gap
      start of every symbol a full sweep would read (DB-open, listed, active since the last full sweep),
      because a fill that opened and closed a position inside the gap leaves no position behind.

    Cost: 5 + 1 per listed symbol and kind (5 with nothing open), + 10 per symbol whose history is read,
    against a full sweep's 90 + 10 per active symbol. What the account call cannot show, an order placed
    *and* ended unfilled (canceled, expired, rejected) inside the gap, which moved no money and no
    position: with ``supervisor.gap_sweep_history = "deferred"`` (the default) ``history_deferred`` is set
    when some symbol's history is left unread, and the job sends the background ``history`` sweep
    (``kraite_mp.reconcile.background``); with "evidence" the next full sweep finds it. Either way, until
    the next full sweep: an algo order placed in the gap and still open on a symbol without DB-open algo
    orders and outside the histories read (the full sweep's no-symbol openAlgoOrders finds it; its trigger
    reaches the stream as ALGO_UPDATE anyway). Fills have no blind spot beyond the full sweep's own
    (below): every fill moves the wallet.
    """
    rest, result = sweep.rest, sweep.result
    snapshot = rest.account()
    asked_at_ms, received_at = rest.sent_at_ms, datetime.now(UTC)
    assets, items = snapshot.get("assets"), snapshot.get("positions")
    if not isinstance(assets, list) or not isinstance(items, list):
        raise BinanceError(200, None, "account: expected lists 'assets' and 'positions'")
    # the wallet, in GET /fapi/v3/balance's names: one monotonic write and one audit digest for both sources
    balances = [dict(a, balance=a.get("walletBalance")) if isinstance(a, dict) else a for a in assets]
    sweep.snapshots.append(Snapshot("balances", balances, asked_at_ms, received_at))

    # what the stream delivered around the gap: a change at an exchange time up to the last order update
    # of the old connection, or from the first of the new one, came through it
    window_ms = gap_start_ms + rest.time_offset_ms - HISTORY_OVERLAP_MS
    before, after = orders.stream_coverage_ms(
        conn, account.id, gap_start_ms, gap_start_ms - HISTORY_OVERLAP_MS
    )

    def hidden(changed_ms: int) -> bool:
        if changed_ms < window_ms:
            return False  # before the gap (and its overlap): the stream was up
        if before is not None and changed_ms <= before:
            return False
        return after is None or changed_ms < after

    listed: set[str] = set()
    changed: set[str] = set()
    present: set[tuple[str, str]] = set()
    for item in items:
        symbol = item.get("symbol") if isinstance(item, dict) else None
        if not isinstance(symbol, str) or not symbol:
            raise BinanceError(200, None, "account: a position without a symbol")
        listed.add(symbol)
        present.add((symbol, str(item.get("positionSide") or "BOTH")))
        if hidden(_int_or_zero(item.get("updateTime"))):
            changed.add(symbol)  # a fill (or another position change) the stream may not have delivered
    for symbol, side in account_state.open_positions(conn, account.id):
        if (symbol, side) not in present:
            changed.add(symbol)  # a position the database holds open is gone: closed meanwhile
    wallet_moved = any(isinstance(a, dict) and hidden(_int_or_zero(a.get("updateTime"))) for a in assets)

    # every symbol with an open regular order is listed by the account (and so is every position's):
    # listing them finds what the database holds open, and what was placed in the gap and is still open
    _list_by_symbol(sweep, "regular", regular_symbols | listed, rest.open_orders)
    _list_by_symbol(sweep, "algo", algo_symbols, rest.open_algo_orders)

    history = set(changed)
    known = regular_symbols | algo_symbols | listed
    if wallet_moved:
        # the wallet moved where the stream was blind: a fill may have left no position behind (opened and
        # closed in the gap), on any symbol a full sweep would read
        history |= _full_sweep_symbols(conn, settings, account.id, known)
    elif (
        settings.supervisor.gap_sweep_history == "deferred"
        and _full_sweep_symbols(conn, settings, account.id, known) - history
    ):
        # an order placed and ended unfilled in the gap moved nothing the account call shows, on any of them:
        # their history is read by a background sweep that leaves the budget to this one (jobs.py)
        result.history_deferred = True
    if changed:
        sweep.snapshot("positions", rest.position_risk)  # entry prices: the account snapshot has none
    result.history_symbols = sorted(history)
    _read_histories(account.id, sweep, result.history_symbols, window_ms)


def _full_sweep_symbols(conn: Any, settings: Settings, account_id: int, known: set[str]) -> set[str]:
    """``known`` (open in the database, listed by the account) and the symbols active since the previous
    full sweep: the symbols whose history a full sweep reads."""
    since = _history_window(conn, settings, account_id, int(time.time() * 1000))
    return known | orders.active_symbols(conn, account_id, since) if since is not None else set(known)


def history_symbols(conn: Any, settings: Settings, account_id: int) -> list[str]:
    """The symbols a ``history`` sweep reads (allOrders + allAlgoOrders, 10 each): every symbol a full sweep
    would read (open in the database, holding a stored position, active since the previous full sweep)."""
    known = {sym for _, _, sym, _, _ in orders.open_orders(conn, account_id)}
    known |= {symbol for symbol, _ in account_state.open_positions(conn, account_id)}
    return sorted(_full_sweep_symbols(conn, settings, account_id, known))


def _fetch_history(
    conn: Any, settings: Settings, account: Account, sweep: Sweep, since_ms: int, symbols: list[str] | None
) -> None:
    """The background history sweep a gap sweep deferred (``supervisor.gap_sweep_history = "deferred"``):
    allOrders + allAlgoOrders (10) from the gap start on ``symbols`` (None: ``history_symbols``): what was
    placed *and* ended inside the gap, which the gap sweep's account call cannot show."""
    if symbols is None:
        symbols = history_symbols(conn, settings, account.id)
    sweep.result.history_symbols = symbols
    window_ms = since_ms + sweep.rest.time_offset_ms - HISTORY_OVERLAP_MS
    _read_histories(account.id, sweep, symbols, window_ms)


def _read_histories(account_id: int, sweep: Sweep, symbols: list[str], since_ms: int) -> None:
    """allOrders + allAlgoOrders (5 + 5) of each symbol from ``since_ms`` (exchange time) into the sweep."""
    rest = sweep.rest
    for symbol in symbols:
        regular = rest.all_orders(symbol, start_time_ms=since_ms, limit=ALL_ORDERS_LIMIT)
        _warn_if_truncated(account_id, symbol, "orders", regular)
        sweep.add("regular", regular)
        algo = rest.all_algo_orders(symbol, start_time_ms=since_ms, limit=ALL_ORDERS_LIMIT)
        _warn_if_truncated(account_id, symbol, "algo orders", algo)
        sweep.add("algo", algo)


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _position_symbols(items: list[dict[str, Any]]) -> set[str]:
    """Symbols of the positionRisk items that hold a position (a zero one is listed for its open orders)."""
    found = set()
    for item in items:
        symbol = item.get("symbol")
        try:
            amount = Decimal(str(item.get("positionAmt")))
        except InvalidOperation:
            continue  # unusable: the snapshot is audited as such when it is written
        if isinstance(symbol, str) and symbol and amount.is_finite() and amount != 0:
            found.add(symbol)
    return found


def _warn_if_truncated(account_id: int, symbol: str, what: str, history: list[dict[str, Any]]) -> None:
    if len(history) >= ALL_ORDERS_LIMIT:
        log.warning(
            "account %s: %s has %d+ %s since the last sweep: older ones not checked",
            account_id,
            symbol,
            ALL_ORDERS_LIMIT,
            what,
        )


def _list_by_symbol(sweep: Sweep, kind: str, symbols: set[str], call: Any) -> None:
    if len(symbols) >= NO_SYMBOL_WEIGHT:
        sweep.add(kind, call(), listed=True)
        return
    for symbol in sorted(symbols):
        sweep.add(kind, call(symbol), listed=True)


def _follow_triggered(conn: Any, account_id: int, sweep: Sweep) -> None:
    """A triggered algo order created a regular order: fetch it when we cannot know how it ended."""
    wanted: dict[int, str] = {}
    for (kind, _), fetched in list(sweep.fetched.items()):
        if kind != "algo":
            continue
        try:
            actual = int(fetched.data.get("actualOrderId") or 0)
        except (TypeError, ValueError):
            continue
        symbol = fetched.data.get("symbol")
        if actual and isinstance(symbol, str) and ("regular", actual) not in sweep.fetched:
            wanted[actual] = symbol
    if not wanted:
        return
    known = orders.regular_statuses(conn, account_id, list(wanted))
    for oid, symbol in sorted(wanted.items()):
        status = known.get(oid)
        if status is not None and orders.is_terminal("regular", status):
            continue  # the stream saw it end
        if status is not None and oid in sweep.listed_regular:
            continue
        sweep.lookup_order(symbol, oid)
