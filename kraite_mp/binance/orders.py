"""Order payloads -> ``OrderState``: ORDER_TRADE_UPDATE and ALGO_UPDATE frames, REST order results.

The stream and REST reconciliation observe the same order through these four parsers, so the store's
one ordered update can compare their observations. Each parser's docstring shows a sample payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from kraite_mp.binance.fields import (
    FrameError,
    dec,
    opt_bool,
    opt_int,
    opt_str,
    req_int,
    req_str,
)


@dataclass(frozen=True)
class OrderState:
    """One observation of an order, from a WS frame or a REST result."""

    account_id: int
    kind: str  # "regular" | "algo"
    exchange_order_id: int
    symbol: str
    status: str
    transaction_time_ms: int
    event_time_ms: int | None
    source: str  # "ws" | "rest"
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


def _body(frame: Mapping[str, Any]) -> Mapping[str, Any]:
    body = frame.get("o")
    if not isinstance(body, Mapping):
        raise FrameError("o: missing order object")
    return body


@dataclass(frozen=True)
class _Shape:
    """One of the four payload shapes: what it says about the order, and its keys."""

    #: Column in ``_BY_SHAPE``.
    column: int
    kind: str
    source: str
    #: Prefix of the field names in error texts ("o." for the order object of a frame).
    prefix: str

    def key(self, field_name: str) -> str:
        """The payload key of an OrderState field this shape shares with the other three."""
        if field_name in _BY_SOURCE:
            return _BY_SOURCE[field_name][0 if self.source == "ws" else 1]
        return _BY_SHAPE[field_name][self.column]

    def name(self, field_name: str) -> str:
        """The field as error texts name it."""
        return self.prefix + self.key(field_name)


_WS_ORDER = _Shape(0, "regular", "ws", "o.")
_WS_ALGO = _Shape(1, "algo", "ws", "o.")
_REST_ORDER = _Shape(2, "regular", "rest", "")
_REST_ALGO = _Shape(3, "algo", "rest", "")

#: Payload keys that depend on the source only: (stream, REST).
_BY_SOURCE: dict[str, tuple[str, str]] = {
    "symbol": ("s", "symbol"),
    "side": ("S", "side"),
    "position_side": ("ps", "positionSide"),
    "time_in_force": ("f", "timeInForce"),
    "price": ("p", "price"),
    "reduce_only": ("R", "reduceOnly"),
}
#: Payload keys that depend on the kind too: (ORDER_TRADE_UPDATE, ALGO_UPDATE, REST order, REST algo).
_BY_SHAPE: dict[str, tuple[str, str, str, str]] = {
    "exchange_order_id": ("i", "aid", "orderId", "algoId"),
    "status": ("X", "X", "status", "algoStatus"),
    "client_order_id": ("c", "caid", "clientOrderId", "clientAlgoId"),
    "order_type": ("o", "o", "type", "orderType"),
    "stop_price": ("sp", "tp", "stopPrice", "triggerPrice"),
    "quantity": ("q", "q", "origQty", "quantity"),
}


def _shared(
    shape: _Shape,
    account_id: int,
    data: Mapping[str, Any],
    transaction_time_ms: int,
    envelope: Mapping[str, Any] | None = None,
    status: str | None = None,
) -> OrderState:
    """The fields of ``data`` that ``_Shape.key`` knows (the order object of a frame, or a REST result).

    ``envelope`` is the whole frame (its ``E`` is the event time; REST results have none);
    ``status`` is given when the caller has already read it. Fields are read in this order, so the
    first bad one names the ``FrameError``; the caller ``replace``s the shape's own fields after.
    """

    key, name = shape.key, shape.name

    def value(field_name: str) -> Any:
        return data.get(key(field_name))

    return OrderState(
        account_id=account_id,
        kind=shape.kind,
        exchange_order_id=req_int(value("exchange_order_id"), name("exchange_order_id")),
        symbol=req_str(data, key("symbol"), name("symbol")),
        status=req_str(data, key("status"), name("status")) if status is None else status,
        transaction_time_ms=transaction_time_ms,
        event_time_ms=None if envelope is None else opt_int(envelope.get("E"), "E"),
        source=shape.source,
        client_order_id=opt_str(value("client_order_id")),
        side=opt_str(value("side")),
        position_side=opt_str(value("position_side")),
        order_type=opt_str(value("order_type")),
        time_in_force=opt_str(value("time_in_force")),
        price=dec(value("price"), name("price")),
        stop_price=dec(value("stop_price"), name("stop_price")),
        quantity=dec(value("quantity"), name("quantity")),
        reduce_only=opt_bool(value("reduce_only")),
    )


def order_from_ws(account_id: int, frame: Mapping[str, Any]) -> OrderState:
    """ORDER_TRADE_UPDATE -> OrderState (T of the order, else of the event, orders it).

    Binance doc sample (abbreviated)::

        {"e": "ORDER_TRADE_UPDATE", "E": 1568879465651, "T": 1568879465650,
         "o": {"s": "BTCUSDT",          // symbol
               "c": "TEST",             // client order id
               "S": "SELL", "o": "TRAILING_STOP_MARKET", "f": "GTC", "ps": "LONG",
               "q": "0.001", "p": "0", "ap": "0", "sp": "7103.04",
               "x": "NEW",              // execution type (the dispatch key)
               "X": "NEW",              // order status
               "i": 8886774,            // order id
               "z": "0",                // cumulative filled quantity
               "T": 1568879465650,      // order trade time
               "t": 0,                  // trade id
               "R": false}}             // reduce only
    """
    o = _body(frame)
    t = opt_int(o.get("T"), "o.T") or opt_int(frame.get("T"), "T")
    if t is None:
        raise FrameError("T: missing transaction time")
    trade_id = opt_int(o.get("t"), "o.t")
    return replace(
        _shared(_WS_ORDER, account_id, o, t, envelope=frame),
        filled_quantity=dec(o.get("z"), "o.z") or Decimal(0),
        average_price=dec(o.get("ap"), "o.ap"),
        execution_type=opt_str(o.get("x")),
        trade_id=trade_id or None,
    )


def algo_from_ws(account_id: int, frame: Mapping[str, Any]) -> OrderState:
    """ALGO_UPDATE -> OrderState (kind algo, keyed by algo id ``aid``).

    Binance doc sample (abbreviated)::

        {"e": "ALGO_UPDATE", "T": 1750515742297, "E": 1750515742303,
         "o": {"caid": "Q5xaq5EGKgXXa0fD7fs0Ip",   // client algo id
               "aid": 2148719,                     // algo id
               "o": "TAKE_PROFIT", "s": "BNBUSDT", "S": "SELL", "ps": "BOTH", "f": "GTC",
               "q": "0.01", "tp": "750", "p": "750",
               "X": "CANCELED",                    // algo status
               "ai": "",                           // the regular order it created, once triggered
               "ap": "0.00000", "aq": "0.00000",   // average price, executed quantity
               "R": false}}
    """
    o = _body(frame)
    t = opt_int(frame.get("T"), "T") or opt_int(frame.get("E"), "E")
    if t is None:
        raise FrameError("T: missing transaction time")
    status = req_str(o, "X", "o.X")
    return replace(
        _shared(_WS_ALGO, account_id, o, t, envelope=frame, status=status),
        filled_quantity=dec(o.get("aq"), "o.aq") or Decimal(0),
        average_price=dec(o.get("ap"), "o.ap"),
        actual_order_id=opt_int(o.get("ai"), "o.ai"),
        execution_type=f"ALGO_{status}",
    )


# -- REST results -----------------------------------------------------------------------------------


def order_from_rest(account_id: int, data: Mapping[str, Any]) -> OrderState:
    """GET /fapi/v1/order (or an openOrders / allOrders item) -> OrderState.

    Binance doc sample (abbreviated)::

        {"orderId": 1917641, "symbol": "BTCUSDT", "status": "NEW", "clientOrderId": "abc",
         "price": "0", "avgPrice": "0.00000", "origQty": "0.40", "executedQty": "0",
         "type": "TRAILING_STOP_MARKET", "side": "BUY", "positionSide": "SHORT", "timeInForce": "GTC",
         "stopPrice": "9300", "reduceOnly": false, "time": 1579276756075, "updateTime": 1579276756075}
    """
    t = opt_int(data.get("updateTime"), "updateTime") or opt_int(data.get("time"), "time")
    if t is None:
        raise FrameError("updateTime: missing")
    return replace(
        _shared(_REST_ORDER, account_id, data, t),
        filled_quantity=dec(data.get("executedQty"), "executedQty") or Decimal(0),
        average_price=dec(data.get("avgPrice"), "avgPrice"),
    )


def algo_from_rest(account_id: int, data: Mapping[str, Any]) -> OrderState:
    """GET /fapi/v1/algoOrder (or an openAlgoOrders / allAlgoOrders item) -> OrderState.

    The schema since 2026-06-09 (docs/PROTOCOL.md): ``actualQty`` (the filled quantity) and
    ``actualType`` appear only once the order triggered or filled; without ``actualQty``
    ``filled_quantity`` is None (keep what the stream said). ``actualPrice`` is the average fill
    price; a zero one says nothing (None, the stored price stays). There is no ``executedQty`` and
    no ``tp*``/``sl*`` field any more. A filled order, as REST returns it (abbreviated)::

        {"algoId": 2148719, "clientAlgoId": "Q5xaq5EGKgXXa0fD7fs0Ip", "algoType": "CONDITIONAL",
         "orderType": "TAKE_PROFIT", "symbol": "BNBUSDT", "side": "SELL", "positionSide": "BOTH",
         "timeInForce": "GTC", "quantity": "0.01",
         "algoStatus": "FINISHED",          // NEW, TRIGGERING, TRIGGERED, FINISHED, CANCELED, ...
         "actualOrderId": "8886775",        // the regular order it created ("" until triggered)
         "actualType": "LIMIT",             // once triggered or filled
         "actualQty": "0.01",               // once triggered or filled: the filled quantity
         "actualPrice": "750.00000000", "triggerPrice": "750", "price": "750", "reduceOnly": false,
         "createTime": 1750515742297, "updateTime": 1750515750113, "triggerTime": 1750515749980}
    """
    t = opt_int(data.get("updateTime"), "updateTime") or opt_int(data.get("createTime"), "createTime")
    if t is None:
        raise FrameError("updateTime: missing")
    status = req_str(data, "algoStatus", "algoStatus")
    average = dec(data.get("actualPrice"), "actualPrice")
    return replace(
        _shared(_REST_ALGO, account_id, data, t, status=status),
        filled_quantity=dec(data.get("actualQty"), "actualQty"),
        average_price=average if average else None,
        actual_order_id=opt_int(data.get("actualOrderId"), "actualOrderId"),
        execution_type=f"ALGO_{status}",
    )
