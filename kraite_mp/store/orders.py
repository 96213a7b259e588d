"""The one ordered, idempotent order update, shared by the stream job and REST reconciliation.

Messages arrive out of order and more than once (several worker threads, retries, REST results
racing stream frames). An observation replaces the stored order only when it is strictly newer by
``(transaction time T, cumulative filled quantity, status rank)``, and never when it would move a
terminal order back to an open status or lower its filled quantity. Equal keys are a no-op, so a
redelivered frame changes nothing. ``last_trade_id`` is the highest trade id seen, whatever the order.

Every status change (and every first sighting) writes an ``order_transitions`` row inside the
caller's transaction and returns a ``Transition``; after COMMIT the caller hands the transitions to
``kraite_mp.observers.run_observers``. Parsing lives in ``kraite_mp.binance.user``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kraite_mp.binance.orders import OrderState
from kraite_mp.store.db import execute_later

#: Regular order statuses by progress; terminal ones share the top rank.
REGULAR_RANK: dict[str, int] = {
    "NEW": 0,
    "PARTIALLY_FILLED": 1,
    "FILLED": 3,
    "CANCELED": 3,
    "EXPIRED": 3,
    "EXPIRED_IN_MATCH": 3,
    "REJECTED": 3,
}
#: Algo (conditional) order statuses: NEW -> TRIGGERING -> TRIGGERED -> FINISHED (or a dead end).
ALGO_RANK: dict[str, int] = {
    "NEW": 0,
    "TRIGGERING": 1,
    "TRIGGERED": 2,
    "FINISHED": 3,
    "CANCELED": 3,
    "REJECTED": 3,
    "EXPIRED": 3,
}
#: The shared rank of every terminal status.
TERMINAL_RANK = 3
#: Statuses in which reconciliation still expects the exchange to list the order as open.
OPEN_STATUSES: dict[str, tuple[str, ...]] = {
    "regular": ("NEW", "PARTIALLY_FILLED"),
    "algo": ("NEW", "TRIGGERING", "TRIGGERED"),
}


def status_rank(kind: str, status: str) -> int:
    table = ALGO_RANK if kind == "algo" else REGULAR_RANK
    return table.get(status, 0)


def is_terminal(kind: str, status: str) -> bool:
    return status_rank(kind, status) >= TERMINAL_RANK


@dataclass(frozen=True)
class Transition:
    """A committed status change: ``old`` is None for a first sighting. Rows as column dicts."""

    old: dict[str, Any] | None
    new: dict[str, Any]
    frame_id: str | None


#: Stored columns, in SELECT order.
_ORDER_COLUMNS = (
    "id",
    "account_id",
    "exchange",
    "kind",
    "exchange_order_id",
    "client_order_id",
    "symbol",
    "side",
    "position_side",
    "order_type",
    "time_in_force",
    "status",
    "price",
    "stop_price",
    "quantity",
    "filled_quantity",
    "average_price",
    "reduce_only",
    "actual_order_id",
    "last_execution_type",
    "last_trade_id",
    "last_transaction_time_ms",
    "last_event_time_ms",
    "last_source",
)
# Only the constant column list is concatenated; every value is a %s parameter.
_SELECT_FOR_UPDATE = (
    "SELECT " + ", ".join(_ORDER_COLUMNS) + " FROM orders"  # noqa: S608
    " WHERE account_id = %s AND kind = %s AND exchange_order_id = %s FOR UPDATE"
)
_INSERT = (
    "INSERT INTO orders (account_id, kind, exchange_order_id, client_order_id, symbol, side, position_side,"  # noqa: S608
    " order_type, time_in_force, status, price, stop_price, quantity, filled_quantity, average_price,"
    " reduce_only, actual_order_id, last_execution_type, last_trade_id, last_transaction_time_ms,"
    " last_event_time_ms, last_source)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, kind, exchange_order_id) DO NOTHING"
    " RETURNING " + ", ".join(_ORDER_COLUMNS)
)
# Fields a source does not report (None) keep their stored value.
_UPDATE = (
    "UPDATE orders SET client_order_id = COALESCE(%s, client_order_id), symbol = %s,"  # noqa: S608
    " side = COALESCE(%s, side), position_side = COALESCE(%s, position_side),"
    " order_type = COALESCE(%s, order_type), time_in_force = COALESCE(%s, time_in_force), status = %s,"
    " price = COALESCE(%s, price), stop_price = COALESCE(%s, stop_price), quantity = COALESCE(%s, quantity),"
    " filled_quantity = %s, average_price = COALESCE(%s, average_price), reduce_only = COALESCE(%s, reduce_only),"
    " actual_order_id = COALESCE(%s, actual_order_id), last_execution_type = COALESCE(%s, last_execution_type),"
    " last_trade_id = GREATEST(last_trade_id, %s), last_transaction_time_ms = %s,"
    " last_event_time_ms = COALESCE(%s, last_event_time_ms), last_source = %s, updated_at = now()"
    " WHERE id = %s RETURNING " + ", ".join(_ORDER_COLUMNS)
)
_RAISE_TRADE_ID = "UPDATE orders SET last_trade_id = GREATEST(last_trade_id, %s) WHERE id = %s"
_INSERT_TRANSITION = (
    "INSERT INTO order_transitions (order_id, account_id, from_status, to_status, execution_type,"
    " transaction_time_ms, event_time_ms, source, frame_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def is_newer(old: Mapping[str, Any], new: OrderState) -> bool:
    """Does ``new`` move the stored order ``old`` forward? (Equal = no: redelivery is a no-op.)"""
    kind = new.kind
    old_filled: Decimal = old["filled_quantity"] or Decimal(0)
    new_filled = old_filled if new.filled_quantity is None else new.filled_quantity
    if new_filled < old_filled:
        return False
    if is_terminal(kind, old["status"]) and not is_terminal(kind, new.status):
        return False
    old_key = (old["last_transaction_time_ms"] or 0, old_filled, status_rank(kind, old["status"]))
    new_key = (new.transaction_time_ms, new_filled, status_rank(kind, new.status))
    return new_key > old_key


def _observed(state: OrderState, filled: Decimal) -> tuple[Any, ...]:
    """The observed values of ``state``, with ``filled`` as its filled quantity.

    In the column order ``_INSERT`` (after the order's key) and ``_UPDATE`` (before the row id) share.
    """
    return (
        state.client_order_id,
        state.symbol,
        state.side,
        state.position_side,
        state.order_type,
        state.time_in_force,
        state.status,
        state.price,
        state.stop_price,
        state.quantity,
        filled,
        state.average_price,
        state.reduce_only,
        state.actual_order_id,
        state.execution_type,
        state.trade_id,
        state.transaction_time_ms,
        state.event_time_ms,
        state.source,
    )


def apply_order_update(cur: Any, state: OrderState, *, frame_id: str | None) -> Transition | None:
    """Upsert ``state`` inside the caller's transaction; return the status change, if any."""
    cur.execute(_SELECT_FOR_UPDATE, (state.account_id, state.kind, state.exchange_order_id))
    row = cur.fetchone()
    if row is None:
        cur.execute(
            _INSERT,
            (
                state.account_id,
                state.kind,
                state.exchange_order_id,
                *_observed(state, state.filled_quantity or Decimal(0)),
            ),
        )
        inserted = cur.fetchone()
        if inserted is not None:
            new = dict(zip(_ORDER_COLUMNS, inserted, strict=True))
            _record_transition(cur, None, new, state, frame_id)
            return Transition(old=None, new=new, frame_id=frame_id)
        # another transaction inserted it first: lock its row and compare like any update
        cur.execute(_SELECT_FOR_UPDATE, (state.account_id, state.kind, state.exchange_order_id))
        row = cur.fetchone()
    old = dict(zip(_ORDER_COLUMNS, row, strict=True))
    if not is_newer(old, state):
        # A fill that arrives after a newer frame (say its order's CANCELED) changes no state, but its
        # trade id is still the highest seen: last_trade_id must not depend on arrival order.
        if state.trade_id is not None and (
            old["last_trade_id"] is None or state.trade_id > old["last_trade_id"]
        ):
            execute_later(cur, _RAISE_TRADE_ID, (state.trade_id, old["id"]))
        return None
    filled = old["filled_quantity"] if state.filled_quantity is None else state.filled_quantity
    cur.execute(
        _UPDATE,
        (
            *_observed(state, filled),
            old["id"],
        ),
    )
    new = dict(zip(_ORDER_COLUMNS, cur.fetchone(), strict=True))
    if new["status"] == old["status"]:
        return None
    _record_transition(cur, old, new, state, frame_id)
    return Transition(old=old, new=new, frame_id=frame_id)


def _record_transition(
    cur: Any, old: Mapping[str, Any] | None, new: Mapping[str, Any], state: OrderState, frame_id: str | None
) -> None:
    execute_later(
        cur,
        _INSERT_TRANSITION,
        (
            new["id"],
            state.account_id,
            old["status"] if old else None,
            new["status"],
            state.execution_type,
            state.transaction_time_ms,
            state.event_time_ms,
            state.source,
            frame_id,
        ),
    )


# -- reads for reconciliation -------------------------------------------------------------------------

_OPEN_ORDERS_SQL = (
    "SELECT kind, exchange_order_id, symbol, status, actual_order_id FROM orders WHERE account_id = %s"
    " AND ((kind = 'regular' AND status = ANY(%s)) OR (kind = 'algo' AND status = ANY(%s)))"
)
_ACTIVE_SYMBOLS_SQL = (
    "SELECT DISTINCT symbol FROM orders WHERE account_id = %s AND last_transaction_time_ms >= %s"
    " UNION SELECT symbol FROM account_positions WHERE account_id = %s AND amount <> 0"
)
_LAST_ACTIVITY_SQL = "SELECT max(last_transaction_time_ms) FROM orders WHERE account_id = %s"
# the transaction times (o.T) of the account's ORDER_TRADE_UPDATE frames applied from the stream and received
# from %s on: the newest received before %s (the old connection's last one), the oldest received after
_STREAM_COVERAGE_SQL = (
    "SELECT max(t) FILTER (WHERE received_at < %s), min(t) FILTER (WHERE received_at >= %s) FROM ("
    "SELECT received_at, CASE WHEN payload->'o'->>'T' ~ '^[0-9]{1,15}$'"
    " THEN (payload->'o'->>'T')::bigint END AS t FROM api_data_stream"
    " WHERE account_id = %s AND source = 'ws' AND event_type = 'ORDER_TRADE_UPDATE'"
    " AND outcome = 'dispatched' AND received_at >= %s) AS f"
)
_REGULAR_STATUSES_SQL = (
    "SELECT exchange_order_id, status FROM orders WHERE account_id = %s AND kind = 'regular'"
    " AND exchange_order_id = ANY(%s)"
)
_CURRENT_SQL = (
    "SELECT status, filled_quantity, last_transaction_time_ms FROM orders"
    " WHERE account_id = %s AND kind = %s AND exchange_order_id = %s FOR UPDATE"
)


def open_orders(conn: Any, account_id: int) -> list[tuple[str, int, str, str, int | None]]:
    """(kind, exchange id, symbol, status, actual order id) of every order the database holds open."""
    with conn.cursor() as cur:
        cur.execute(
            _OPEN_ORDERS_SQL, (account_id, list(OPEN_STATUSES["regular"]), list(OPEN_STATUSES["algo"]))
        )
        rows = cur.fetchall()
    conn.commit()
    return [(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]


def active_symbols(conn: Any, account_id: int, since_ms: int) -> set[str]:
    """Symbols with order activity (regular or algo) since ``since_ms`` or an open position."""
    with conn.cursor() as cur:
        cur.execute(_ACTIVE_SYMBOLS_SQL, (account_id, since_ms, account_id))
        rows = cur.fetchall()
    conn.commit()
    return {r[0] for r in rows if r[0]}


def last_activity_ms(conn: Any, account_id: int) -> int | None:
    """The newest transaction time of any order of the account, if it has one."""
    with conn.cursor() as cur:
        cur.execute(_LAST_ACTIVITY_SQL, (account_id,))
        row = cur.fetchone()
    conn.commit()
    return int(row[0]) if row and row[0] is not None else None


def stream_coverage_ms(
    conn: Any, account_id: int, gap_start_ms: int, since_ms: int
) -> tuple[int | None, int | None]:
    """What the stream delivered around a gap that began at ``gap_start_ms`` (local wall clock: the clock
    that stamps a frame's ``received_at``), from the audit rows of the ORDER_TRADE_UPDATE frames it applied
    that were received since ``since_ms``: (the newest transaction time ``o.T`` received before the gap,
    the oldest received after it); None where no such frame is audited (yet)."""
    gap = datetime.fromtimestamp(gap_start_ms / 1000, UTC)
    since = datetime.fromtimestamp(since_ms / 1000, UTC)
    with conn.cursor() as cur:
        cur.execute(_STREAM_COVERAGE_SQL, (gap, gap, account_id, since))
        row = cur.fetchone()
    conn.commit()
    if not row:
        return None, None
    return (
        int(row[0]) if row[0] is not None else None,
        int(row[1]) if row[1] is not None else None,
    )


def regular_statuses(conn: Any, account_id: int, order_ids: list[int]) -> dict[int, str]:
    """Stored status of each of these regular orders that the database knows."""
    with conn.cursor() as cur:
        cur.execute(_REGULAR_STATUSES_SQL, (account_id, order_ids))
        known = {int(r[0]): r[1] for r in cur.fetchall()}
    conn.commit()
    return known


def current_for_update(cur: Any, state: OrderState) -> dict[str, Any] | None:
    """The stored ordering fields of the order ``state`` is about, row-locked, or None if it is new."""
    cur.execute(_CURRENT_SQL, (state.account_id, state.kind, state.exchange_order_id))
    row = cur.fetchone()
    if row is None:
        return None
    return {"status": row[0], "filled_quantity": row[1], "last_transaction_time_ms": row[2]}
