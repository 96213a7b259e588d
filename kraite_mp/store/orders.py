"""The one ordered, idempotent order update, shared by the stream job and REST reconciliation.

Messages arrive out of order and more than once (several worker threads, retries, REST results
racing stream frames). An observation replaces the stored order only when it is strictly newer by
``(transaction time T, cumulative filled quantity, status rank)``, and never when it would move a
terminal order back to an open status or lower its filled quantity. Equal keys are a no-op, so a
redelivered frame changes nothing. ``last_trade_id`` is the highest trade id seen, whatever the order. Prices and quantities stay ``Decimal`` end to end.

Every status change (and every first sighting) writes an ``order_transitions`` row inside the
caller's transaction and returns a ``Transition``; after COMMIT the caller hands the transitions to
``run_observers``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

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
TERMINAL_RANK = 3
#: Statuses in which reconciliation still expects the exchange to list the order as open.
OPEN_STATUSES: dict[str, tuple[str, ...]] = {
    "regular": ("NEW", "PARTIALLY_FILLED"),
    "algo": ("NEW", "TRIGGERING", "TRIGGERED"),
}


class FrameError(ValueError):
    """A frame or REST result lacks what an order observation needs (audited, never retried)."""


def status_rank(kind: str, status: str) -> int:
    table = ALGO_RANK if kind == "algo" else REGULAR_RANK
    return table.get(status, 0)


def is_terminal(kind: str, status: str) -> bool:
    return status_rank(kind, status) >= TERMINAL_RANK


@dataclass(frozen=True)
class OrderState:
    """One observation of an order, from a WS frame or a REST result."""

    account_id: int
    kind: str
    exchange_order_id: int
    symbol: str
    status: str
    transaction_time_ms: int
    event_time_ms: int | None
    source: str
    client_order_id: str | None = None
    side: str | None = None
    position_side: str | None = None
    order_type: str | None = None
    time_in_force: str | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    quantity: Decimal | None = None
    #: None = this source does not say (REST algo orders); the stored value is kept.
    filled_quantity: Decimal | None = Decimal(0)
    average_price: Decimal | None = None
    reduce_only: bool | None = None
    actual_order_id: int | None = None
    execution_type: str | None = None
    trade_id: int | None = None


@dataclass(frozen=True)
class Transition:
    """A committed status change: ``old`` is None for a first sighting. Rows as column dicts."""

    old: dict[str, Any] | None
    new: dict[str, Any]
    frame_id: str | None


# -- parsing ----------------------------------------------------------------------------------------


def _dec(value: Any, field_name: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, float):  # never seen from Binance; refuse silently lossy input
        raise FrameError(f"{field_name}: float value, expected a decimal string")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise FrameError(f"{field_name}: not a decimal: {str(value)[:40]!r}") from None
    if not d.is_finite():
        raise FrameError(f"{field_name}: not finite")
    return d


def _int(value: Any, field_name: str, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise FrameError(f"{field_name}: missing")
        return None
    if isinstance(value, bool):
        raise FrameError(f"{field_name}: not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FrameError(f"{field_name}: not an integer: {str(value)[:40]!r}") from None


def _str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _req_str(data: Mapping[str, Any], key: str, field_name: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise FrameError(f"{field_name}: missing")
    return value


def _body(frame: Mapping[str, Any]) -> Mapping[str, Any]:
    body = frame.get("o")
    if not isinstance(body, Mapping):
        raise FrameError("o: missing order object")
    return body


def order_from_ws(account_id: int, frame: Mapping[str, Any]) -> OrderState:
    """ORDER_TRADE_UPDATE -> OrderState (T of the order, else of the event, orders it)."""
    o = _body(frame)
    t = _int(o.get("T"), "o.T") or _int(frame.get("T"), "T")
    if t is None:
        raise FrameError("T: missing transaction time")
    trade_id = _int(o.get("t"), "o.t")
    return OrderState(
        account_id=account_id,
        kind="regular",
        exchange_order_id=_int(o.get("i"), "o.i", required=True),  # type: ignore[arg-type]
        symbol=_req_str(o, "s", "o.s"),
        status=_req_str(o, "X", "o.X"),
        transaction_time_ms=t,
        event_time_ms=_int(frame.get("E"), "E"),
        source="ws",
        client_order_id=_str(o.get("c")),
        side=_str(o.get("S")),
        position_side=_str(o.get("ps")),
        order_type=_str(o.get("o")),
        time_in_force=_str(o.get("f")),
        price=_dec(o.get("p"), "o.p"),
        stop_price=_dec(o.get("sp"), "o.sp"),
        quantity=_dec(o.get("q"), "o.q"),
        filled_quantity=_dec(o.get("z"), "o.z") or Decimal(0),
        average_price=_dec(o.get("ap"), "o.ap"),
        reduce_only=o.get("R") if isinstance(o.get("R"), bool) else None,
        execution_type=_str(o.get("x")),
        trade_id=trade_id or None,
    )


def algo_from_ws(account_id: int, frame: Mapping[str, Any]) -> OrderState:
    """ALGO_UPDATE -> OrderState (kind algo, keyed by algo id ``aid``)."""
    o = _body(frame)
    t = _int(frame.get("T"), "T") or _int(frame.get("E"), "E")
    if t is None:
        raise FrameError("T: missing transaction time")
    status = _req_str(o, "X", "o.X")
    return OrderState(
        account_id=account_id,
        kind="algo",
        exchange_order_id=_int(o.get("aid"), "o.aid", required=True),  # type: ignore[arg-type]
        symbol=_req_str(o, "s", "o.s"),
        status=status,
        transaction_time_ms=t,
        event_time_ms=_int(frame.get("E"), "E"),
        source="ws",
        client_order_id=_str(o.get("caid")),
        side=_str(o.get("S")),
        position_side=_str(o.get("ps")),
        order_type=_str(o.get("o")),
        time_in_force=_str(o.get("f")),
        price=_dec(o.get("p"), "o.p"),
        stop_price=_dec(o.get("tp"), "o.tp"),
        quantity=_dec(o.get("q"), "o.q"),
        filled_quantity=_dec(o.get("aq"), "o.aq") or Decimal(0),
        average_price=_dec(o.get("ap"), "o.ap"),
        reduce_only=o.get("R") if isinstance(o.get("R"), bool) else None,
        actual_order_id=_int(o.get("ai"), "o.ai"),
        execution_type=f"ALGO_{status}",
    )


def order_from_rest(account_id: int, data: Mapping[str, Any]) -> OrderState:
    """GET /fapi/v1/order (or an openOrders / allOrders item) -> OrderState."""
    t = _int(data.get("updateTime"), "updateTime") or _int(data.get("time"), "time")
    if t is None:
        raise FrameError("updateTime: missing")
    return OrderState(
        account_id=account_id,
        kind="regular",
        exchange_order_id=_int(data.get("orderId"), "orderId", required=True),  # type: ignore[arg-type]
        symbol=_req_str(data, "symbol", "symbol"),
        status=_req_str(data, "status", "status"),
        transaction_time_ms=t,
        event_time_ms=None,
        source="rest",
        client_order_id=_str(data.get("clientOrderId")),
        side=_str(data.get("side")),
        position_side=_str(data.get("positionSide")),
        order_type=_str(data.get("type")),
        time_in_force=_str(data.get("timeInForce")),
        price=_dec(data.get("price"), "price"),
        stop_price=_dec(data.get("stopPrice"), "stopPrice"),
        quantity=_dec(data.get("origQty"), "origQty"),
        filled_quantity=_dec(data.get("executedQty"), "executedQty") or Decimal(0),
        average_price=_dec(data.get("avgPrice"), "avgPrice"),
        reduce_only=data.get("reduceOnly") if isinstance(data.get("reduceOnly"), bool) else None,
    )


def algo_from_rest(account_id: int, data: Mapping[str, Any]) -> OrderState:
    """GET /fapi/v1/algoOrder (or an openAlgoOrders item) -> OrderState.

    The algo service reports no executed quantity of its own (the fill lives on the regular order
    ``actualOrderId``), so ``filled_quantity`` is None (keep what the stream said) unless given.
    """
    t = _int(data.get("updateTime"), "updateTime") or _int(data.get("createTime"), "createTime")
    if t is None:
        raise FrameError("updateTime: missing")
    status = _req_str(data, "algoStatus", "algoStatus")
    executed = data.get("executedQty", data.get("aq"))
    return OrderState(
        account_id=account_id,
        kind="algo",
        exchange_order_id=_int(data.get("algoId"), "algoId", required=True),  # type: ignore[arg-type]
        symbol=_req_str(data, "symbol", "symbol"),
        status=status,
        transaction_time_ms=t,
        event_time_ms=None,
        source="rest",
        client_order_id=_str(data.get("clientAlgoId")),
        side=_str(data.get("side")),
        position_side=_str(data.get("positionSide")),
        order_type=_str(data.get("orderType")),
        time_in_force=_str(data.get("timeInForce")),
        price=_dec(data.get("price"), "price"),
        stop_price=_dec(data.get("triggerPrice"), "triggerPrice"),
        quantity=_dec(data.get("quantity"), "quantity"),
        filled_quantity=_dec(executed, "executedQty"),
        average_price=_dec(data.get("actualPrice"), "actualPrice") or _dec(data.get("avgPrice"), "avgPrice"),
        reduce_only=data.get("reduceOnly") if isinstance(data.get("reduceOnly"), bool) else None,
        actual_order_id=_int(data.get("actualOrderId"), "actualOrderId"),
        execution_type=f"ALGO_{status}",
    )


def dispatch_key(frame: Mapping[str, Any]) -> str | None:
    """The allowlist key of a frame: ``x`` for ORDER_TRADE_UPDATE, ``ALGO_<X>`` for ALGO_UPDATE.

    A FINISHED algo order with an executed quantity > 0 is ``ALGO_FILLED``. Other events: None.
    """
    event = frame.get("e")
    body = frame.get("o")
    if not isinstance(body, Mapping):
        return None
    if event == "ORDER_TRADE_UPDATE":
        x = body.get("x")
        return x if isinstance(x, str) else None
    if event == "ALGO_UPDATE":
        status = body.get("X")
        if not isinstance(status, str):
            return None
        if status == "FINISHED":
            try:
                if Decimal(str(body.get("aq") or "0")) > 0:
                    return "ALGO_FILLED"
            except InvalidOperation:
                pass
        return f"ALGO_{status}"
    return None


# -- the update -------------------------------------------------------------------------------------

#: Stored columns, in SELECT order.
_ORDER_COLUMNS = (
    "id", "account_id", "exchange", "kind", "exchange_order_id", "client_order_id", "symbol", "side",
    "position_side", "order_type", "time_in_force", "status", "price", "stop_price", "quantity",
    "filled_quantity", "average_price", "reduce_only", "actual_order_id", "last_execution_type",
    "last_trade_id", "last_transaction_time_ms", "last_event_time_ms", "last_source",
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


def apply_order_update(cur: Any, state: OrderState, *, frame_id: str | None) -> Transition | None:
    """Upsert ``state`` inside the caller's transaction; return the status change, if any."""
    cur.execute(_SELECT_FOR_UPDATE, (state.account_id, state.kind, state.exchange_order_id))
    row = cur.fetchone()
    if row is None:
        cur.execute(
            _INSERT,
            (
                state.account_id, state.kind, state.exchange_order_id, state.client_order_id, state.symbol,
                state.side, state.position_side, state.order_type, state.time_in_force, state.status, state.price,
                state.stop_price, state.quantity, state.filled_quantity or Decimal(0), state.average_price,
                state.reduce_only, state.actual_order_id, state.execution_type, state.trade_id,
                state.transaction_time_ms, state.event_time_ms, state.source,
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
        if state.trade_id is not None and (old["last_trade_id"] is None or state.trade_id > old["last_trade_id"]):
            cur.execute(_RAISE_TRADE_ID, (state.trade_id, old["id"]))
        return None
    filled = old["filled_quantity"] if state.filled_quantity is None else state.filled_quantity
    cur.execute(
        _UPDATE,
        (
            state.client_order_id, state.symbol, state.side, state.position_side, state.order_type,
            state.time_in_force, state.status, state.price, state.stop_price, state.quantity, filled,
            state.average_price, state.reduce_only, state.actual_order_id, state.execution_type, state.trade_id,
            state.transaction_time_ms, state.event_time_ms, state.source, old["id"],
        ),
    )
    new = dict(zip(_ORDER_COLUMNS, cur.fetchone(), strict=True))
    if new["status"] == old["status"]:
        return None
    _record_transition(cur, old, new, state, frame_id)
    return Transition(old=old, new=new, frame_id=frame_id)


def _record_transition(cur: Any, old: Mapping[str, Any] | None, new: Mapping[str, Any], state: OrderState,
                       frame_id: str | None) -> None:
    cur.execute(
        _INSERT_TRANSITION,
        (
            new["id"], state.account_id, old["status"] if old else None, new["status"], state.execution_type,
            state.transaction_time_ms, state.event_time_ms, state.source, frame_id,
        ),
    )


# -- observers --------------------------------------------------------------------------------------

Observer = Callable[..., Any]
_observer_cache: dict[str, tuple[Observer, bool]] = {}


def load_observer(path: str) -> tuple[Observer, bool]:
    """Resolve ``package.module.attr``; the flag says whether it accepts ``settings=``."""
    if path not in _observer_cache:
        module_name, _, attr = path.rpartition(".")
        if not module_name:
            raise ValueError(f"observer {path!r}: expected a dotted path module.attribute")
        fn = getattr(importlib.import_module(module_name), attr)
        if not callable(fn):
            raise ValueError(f"observer {path!r}: not callable")
        try:
            wants_settings = "settings" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            wants_settings = False
        _observer_cache[path] = (fn, wants_settings)
    return _observer_cache[path]


def run_observers(settings: Settings, transitions: list[Transition]) -> None:
    """Call every configured observer with (old, new) for each committed transition.

    A failing (or unloadable) observer is logged with the order id and never raises: the audit and
    the update are already committed.
    """
    for transition in transitions:
        for path in settings.jobs.observers:
            try:
                fn, wants_settings = load_observer(path)
                if wants_settings:
                    fn(transition.old, transition.new, settings=settings)
                else:
                    fn(transition.old, transition.new)
            except Exception:
                log.exception(
                    "observer %s failed for order id=%s account=%s exchange_order_id=%s",
                    path, transition.new.get("id"), transition.new.get("account_id"),
                    transition.new.get("exchange_order_id"),
                )


def order_state_fields() -> list[str]:
    return [f.name for f in fields(OrderState)]
