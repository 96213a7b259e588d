"""REST reconciliation: the safety net that closes gaps the user-data stream cannot.

Frames lost while a stream reconnects (or after a listenKey expiry) are gone for good; only REST can
tell what happened meanwhile. ``reconcile_account`` asks Binance about the account's orders and writes
every answer through the same ordered, idempotent update as the stream
(``kraite_mp.store.orders.apply_order_update``), so the newer state always wins and a stale REST answer
never overwrites a newer streamed one. Every REST result is audited once into ``api_data_stream``
(source ``rest``, frame id ``rest:<account>:<kind>:<id>:<updateTime>:<status>``, so an unchanged order
is not audited again), and observers run after COMMIT for the transitions found, as for streamed ones.

Sweeps and their cost (request weight, PROTOCOL.md: openOrders/openAlgoOrders cost 1 with a symbol,
40 without; order/algoOrder 1; allOrders 5):

``full`` -- correct first; the default of ``reconcile_account`` (so the on-demand reconcile after a
  reconnect or listenKey expiry is always complete):
  1. ``openOrders`` and ``openAlgoOrders`` without symbol (40 + 40): every open order, including ones
     the database never saw (their NEW frame was lost);
  2. ``allOrders`` (5 per symbol) since the previous full sweep, for the symbols the account was
     active on (orders in that window, open orders, open positions): orders that were placed *and*
     ended inside the gap;
  3. ``order`` / ``algoOrder`` (1 each) for every order the database holds open that the exchange
     no longer lists, and for the regular order a triggered algo order created (``actualOrderId``)
     when the database does not know how it ended.
  Cost: 80 + 5 per active symbol + 1 per missed order.

``targeted`` -- the cheap periodic check: ``openOrders``/``openAlgoOrders`` per symbol, only for the
  symbols on which the database holds open orders (a symbol count reaching 40 uses the single
  no-symbol call instead), then step 3. Cost = symbols with open regular orders + symbols with open
  algo orders (+1 per missed order): 2 for an account whose open orders sit on one symbol and
  algo orders on one symbol, 0 for an account with nothing open. Trade-off: the <= 2 goal holds only
  while an account's open orders sit on at most one symbol per kind (each further symbol costs 1),
  and a targeted sweep cannot see an order the database never heard of (that needs the 40-weight
  call or allOrders); such orders are found by the next full sweep.

``auto`` -- what the periodic sync child runs: ``full`` when the last full sweep of the account
  (remembered in ``<run_dir>/reconcile/account-<id>.json``) is older than
  ``supervisor.sync_full_interval_s`` (default 1 h), or when the account's user-data stream is not
  known healthy on this host (its heartbeat is missing, stale or not ``streaming``, or the child --
  or its connection, when it reports ``connected_since`` -- started after the last full sweep: it may
  have missed frames, and its own on-demand reconcile may not have run); ``targeted`` otherwise.
  With a 5-minute sync and a healthy stream that is 11 targeted sweeps (~2 weight each) and one
  full sweep per hour per account.

Measured (simulator, ``X-MBX-USED-WEIGHT-1M`` deltas equal the client's own accounting; one account,
60 scenario steps streamed, then 150 lost; 6 symbols): first full sweep 118 (80 + 6 x 5 allOrders + 8
lookups of algo orders that ended in the gap; 67 transitions), a repeated full sweep 110, a targeted
sweep 5 (open regular orders on 5 symbols, no open algo orders); the test
``test_nothing_missed_costs_at_most_two_weight...`` measures 2 for open orders on one symbol and algo
orders on another, 3 when a fill was missed (+1 order lookup), 0 with nothing open.

Known gap: an algo order placed *and* ended inside a gap is reachable only through
``GET /fapi/v1/allAlgoOrders``, which neither PROTOCOL.md nor the simulator has; the regular order
it created when it triggered is found (allOrders). Orders placed and ended in a gap on a symbol the
account showed no activity on in the window are not found either.

Failures stay per account: invalid credentials (-2015 and friends) mark the account
(``accounts.mark_credentials_invalid``) and the pass goes on with the next one; a 429/418 stops
the account's calls for this cycle (the client then refuses all calls to that host until
Retry-After, so the rest of the pass is skipped too, without sending anything); network errors
leave the account for the next cycle. Results fetched before a failure are still written.

Shadow mode (``user_data_stream.binance.dispatched_executions`` empty): results are audited only,
the ``orders`` table is not touched and no observer runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg2
import requests

from kraite_mp import exitcodes
from kraite_mp.binance.rest import (
    BinanceError,
    BinanceRest,
    InvalidCredentials,
    OrderNotFound,
    RateLimited,
    TransientError,
)
from kraite_mp.store import orders
from kraite_mp.store.accounts import Account, SecretKeyError, mark_credentials_invalid
from kraite_mp.supervisor.context import heartbeat_dir, read_heartbeat

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.supervisor.context import ChildContext

log = logging.getLogger(__name__)

MODES = ("full", "targeted", "auto")
#: At this many symbols one no-symbol call (weight 40) is cheaper than one call per symbol.
NO_SYMBOL_WEIGHT = 40
#: allOrders: the exchange answers at most this many orders per call ...
ALL_ORDERS_LIMIT = 1000
#: ... and looks back at most 7 days; stay a little inside that.
ALL_ORDERS_MAX_LOOKBACK_MS = 7 * 86_400_000 - 3_600_000
#: Overlap of the history window with the previous sweep (clock skew, in-flight orders).
HISTORY_OVERLAP_MS = 120_000
#: The ``--every`` loop never sleeps less than this between passes.
MIN_EVERY_S = 1.0
#: Role (and heartbeat key prefix) of the user-data stream child (issue 4).
USER_DATA_ROLE = "user-data"
#: The heartbeat state of a user-data child whose connection is up and delivering.
STREAMING_STATE = "streaming"

_OPEN_ORDERS_SQL = (
    "SELECT kind, exchange_order_id, symbol, status, actual_order_id FROM orders WHERE account_id = %s"
    " AND ((kind = 'regular' AND status = ANY(%s)) OR (kind = 'algo' AND status = ANY(%s)))"
)
_ACTIVE_SYMBOLS_SQL = (
    "SELECT DISTINCT symbol FROM orders WHERE account_id = %s AND kind = 'regular'"
    " AND last_transaction_time_ms >= %s"
    " UNION SELECT symbol FROM account_positions WHERE account_id = %s AND amount <> 0"
)
_LAST_ACTIVITY_SQL = "SELECT max(last_transaction_time_ms) FROM orders WHERE account_id = %s"
_KNOWN_REGULAR_SQL = (
    "SELECT exchange_order_id, status FROM orders WHERE account_id = %s AND kind = 'regular'"
    " AND exchange_order_id = ANY(%s)"
)
_CURRENT_SQL = (
    "SELECT status, filled_quantity, last_transaction_time_ms FROM orders"
    " WHERE account_id = %s AND kind = %s AND exchange_order_id = %s FOR UPDATE"
)
_AUDIT_SQL = (
    "INSERT INTO api_data_stream (frame_id, account_id, exchange, source, event_type, event_time_ms, payload,"
    " received_at, outcome, error) VALUES (%s, %s, 'binance', 'rest', %s, %s, %s::jsonb, %s, %s, %s)"
    " ON CONFLICT (frame_id) DO NOTHING RETURNING id"
)


@dataclass
class _Fetched:
    """One REST answer about one order."""

    kind: str  # "regular" | "algo"
    data: dict[str, Any]
    received_at: datetime


@dataclass
class SyncResult:
    """What one reconciliation of one account did (``as_dict()`` is what ``reconcile_account`` returns)."""

    account_id: int
    account_name: str
    mode: str = "full"
    status: str = "ok"  # ok | invalid_credentials | rate_limited | transient | error
    shadow: bool = False
    checked: int = 0
    updated: int = 0
    transitions: int = 0
    not_found: int = 0
    audited: int = 0
    invalid: int = 0
    requests: int = 0
    weight: int = 0
    error: str | None = None
    #: After a 429/418: seconds until Binance may be called again.
    retry_after_s: float | None = None
    transition_list: list[orders.Transition] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "account_name": self.account_name,
            "mode": self.mode,
            "status": self.status,
            "shadow": self.shadow,
            "checked": self.checked,
            "updated": self.updated,
            "transitions": self.transitions,
            "not_found": self.not_found,
            "audited": self.audited,
            "invalid": self.invalid,
            "requests": self.requests,
            "weight": self.weight,
            "error": self.error,
            "retry_after_s": self.retry_after_s,
        }

    def summary(self) -> str:
        text = (
            f"account={self.account_id} name={self.account_name} mode={self.mode} status={self.status}"
            f" checked={self.checked} updated={self.updated} transitions={self.transitions}"
            f" not_found={self.not_found} requests={self.requests} weight={self.weight}"
        )
        if self.shadow:
            text += " shadow=yes"
        if self.error:
            text += f" error={self.error!r}"
        return text


# -- sweep bookkeeping ------------------------------------------------------------------------------


def _state_path(settings: Settings, account_id: int) -> str:
    return os.path.join(settings.run_dir, "reconcile", f"account-{account_id}.json")


def last_full_sweep_ms(settings: Settings, account_id: int) -> int | None:
    """When this host last completed a full sweep of the account (epoch ms), if ever."""
    try:
        with open(_state_path(settings, account_id)) as f:
            value = json.load(f).get("last_full_ms")
        return int(value) if isinstance(value, int) else None
    except (OSError, ValueError, AttributeError):
        return None


def _remember_full_sweep(settings: Settings, account_id: int, started_ms: int) -> None:
    path = _state_path(settings, account_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"last_full_ms": started_ms}, f)
        os.replace(tmp, path)
    except OSError:
        log.warning("cannot record the full sweep of account %s in %s", account_id, path, exc_info=True)


def stream_continuous_since(settings: Settings, account_id: int, since_ms: int) -> bool:
    """Has this host's user-data child for the account been alive since ``since_ms``?

    False when its heartbeat is missing, stale (older than ``supervisor.heartbeat_timeout_s``), not
    ``streaming`` (connecting, in backoff, fatal: frames are being lost right now), or the child
    started -- or, when it reports ``connected_since`` (epoch s), its connection opened -- after
    ``since_ms``: it reconnected, so frames may be lost in between.
    """
    hb = read_heartbeat(os.path.join(heartbeat_dir(settings), f"{USER_DATA_ROLE}-{account_id}.json"))
    if not hb:
        return False
    try:
        ts, started = float(hb["ts"]), float(hb["started"])
    except (KeyError, TypeError, ValueError):
        return False
    if time.time() - ts > settings.supervisor.heartbeat_timeout_s:
        return False
    if hb.get("state") != STREAMING_STATE:
        return False
    fields = hb.get("fields")
    connected = fields.get("connected_since") if isinstance(fields, dict) else None
    if isinstance(connected, int | float) and not isinstance(connected, bool):
        started = max(started, float(connected))
    return started * 1000 <= since_ms


def choose_mode(settings: Settings, account_id: int, now_ms: int | None = None) -> str:
    """``auto`` resolved: full when one is due or the stream may have missed frames, else targeted."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    last = last_full_sweep_ms(settings, account_id)
    if last is None or now_ms - last >= settings.supervisor.sync_full_interval_s * 1000:
        return "full"
    if not stream_continuous_since(settings, account_id, last):
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

    def __init__(self, rest: BinanceRest, result: SyncResult) -> None:
        self.rest = rest
        self.result = result
        #: (kind, id) -> the newest answer seen in this sweep
        self.fetched: dict[tuple[str, int], _Fetched] = {}
        self.listed_regular: set[int] = set()
        self.listed_algo: set[int] = set()

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
        try:
            self.add("regular", [self.rest.order(symbol, order_id=order_id)])
        except OrderNotFound:
            self.result.not_found += 1
            log.warning("account %s: order %s (%s) is unknown to the exchange (-2013): left as it is",
                        self.result.account_id, order_id, symbol)

    def lookup_algo(self, algo_id: int) -> None:
        try:
            self.add("algo", [self.rest.algo_order(algo_id=algo_id)])
        except OrderNotFound:
            self.result.not_found += 1
            log.warning("account %s: algo order %s is unknown to the exchange (-2013): left as it is",
                        self.result.account_id, algo_id)


