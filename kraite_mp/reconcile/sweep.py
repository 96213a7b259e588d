"""One account's reconciliation: ask Binance over REST, write the answers through the ordered update.

Frames lost while a stream reconnects (or after a listenKey expiry) are gone for good; only REST can
tell what happened meanwhile. ``reconcile_account`` asks Binance about the account's orders and writes
every answer through the same ordered, idempotent update as the stream
(``kraite_mp.store.orders.apply_order_update``), so a stale REST answer never overwrites a newer
streamed one. A full sweep also reads the account's positions and balances (positionRisk, balance) and
writes them through the stream's monotonic ACCOUNT_UPDATE write (``kraite_mp.store.account_state``), as
of the server time the request was sent: a position the answer no longer lists was closed meanwhile and
is set to zero, and a streamed row newer than the request is never overwritten. Every REST result is
audited once (source ``rest``, frame id ``rest:<account>:<kind>:<id>:<updateTime>:<status>`` for an
order, ``rest:<account>:positions|balances:<digest>`` for a snapshot, ``:error`` appended to an
unusable one: an unchanged answer is not audited again), and observers run after COMMIT, as for
streamed frames. In shadow mode (empty ``user_data_stream.binance.dispatched_executions``) results
are audited only.

Modes: ``full`` (every open order, plus the history of the active symbols since the last full
sweep), ``targeted`` (per-symbol checks of the orders the database holds open), ``gap`` (after a
reconnect whose gap is known; below), ``history`` (the gap's order history, in the background: below),
``auto`` (full when one is due or the stream may have missed frames, else targeted). Failures stay per
account and come back as a ``ReconcileResult`` (a 429/418 also ends the pass); what was fetched before a
failure is still written; only database errors propagate.

The gap sweep pays for what the gap can hide (``_fetch_gap``): 5 + 1 per listed symbol and kind, + 10 per
symbol whose history it reads from the gap start where the account call shows a change the stream did not
deliver. What it cannot show, orders placed and ended unfilled inside the gap, the ``history`` sweep reads
afterwards in the background (``supervisor.gap_sweep_history = "deferred"``: 10 per symbol a full sweep
would read, leaving half the budget to everything else) or the next full sweep does ("evidence").

Known gap (of every mode): orders placed *and* ended inside a gap are found only on an active symbol
(one with an order, regular or algo, the database saw in the window, or an open position, stored or
listed): on any other symbol (orders that left no position behind), and on an account the database
knows no order of yet, they are not. Two fills in the same millisecond, the connection lost between
their two frames, would also pass for delivered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.errors import (
    BinanceError,
    InvalidCredentials,
    OrderNotFound,
    RateLimited,
    TransientError,
)
from kraite_mp.binance.fields import FrameError
from kraite_mp.binance.orders import OrderState, algo_from_rest, order_from_rest
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.binance.user import balances_from_rest, positions_from_rest
from kraite_mp.observers import run_observers
from kraite_mp.store import account_state, audit, orders
from kraite_mp.store.accounts import Account, mark_credentials_invalid
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: The sweeps ``reconcile_account`` can run (``auto`` picks full or targeted).
MODES = ("full", "targeted", "gap", "history", "auto")
#: The modes a person may ask for (``sync-orders --mode``): ``gap`` and ``history`` need the gap's start,
#: which only a reconnecting stream knows.
OPERATOR_MODES = ("full", "targeted", "auto")
#: At this many symbols one no-symbol call (weight 40) is cheaper than one call per symbol.
NO_SYMBOL_WEIGHT = 40
#: allOrders and allAlgoOrders: the exchange answers at most this many orders per call ...
ALL_ORDERS_LIMIT = 1000
#: ... and looks back at most 7 days; stay a little inside that.
ALL_ORDERS_MAX_LOOKBACK_MS = 7 * 86_400_000 - 3_600_000
#: Overlap of the history window with the previous sweep (clock skew, in-flight orders).
HISTORY_OVERLAP_MS = 120_000
#: Role (and heartbeat key prefix) of the user-data stream child.
USER_DATA_ROLE = "user-data"
#: The heartbeat state of a user-data child whose connection is up and delivering.
STREAMING_STATE = "streaming"
#: ... and those of one between connections (``kraite_mp.streams.connection``): its reconnect queues a sweep.
RECONNECTING_STATES = frozenset({"paced", "backoff", "connecting"})


@dataclass
class _Fetched:
    """One REST answer about one order."""

    kind: str  # "regular" | "algo"
    data: dict[str, Any]
    received_at: datetime


@dataclass
class _Snapshot:
    """One REST answer about the whole account: its positions or its balances."""

    kind: str  # "positions" | "balances"
    data: list[dict[str, Any]]
    asked_at_ms: int  #: server time (as the client knows it) the request was sent
    received_at: datetime


#: The fields of a snapshot item that identify an observation (not markPrice, PnL: they move all the time).
_SNAPSHOT_IDENTITY: dict[str, tuple[str, ...]] = {
    "positions": (
        "symbol",
        "positionSide",
        "positionAmt",
        "entryPrice",
        "breakEvenPrice",
        "isolatedWallet",
        "updateTime",
    ),
    "balances": ("asset", "balance", "crossWalletBalance", "updateTime"),
}


class ReconcileStatus(StrEnum):
    """How one reconciliation of one account ended (the values are what ``summary()`` prints)."""

    #: Every call answered (some orders may still be unknown to the exchange: ``not_found``).
    OK = "ok"
    #: The exchange rejected the key or signature; the account is marked (``mark_credentials_invalid``).
    INVALID_CREDENTIALS = "invalid_credentials"
    #: 429/418: no more calls until ``retry_after_s``.
    RATE_LIMITED = "rate_limited"
    #: Network trouble or a 5xx: try again later.
    TRANSIENT = "transient"
    #: Any other exchange error, an unreadable secret, or a database error that dropped this account's results.
    ERROR = "error"


@dataclass
class ReconcileResult:
    """What one reconciliation of one account did."""

    account_id: int
    account_name: str
    mode: str = "full"  #: the sweep that ran ("auto" resolved)
    status: ReconcileStatus = ReconcileStatus.OK
    shadow: bool = False  #: audited only (empty dispatched_executions)
    checked: int = 0  #: REST answers looked at
    updated: int = 0  #: orders the answers made newer
    transitions: int = 0  #: status changes recorded
    not_found: int = 0  #: orders the exchange no longer knows (-2013)
    audited: int = 0  #: audit rows written (unchanged answers are not audited again)
    invalid: int = 0  #: answers that could not be parsed
    positions: int = 0  #: position rows the snapshot made newer (closed ones set to zero included)
    balances: int = 0  #: balance rows the snapshot made newer
    requests: int = 0  #: REST requests sent
    weight: int = 0  #: request weight they cost
    error: str | None = None  #: what went wrong, when status is not ok
    retry_after_s: float | None = None  #: after a 429/418: seconds until Binance may be called again
    #: gap sweep: the symbols whose order history was read (evidence of a change the stream did not deliver)
    history_symbols: list[str] = field(default_factory=list)
    #: gap sweep: the history of the symbols a full sweep reads is left to a background ``history`` sweep
    history_deferred: bool = False
    transition_list: list[orders.Transition] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        text = (
            f"account={self.account_id} name={self.account_name} mode={self.mode} status={self.status}"
            f" checked={self.checked} updated={self.updated} transitions={self.transitions}"
            f" not_found={self.not_found} positions={self.positions} balances={self.balances}"
            f" requests={self.requests} weight={self.weight}"
        )
        if self.shadow:
            text += " shadow=yes"
        if self.history_deferred:
            text += " history=deferred"
        if self.error:
            text += f" error={self.error!r}"
        return text


# -- when a full sweep is due ----------------------------------------------------------------------


def _fresh_heartbeat(settings: Settings, account_id: int) -> tuple[dict[str, Any], float] | None:
    """This host's user-data child's heartbeat for the account and the child's start (epoch s), None when
    it is missing, unreadable or stale (older than ``supervisor.heartbeat_timeout_s``)."""
    key = runfiles.child_key(USER_DATA_ROLE, account_id)
    hb = runfiles.read_heartbeat(runfiles.heartbeat_path(settings.run_dir, key))
    if not hb:
        return None
    try:
        ts, started = float(hb["ts"]), float(hb["started"])
    except (KeyError, TypeError, ValueError):
        return None
    if time.time() - ts > settings.supervisor.heartbeat_timeout_s:
        return None
    return dict(hb), started


def _continuous_since(fresh: tuple[dict[str, Any], float] | None, since_ms: int) -> bool:
    """Has this host's user-data child for the account (its ``_fresh_heartbeat``) been alive since
    ``since_ms``?

    False when its heartbeat is missing, stale (older than ``supervisor.heartbeat_timeout_s``), not
    ``streaming`` (connecting, in backoff, fatal: frames are being lost right now), or the child
    started after ``since_ms``: it restarted, so frames may be lost in between.
    """
    if fresh is None or fresh[0].get("state") != STREAMING_STATE:
        return False
    return fresh[1] * 1000 <= since_ms


def _dark_for_s(fresh: tuple[dict[str, Any], float] | None) -> float | None:
    """Seconds the child of this heartbeat (``_fresh_heartbeat``) has been reconnecting
    (``RECONNECTING_STATES``, the heartbeat's ``dark_since``); None when it is streaming, gone, stale or in
    another state."""
    if fresh is None or fresh[0].get("state") not in RECONNECTING_STATES:
        return None
    fields = fresh[0].get("fields")
    try:
        dark_since = float(fields["dark_since"]) if isinstance(fields, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
    return None if dark_since is None else max(0.0, time.time() - dark_since)


def choose_mode(settings: Settings, account_id: int, now_ms: int | None = None) -> str:
    """``auto`` resolved: full when one is due or the stream may have missed frames, else targeted.

    A stream reconnecting for no longer than ``supervisor.gap_sweep_max_s`` gets targeted: the sweep its
    reconnect queues reads what the gap hid (the gap sweep), and a full sweep now would only do it twice (after
    a mass drop, for every account still waiting for a connection token)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    last = runfiles.last_full_sweep_ms(settings.run_dir, account_id)
    if last is None or now_ms - last >= settings.supervisor.sync_full_interval_s * 1000:
        return "full"
    fresh = _fresh_heartbeat(settings, account_id)
    dark_s = _dark_for_s(fresh)
    if dark_s is not None and dark_s <= settings.supervisor.gap_sweep_max_s:
        return "targeted"
    if not _continuous_since(fresh, last):
        return "full"
    return "targeted"


# -- one account ------------------------------------------------------------------------------------


def _frame_id(account_id: int, kind: str, data: dict[str, Any]) -> str:
    if kind == "algo":
        oid, status = data.get("algoId"), data.get("algoStatus")
    else:
        oid, status = data.get("orderId"), data.get("status")
    updated = data.get("updateTime") or data.get("time") or data.get("createTime")
    return f"rest:{account_id}:{kind}:{oid}:{updated}:{status}"


def _json(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


class _Sweep:
    """The REST half of one reconciliation: collects answers, never touches the database."""

    def __init__(self, rest: BinanceRest, result: ReconcileResult) -> None:
        self.rest = rest
        self.result = result
        #: (kind, id) -> the newest answer seen in this sweep
        self.fetched: dict[tuple[str, int], _Fetched] = {}
        self.listed_regular: set[int] = set()
        self.listed_algo: set[int] = set()
        self.snapshots: list[_Snapshot] = []

    def snapshot(self, kind: str, fetch: Callable[[], list[dict[str, Any]]]) -> _Snapshot:
        data = fetch()
        snap = _Snapshot(kind, data, self.rest.sent_at_ms, datetime.now(UTC))
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
            if prev is None or _update_time(data) >= _update_time(prev.data):
                self.fetched[(kind, oid)] = _Fetched(kind, data, now)

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


def _update_time(data: dict[str, Any]) -> int:
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


def _fetch(
    conn: Any,
    settings: Settings,
    account: Account,
    sweep: _Sweep,
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
    sweep: _Sweep,
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
    sweep.snapshots.append(_Snapshot("balances", balances, asked_at_ms, received_at))

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
    conn: Any, settings: Settings, account: Account, sweep: _Sweep, since_ms: int, symbols: list[str] | None
) -> None:
    """The background history sweep a gap sweep deferred (``supervisor.gap_sweep_history = "deferred"``):
    allOrders + allAlgoOrders (10) from the gap start on ``symbols`` (None: ``history_symbols``): what was
    placed *and* ended inside the gap, which the gap sweep's account call cannot show."""
    if symbols is None:
        symbols = history_symbols(conn, settings, account.id)
    sweep.result.history_symbols = symbols
    window_ms = since_ms + sweep.rest.time_offset_ms - HISTORY_OVERLAP_MS
    _read_histories(account.id, sweep, symbols, window_ms)


def _read_histories(account_id: int, sweep: _Sweep, symbols: list[str], since_ms: int) -> None:
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


def _list_by_symbol(sweep: _Sweep, kind: str, symbols: set[str], call: Any) -> None:
    if len(symbols) >= NO_SYMBOL_WEIGHT:
        sweep.add(kind, call(), listed=True)
        return
    for symbol in sorted(symbols):
        sweep.add(kind, call(symbol), listed=True)


def _follow_triggered(conn: Any, account_id: int, sweep: _Sweep) -> None:
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


def _write(conn: Any, settings: Settings, account: Account, sweep: _Sweep, result: ReconcileResult) -> None:
    """Audit every answer and (unless shadow) apply it, in one transaction; then run observers."""
    transitions: list[orders.Transition] = []
    try:
        with conn.cursor() as cur:
            # rows are locked in (kind, id) order: two reconciliations of one account never deadlock
            for (kind, _), fetched in sorted(sweep.fetched.items(), key=lambda kv: kv[0]):
                result.checked += 1
                error = None
                state: OrderState | None = None
                try:
                    parse = algo_from_rest if kind == "algo" else order_from_rest
                    state = parse(account.id, fetched.data)
                except FrameError as e:
                    error = str(e)
                    result.invalid += 1
                    log.warning("account %s: unusable %s REST result: %s", account.id, kind, e)
                outcome = "error" if state is None else ("shadow" if result.shadow else "processed")
                frame_id = _frame_id(account.id, kind, fetched.data)
                if audit.write(
                    cur,
                    frame_id=frame_id,
                    account_id=account.id,
                    source="rest",
                    event_type="REST_ALGO_ORDER" if kind == "algo" else "REST_ORDER",
                    event_time_ms=_update_time(fetched.data) or None,
                    payload_text=_json(fetched.data),
                    received_at=fetched.received_at,
                    outcome=outcome,
                    error=error,
                ):
                    result.audited += 1
                if state is None or result.shadow:
                    continue
                current = orders.current_for_update(cur, state)
                changed = current is None or orders.is_newer(current, state)
                transition = orders.apply_order_update(cur, state, frame_id=frame_id)
                if changed:
                    result.updated += 1
                if transition is not None:
                    transitions.append(transition)
            for snap in sweep.snapshots:
                _write_snapshot(cur, account.id, snap, result)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    transitions.sort(key=lambda t: (t.new.get("last_transaction_time_ms") or 0, t.new.get("id") or 0))
    result.transitions = len(transitions)
    result.transition_list = transitions
    if transitions:
        run_observers(settings, transitions)


def _snapshot_frame_id(account_id: int, snap: _Snapshot) -> str:
    fields = _SNAPSHOT_IDENTITY[snap.kind]
    identity = sorted(_json([item.get(f) for f in fields]) for item in snap.data)
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
    return f"rest:{account_id}:{snap.kind}:{digest}"


def _write_snapshot(cur: Any, account_id: int, snap: _Snapshot, result: ReconcileResult) -> None:
    """Audit one positions/balances answer and (unless shadow) apply it through the monotonic write.

    A snapshot is used whole or not at all: one unusable item and nothing of it is applied (it also
    says which positions are gone, which a partial one cannot)."""
    result.checked += 1
    error = None
    positions = balances = None
    try:
        if snap.kind == "positions":
            positions = positions_from_rest(snap.data, snap.asked_at_ms)
        else:
            balances = balances_from_rest(snap.data, snap.asked_at_ms)
    except FrameError as e:
        error = str(e)
        result.invalid += 1
        log.warning("account %s: unusable %s REST result: %s", account_id, snap.kind, e)
    outcome = "error" if error else ("shadow" if result.shadow else "processed")
    if audit.write(
        cur,
        frame_id=_snapshot_frame_id(account_id, snap) + (":error" if error else ""),
        account_id=account_id,
        source="rest",
        event_type="REST_POSITIONS" if snap.kind == "positions" else "REST_BALANCES",
        event_time_ms=snap.asked_at_ms or None,
        payload_text=_json(snap.data),
        received_at=snap.received_at,
        outcome=outcome,
        error=error,
    ):
        result.audited += 1
    if result.shadow:
        return
    # one writer of an account's state at a time (the stream's ACCOUNT_UPDATEs take the same lock), and
    # rows in key order, as the orders above
    account_state.lock_account_state(cur, account_id)
    if positions is not None:
        positions.sort(key=lambda pt: (pt[0].symbol, pt[0].position_side))
        result.positions += account_state.upsert_positions(cur, account_id, positions)
        present = {(p.symbol, p.position_side) for p, _ in positions}
        result.positions += account_state.zero_absent_positions(cur, account_id, present, snap.asked_at_ms)
    if balances is not None:
        balances.sort(key=lambda bt: bt[0].asset)
        result.balances += account_state.upsert_balances(cur, account_id, balances)


def reconcile_account(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    rest: BinanceRest | None = None,
    mode: str = "full",
    gap_start_ms: int | None = None,
    history: list[str] | None = None,
) -> ReconcileResult:
    """Reconcile one account's orders with the exchange; see the module docstring for the modes.
    ``history``: mode ``history``'s symbols when the caller has them already (else ``history_symbols``).

    Never raises for exchange or network trouble (the result's ``status``/``error`` say what went
    wrong); database errors propagate after a rollback.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("gap", "history") and gap_start_ms is None:
        raise ValueError(f"mode {mode!r} needs gap_start_ms")
    return reconcile_with(
        conn, settings, account, rest=rest, mode=mode, gap_start_ms=gap_start_ms, history=history
    )


def mode_for_gap(settings: Settings, gap_start_ms: int | None, now_ms: int | None = None) -> str:
    """The sweep after a reconnect: ``gap`` for a known gap up to ``supervisor.gap_sweep_max_s`` long
    (0: never), else ``full`` (the gap is unknown, or so long that only a full sweep is sure)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    max_ms = settings.supervisor.gap_sweep_max_s * 1000
    if gap_start_ms is None or max_ms <= 0 or not 0 <= now_ms - gap_start_ms <= max_ms:
        return "full"
    return "gap"


def reconcile_with(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    rest: BinanceRest | None,
    mode: str,
    gap_start_ms: int | None = None,
    history: list[str] | None = None,
) -> ReconcileResult:
    started_ms = int(time.time() * 1000)
    result = ReconcileResult(account.id, account.name)
    result.mode = choose_mode(settings, account.id, started_ms) if mode == "auto" else mode
    result.shadow = not settings.user_data_stream.binance.dispatched_executions
    own_client = rest is None
    client = rest if rest is not None else BinanceRest.for_account(settings, account)
    requests_before, weight_before = client.requests_sent, client.weight_spent
    sweep = _Sweep(client, result)
    try:
        try:
            _fetch(conn, settings, account, sweep, gap_start_ms, history)
        except InvalidCredentials as e:
            result.status, result.error = ReconcileStatus.INVALID_CREDENTIALS, str(e)
            log.error("account %s (%s): %s: marked invalid, skipped", account.id, account.name, e)
            mark_credentials_invalid(conn, account.id, str(e))
            return result
        except RateLimited as e:
            result.status, result.error = ReconcileStatus.RATE_LIMITED, str(e)
            result.retry_after_s = e.retry_after_s
            log.warning("account %s: %s: no more calls for it this cycle", account.id, e)
        except TransientError as e:
            result.status, result.error = ReconcileStatus.TRANSIENT, str(e)
            log.warning("account %s: %s: retried next cycle", account.id, e)
        except BinanceError as e:
            result.status, result.error = ReconcileStatus.ERROR, str(e)
            log.error("account %s: %s", account.id, e)
        if sweep.fetched or sweep.snapshots:
            _write(conn, settings, account, sweep, result)
        if result.status is ReconcileStatus.OK and result.mode == "full":
            runfiles.remember_full_sweep(settings.run_dir, account.id, started_ms)
        return result
    finally:
        result.requests = client.requests_sent - requests_before
        result.weight = client.weight_spent - weight_before
        if own_client:
            client.close()
