"""Order payloads -> ``OrderState``: ORDER_TRADE_UPDATE and ALGO_UPDATE frames, REST order results.

The stream and REST reconciliation observe the same order through these four parsers, so the store's
one ordered update can compare their observations. Each parser's docstring shows a sample payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    return OrderState(
        account_id=account_id,
        kind="regular",
        exchange_order_id=req_int(o.get("i"), "o.i"),
        symbol=req_str(o, "s", "o.s"),
        status=req_str(o, "X", "o.X"),
        transaction_time_ms=t,
        event_time_ms=opt_int(frame.get("E"), "E"),
        source="ws",
        client_order_id=opt_str(o.get("c")),
        side=opt_str(o.get("S")),
        position_side=opt_str(o.get("ps")),
        order_type=opt_str(o.get("o")),
        time_in_force=opt_str(o.get("f")),
        price=dec(o.get("p"), "o.p"),
        stop_price=dec(o.get("sp"), "o.sp"),
        quantity=dec(o.get("q"), "o.q"),
        filled_quantity=dec(o.get("z"), "o.z") or Decimal(0),
        average_price=dec(o.get("ap"), "o.ap"),
        reduce_only=opt_bool(o.get("R")),
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
    return OrderState(
        account_id=account_id,
        kind="algo",
        exchange_order_id=req_int(o.get("aid"), "o.aid"),
        symbol=req_str(o, "s", "o.s"),
        status=status,
        transaction_time_ms=t,
        event_time_ms=opt_int(frame.get("E"), "E"),
        source="ws",
        client_order_id=opt_str(o.get("caid")),
        side=opt_str(o.get("S")),
        position_side=opt_str(o.get("ps")),
        order_type=opt_str(o.get("o")),
        time_in_force=opt_str(o.get("f")),
        price=dec(o.get("p"), "o.p"),
        stop_price=dec(o.get("tp"), "o.tp"),
        quantity=dec(o.get("q"), "o.q"),
        filled_quantity=dec(o.get("aq"), "o.aq") or Decimal(0),
        average_price=dec(o.get("ap"), "o.ap"),
        reduce_only=opt_bool(o.get("R")),
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
    return OrderState(
        account_id=account_id,
        kind="regular",
        exchange_order_id=req_int(data.get("orderId"), "orderId"),
        symbol=req_str(data, "symbol", "symbol"),
        status=req_str(data, "status", "status"),
        transaction_time_ms=t,
        event_time_ms=None,
        source="rest",
        client_order_id=opt_str(data.get("clientOrderId")),
        side=opt_str(data.get("side")),
        position_side=opt_str(data.get("positionSide")),
        order_type=opt_str(data.get("type")),
        time_in_force=opt_str(data.get("timeInForce")),
        price=dec(data.get("price"), "price"),
        stop_price=dec(data.get("stopPrice"), "stopPrice"),
        quantity=dec(data.get("origQty"), "origQty"),
        filled_quantity=dec(data.get("executedQty"), "executedQty") or Decimal(0),
        average_price=dec(data.get("avgPrice"), "avgPrice"),
        reduce_only=opt_bool(data.get("reduceOnly")),
    )


def algo_from_rest(account_id: int, data: Mapping[str, Any]) -> OrderState:
    """GET /fapi/v1/algoOrder (or an openAlgoOrders item) -> OrderState.

    The algo service reports no executed quantity of its own (the fill lives on the regular order
    ``actualOrderId``), so ``filled_quantity`` is None (keep what the stream said) unless given.
    The order of the ALGO_UPDATE doc sample, as REST returns it (abbreviated)::

        {"algoId": 2148719, "clientAlgoId": "Q5xaq5EGKgXXa0fD7fs0Ip", "algoType": "CONDITIONAL",
         "orderType": "TAKE_PROFIT", "symbol": "BNBUSDT", "side": "SELL", "positionSide": "BOTH",
         "timeInForce": "GTC", "quantity": "0.01",
         "algoStatus": "CANCELED",          // NEW, TRIGGERING, TRIGGERED, FINISHED, CANCELED, ...
         "actualOrderId": "",               // the regular order it created, once triggered
         "actualPrice": "0.00000", "triggerPrice": "750", "price": "750", "reduceOnly": false,
         "updateTime": 1750515742297}
    """
    t = opt_int(data.get("updateTime"), "updateTime") or opt_int(data.get("createTime"), "createTime")
    if t is None:
        raise FrameError("updateTime: missing")
    status = req_str(data, "algoStatus", "algoStatus")
    executed = data.get("executedQty", data.get("aq"))
    return OrderState(
        account_id=account_id,
        kind="algo",
        exchange_order_id=req_int(data.get("algoId"), "algoId"),
        symbol=req_str(data, "symbol", "symbol"),
        status=status,
        transaction_time_ms=t,
        event_time_ms=None,
        source="rest",
        client_order_id=opt_str(data.get("clientAlgoId")),
        side=opt_str(data.get("side")),
        position_side=opt_str(data.get("positionSide")),
        order_type=opt_str(data.get("orderType")),
        time_in_force=opt_str(data.get("timeInForce")),
        price=dec(data.get("price"), "price"),
        stop_price=dec(data.get("triggerPrice"), "triggerPrice"),
        quantity=dec(data.get("quantity"), "quantity"),
        filled_quantity=dec(executed, "executedQty"),
        average_price=dec(data.get("actualPrice"), "actualPrice") or dec(data.get("avgPrice"), "avgPrice"),
        reduce_only=opt_bool(data.get("reduceOnly")),
        actual_order_id=opt_int(data.get("actualOrderId"), "actualOrderId"),
        execution_type=f"ALGO_{status}",
    )