def _update_time(data: dict[str, Any]) -> int:
    for key in ("updateTime", "time", "createTime"):
        try:
            return int(data[key])
        except (KeyError, TypeError, ValueError):
            continue
    return 0


def _db_open_orders(conn: Any, account_id: int) -> list[tuple[str, int, str, str, int | None]]:
    with conn.cursor() as cur:
        cur.execute(
            _OPEN_ORDERS_SQL,
            (account_id, list(orders.OPEN_STATUSES["regular"]), list(orders.OPEN_STATUSES["algo"])),
        )
        rows = cur.fetchall()
    conn.commit()
    return [(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]


def _history_window(conn: Any, settings: Settings, account_id: int, now_ms: int) -> int | None:
    """Start (ms) of the allOrders window: the previous full sweep, else the last activity we know of."""
    since = last_full_sweep_ms(settings, account_id)
    if since is None:
        with conn.cursor() as cur:
            cur.execute(_LAST_ACTIVITY_SQL, (account_id,))
            row = cur.fetchone()
        conn.commit()
        since = row[0] if row and row[0] is not None else None
    if since is None:
        return None  # nothing known about this account yet: its open orders are all we need
    return max(int(since) - HISTORY_OVERLAP_MS, now_ms - ALL_ORDERS_MAX_LOOKBACK_MS)


def _active_symbols(conn: Any, account_id: int, since_ms: int) -> set[str]:
    with conn.cursor() as cur:
        cur.execute(_ACTIVE_SYMBOLS_SQL, (account_id, since_ms, account_id))
        rows = cur.fetchall()
    conn.commit()
    return {r[0] for r in rows if r[0]}


def _fetch(conn: Any, settings: Settings, account: Account, sweep: _Sweep) -> None:
    """All REST calls of one sweep. Raises BinanceError subclasses; what was fetched stays in the sweep."""
    rest, result = sweep.rest, sweep.result
    db_open = _db_open_orders(conn, account.id)
    regular_symbols = {sym for kind, _, sym, _, _ in db_open if kind == "regular"}
    algo_symbols = {sym for kind, _, sym, _, _ in db_open if kind == "algo"}
    # a TRIGGERED algo is consistent while the regular order it created is open: list that symbol too
    regular_symbols |= {sym for kind, _, sym, status, _ in db_open if kind == "algo" and status == "TRIGGERED"}

    if result.mode == "full":
        sweep.add("regular", rest.open_orders(), listed=True)
        sweep.add("algo", rest.open_algo_orders(), listed=True)
        now_ms = int(time.time() * 1000)
        since = _history_window(conn, settings, account.id, now_ms)
        if since is not None:
            symbols = _active_symbols(conn, account.id, since) | regular_symbols
            symbols |= {str(f.data["symbol"]) for f in sweep.fetched.values() if f.data.get("symbol")}
            for symbol in sorted(symbols):
                history = rest.all_orders(symbol, start_time_ms=since, limit=ALL_ORDERS_LIMIT)
                if len(history) >= ALL_ORDERS_LIMIT:
                    log.warning("account %s: %s has %d+ orders since the last sweep: older ones not checked",
                                account.id, symbol, ALL_ORDERS_LIMIT)
                sweep.add("regular", history)
    else:
        _list_by_symbol(sweep, "regular", regular_symbols, rest.open_orders)
        _list_by_symbol(sweep, "algo", algo_symbols, rest.open_algo_orders)

    # orders the database holds open that the exchange no longer lists: ask for their final state
    for kind, oid, symbol, status, actual in db_open:
        if kind == "regular":
            if oid not in sweep.listed_regular and ("regular", oid) not in sweep.fetched:
                sweep.lookup_order(symbol, oid)
        elif oid not in sweep.listed_algo and ("algo", oid) not in sweep.fetched:
            if status == "TRIGGERED" and actual is not None and actual in sweep.listed_regular:
                continue  # waiting for its (open) regular order: nothing missed
            sweep.lookup_algo(oid)

    _follow_triggered(conn, account.id, sweep)


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
    with conn.cursor() as cur:
        cur.execute(_KNOWN_REGULAR_SQL, (account_id, list(wanted)))
        known = {int(r[0]): r[1] for r in cur.fetchall()}
    conn.commit()
    for oid, symbol in sorted(wanted.items()):
        status = known.get(oid)
        if status is not None and orders.is_terminal("regular", status):
            continue  # the stream saw it end
        if status is not None and oid in sweep.listed_regular:
            continue
        sweep.lookup_order(symbol, oid)


def _write(conn: Any, settings: Settings, account: Account, sweep: _Sweep, result: SyncResult) -> None:
    """Audit every answer and (unless shadow) apply it, in one transaction; then run observers."""
    transitions: list[orders.Transition] = []
    try:
        with conn.cursor() as cur:
            # rows are locked in (kind, id) order: two reconciliations of one account never deadlock
            for (kind, _), fetched in sorted(sweep.fetched.items(), key=lambda kv: kv[0]):
                result.checked += 1
                error = None
                state: orders.OrderState | None = None
                try:
                    parse = orders.algo_from_rest if kind == "algo" else orders.order_from_rest
                    state = parse(account.id, fetched.data)
                except orders.FrameError as e:
                    error = str(e)
                    result.invalid += 1
                    log.warning("account %s: unusable %s REST result: %s", account.id, kind, e)
                outcome = "error" if state is None else ("shadow" if result.shadow else "processed")
                frame_id = _frame_id(account.id, kind, fetched.data)
                cur.execute(
                    _AUDIT_SQL,
                    (
                        frame_id, account.id, "REST_ALGO_ORDER" if kind == "algo" else "REST_ORDER",
                        _update_time(fetched.data) or None, _json(fetched.data), fetched.received_at, outcome, error,
                    ),
                )
                if cur.fetchone() is not None:
                    result.audited += 1
                if state is None or result.shadow:
                    continue
                cur.execute(_CURRENT_SQL, (account.id, state.kind, state.exchange_order_id))
                row = cur.fetchone()
                changed = row is None or orders.is_newer(
                    {"status": row[0], "filled_quantity": row[1], "last_transaction_time_ms": row[2]}, state
                )
                transition = orders.apply_order_update(cur, state, frame_id=frame_id)
                if changed:
                    result.updated += 1
                if transition is not None:
                    transitions.append(transition)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    transitions.sort(key=lambda t: (t.new.get("last_transaction_time_ms") or 0, t.new.get("id") or 0))
    result.transitions = len(transitions)
    result.transition_list = transitions
    if transitions:
        orders.run_observers(settings, transitions)


def reconcile_account(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    rest: BinanceRest | None = None,
    mode: str = "full",
) -> dict[str, Any]:
    """Reconcile one account's orders with the exchange; see the module docstring for the modes.

    Never raises for exchange or network trouble (the result's ``status``/``error`` say what went
    wrong); database errors propagate after a rollback.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _reconcile(conn, settings, account, rest=rest, mode=mode).as_dict()


def _reconcile(conn: Any, settings: Settings, account: Account, *, rest: BinanceRest | None, mode: str) -> SyncResult:
    started_ms = int(time.time() * 1000)
    result = SyncResult(account.id, account.name)
    result.mode = choose_mode(settings, account.id, started_ms) if mode == "auto" else mode
    result.shadow = not settings.user_data_stream.binance.dispatched_executions
    own_client = rest is None
    client = rest if rest is not None else BinanceRest.for_account(settings, account)
    requests_before, weight_before = client.requests_sent, client.weight_spent
    sweep = _Sweep(client, result)
    try:
        try:
            _fetch(conn, settings, account, sweep)
        except InvalidCredentials as e:
            result.status, result.error = "invalid_credentials", str(e)
            log.error("account %s (%s): %s: marked invalid, skipped", account.id, account.name, e)
            mark_credentials_invalid(conn, account.id, str(e))
            return result
        except RateLimited as e:
            result.status, result.error, result.retry_after_s = "rate_limited", str(e), e.retry_after_s
            log.warning("account %s: %s: no more calls for it this cycle", account.id, e)
        except TransientError as e:
            result.status, result.error = "transient", str(e)
            log.warning("account %s: %s: retried next cycle", account.id, e)
        except BinanceError as e:
            result.status, result.error = "error", str(e)
            log.error("account %s: %s", account.id, e)
        if sweep.fetched:
            _write(conn, settings, account, sweep, result)
        if result.status == "ok" and result.mode == "full":
            _remember_full_sweep(settings, account.id, started_ms)
        return result
    finally:
        result.requests = client.requests_sent - requests_before
        result.weight = client.weight_spent - weight_before
        if own_client:
            client.close()


# -- the periodic child and the CLI -----------------------------------------------------------------


def reconcile_accounts(
    conn: Any,
    settings: Settings,
    accounts: list[Account],
    *,
    mode: str,
    stop: threading.Event,
    on_result: Any = None,
) -> list[SyncResult]:
    """One pass over ``accounts`` (one shared HTTP session); stops early on ``stop`` or a 429/418."""
    results: list[SyncResult] = []
    with requests.Session() as session:
        for index, account in enumerate(accounts):
            if stop.is_set():
                break
            try:
                client = BinanceRest.for_account(settings, account, session=session, stop=stop)
            except SecretKeyError as e:  # wrong KRAITE_SECRET_KEY: no account can be read, say it once each
                result = SyncResult(account.id, account.name, status="error", error=str(e))
                log.error("account %s: %s", account.id, e)
                results.append(result)
                if on_result is not None:
                    on_result(index, result)
                continue
            left = client.blocked_for_s()
            if left > 0:
                log.warning("Binance refuses calls for %.0fs more (429/418): %d account(s) left for the next pass",
                            left, len(accounts) - index)
                break
            try:
                result = _reconcile(conn, settings, account, rest=client, mode=mode)
            except psycopg2.Error as e:
                if conn.closed:
                    raise  # the connection is gone: the caller decides (the child exits TEMPFAIL)
                conn.rollback()
                log.error("account %s: database error, its results are dropped for this pass: %s",
                          account.id, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                result = SyncResult(account.id, account.name, status="error", error=f"database: {type(e).__name__}")
            results.append(result)
            if on_result is not None:
                on_result(index, result)
    return results


def run_sync_child(ctx: ChildContext) -> int:
    """One reconciliation pass (mode auto) over the accounts this supervisor owns; exit 0."""
    from kraite_mp.store.db import DatabaseUnavailable, connect
    from kraite_mp.supervisor.ownership import owned_accounts

    settings = ctx.settings
    try:
        conn = connect(settings.database_url, application_name="kraite-mp sync")
    except DatabaseUnavailable as e:
        ctx.fail(str(e))
        log.error("%s", e)
        return exitcodes.EXIT_TEMPFAIL
    try:
        accounts = owned_accounts(conn, settings)
        total = len(accounts)
        ctx.beat("syncing", force=True, accounts=f"0/{total}")

        def progress(index: int, result: SyncResult) -> None:
            ctx.beat("syncing", accounts=f"{index + 1}/{total}", weight=result.weight)
            log.info("%s", result.summary())

        try:
            results = reconcile_accounts(conn, settings, accounts, mode="auto", stop=ctx.stop, on_result=progress)
        except psycopg2.OperationalError as e:
            ctx.fail(f"PostgreSQL connection lost: {type(e).__name__}")
            log.error("PostgreSQL connection lost during the sync pass: %s", e)
            return exitcodes.EXIT_TEMPFAIL
        failed = [r for r in results if r.status != "ok"]
        ctx.beat(
            "done", force=True, accounts=f"{len(results)}/{total}", failed=len(failed),
            weight=sum(r.weight for r in results), transitions=sum(r.transitions for r in results),
        )
        return exitcodes.EXIT_OK
    finally:
        conn.close()


__all__ = [
    "MODES",
    "SyncResult",
    "choose_mode",
    "reconcile_account",
    "reconcile_accounts",
    "run_sync_child",
    "stream_continuous_since",
]
