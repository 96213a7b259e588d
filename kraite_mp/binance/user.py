"""User-data frames at the edge: each stream frame is parsed once, here, into a typed ``UserEvent``.

A ``UserEvent`` holds the envelope fields plus ``.order`` (``kraite_mp.binance.orders``) or
``.account``; the job decides on that and the store writes it. ``parse_frame`` never raises: what
it cannot use it says in ``kind`` and ``error``, so every frame can still be audited. The child uses
``scrub_text`` before a frame is spooled, so no listenKey ever reaches disk, Redis or a log line.
This module also owns the lists config validates against (``USER_DATA_EVENTS``, ``KNOWN_DISPATCH_KEYS``).
The REST snapshots of the same balances and positions (``positions_from_rest``, ``balances_from_rest``)
are parsed here too, into the ACCOUNT_UPDATE types, so the store has one write path for both.
Prices and quantities stay ``Decimal``; a float is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import orjson

from kraite_mp.binance.fields import (
    FrameError,
    array,
    dec,
    event_time,
    opt_int,
    req_str,
)
from kraite_mp.binance.orders import OrderState, algo_from_ws, order_from_ws
from kraite_mp.logs import redact

#: Frames longer than this (characters) are not parsed; the child cuts anything longer to this + 1.
MAX_FRAME_CHARS = 1024 * 1024
#: Raw text of a malformed/oversized frame kept in the audit row (characters).
MAX_RAW_TEXT_CHARS = 8192

ORDER_TRADE_UPDATE = "ORDER_TRADE_UPDATE"
ALGO_UPDATE = "ALGO_UPDATE"
TRADE_LITE = "TRADE_LITE"
ACCOUNT_UPDATE = "ACCOUNT_UPDATE"
LISTEN_KEY_EXPIRED = "listenKeyExpired"

#: The user-data events we subscribe to, in ``events=`` URL order (default of ``user_data_stream.events``).
USER_DATA_EVENTS: tuple[str, ...] = (
    ORDER_TRADE_UPDATE,
    TRADE_LITE,
    ACCOUNT_UPDATE,
    ALGO_UPDATE,
    "MARGIN_CALL",
    "ACCOUNT_CONFIG_UPDATE",
    "STRATEGY_UPDATE",
    "GRID_UPDATE",
    "CONDITIONAL_ORDER_TRIGGER_REJECT",
    LISTEN_KEY_EXPIRED,
)
#: Every user-data event type we know; others are audited as ``unknown``.
KNOWN_EVENTS: frozenset[str] = frozenset(USER_DATA_EVENTS)
#: ``events`` is an allow-list (listenKeyExpired included): without these the stream goes silently wrong
#: (no expiry notice, no conditional orders, no orders at all).
REQUIRED_EVENTS: tuple[str, ...] = (LISTEN_KEY_EXPIRED, ORDER_TRADE_UPDATE, ALGO_UPDATE)
#: Every dispatch key (see ``dispatch_key``); anything else in the allowlist is a config error.
KNOWN_DISPATCH_KEYS: frozenset[str] = frozenset(
    {"NEW", "CANCELED", "CALCULATED", "EXPIRED", "TRADE", "AMENDMENT", "REJECTED"}
    | {
        f"ALGO_{s}"
        for s in ("NEW", "CANCELED", "TRIGGERING", "TRIGGERED", "FINISHED", "FILLED", "REJECTED", "EXPIRED")
    }
)
#: Payload keys whose values are secrets, wherever they appear.
SECRET_KEYS: frozenset[str] = frozenset({"listenKey"})
SCRUBBED = "***"

_EXPIRED_MARKER = '"' + LISTEN_KEY_EXPIRED + '"'
_LISTEN_KEY_FIELD_RE = re.compile(r'("listenKey"\s*:\s*")[^"]*')


class FrameKind(StrEnum):
    """What a raw frame turned out to be; the non-event kinds are also their audit outcome."""

    #: A JSON object with a string ``e``.
    EVENT = "event"
    #: Not JSON (kept as truncated raw text).
    MALFORMED = "malformed"
    #: JSON, but not an object with an ``e`` (kept as payload).
    NOT_OBJECT = "not_object"
    #: Longer than ``MAX_FRAME_CHARS`` (kept as truncated raw text, never parsed).
    OVERSIZED = "oversized"


@dataclass(frozen=True)
class Balance:
    """One ``a.B[]`` item of an ACCOUNT_UPDATE."""

    asset: str  # a
    wallet_balance: Decimal | None  # wb
    cross_wallet_balance: Decimal | None  # cw
    balance_change: Decimal | None  # bc: balance change except PnL and commission


@dataclass(frozen=True)
class Position:
    """One ``a.P[]`` item of an ACCOUNT_UPDATE."""

    symbol: str  # s
    position_side: str  # ps (BOTH when absent)
    amount: Decimal | None  # pa
    entry_price: Decimal | None  # ep
    breakeven_price: Decimal | None  # bep
    unrealized_pnl: Decimal | None  # up
    margin_type: str | None  # mt
    isolated_wallet: Decimal | None  # iw


@dataclass(frozen=True)
class AccountUpdate:
    """Balances and positions of one ACCOUNT_UPDATE, all as of ``event_time_ms``."""

    account_id: int
    event_time_ms: int
    balances: tuple[Balance, ...]
    positions: tuple[Position, ...]


@dataclass(frozen=True)
class UserEvent:
    """One frame, parsed once: the envelope (what is audited) and the typed body (what is applied)."""

    kind: FrameKind
    event_type: str | None = None
    event_time_ms: int | None = None
    known: bool = False
    #: Scrubbed JSON text to store as jsonb (the raw text when nothing needed scrubbing).
    payload_text: str | None = None
    #: Scrubbed, truncated raw text (only for malformed / oversized frames).
    raw_text: str | None = None
    #: Why the frame cannot be used: for the non-event kinds, and for a known event whose body is broken.
    error: str | None = None
    #: The allowlist key of an ORDER_TRADE_UPDATE / ALGO_UPDATE (``dispatch_key``).
    dispatch_key: str | None = None
    order: OrderState | None = None
    account: AccountUpdate | None = None


def check_events(events: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a ``user_data_stream.events`` list, for config validation.

    Errors: a required event missing (``REQUIRED_EVENTS``), a name that is no event type (they are the
    exact ``e`` values), a repeat. Warnings: TRADE_LITE (every fill then arrives twice: one more frame
    to spool, queue and audit per fill, and never a second fill), ACCOUNT_UPDATE missing (balances and
    positions then change only through the REST sweep).
    """
    errors = [
        f"{name} is required: the events list is an allow-list"
        for name in REQUIRED_EVENTS
        if name not in events
    ]
    unknown = [e for e in events if e not in KNOWN_EVENTS]
    if unknown:
        errors.append(
            f"not user-data event types: {', '.join(sorted(set(unknown)))} (names are the exact 'e' values)"
        )
    if len(set(events)) != len(events):
        errors.append("an event is listed twice")
    warnings = []
    if TRADE_LITE in events:
        warnings.append(
            "TRADE_LITE doubles the frames per fill (audited only: its fill comes in ORDER_TRADE_UPDATE)"
        )
    if ACCOUNT_UPDATE not in events:
        warnings.append("without ACCOUNT_UPDATE balances and positions change only through the REST sweep")
    return errors, warnings


# -- scrubbing --------------------------------------------------------------------------------------


def scrub_text(text: str, listen_keys: tuple[str, ...] = ()) -> str:
    """Remove listenKeys (given, registered, or in a ``"listenKey"`` field) from raw frame text."""
    for key in listen_keys:
        if key and key in text:
            text = text.replace(key, SCRUBBED)
    if "listenKey" in text:
        text = _LISTEN_KEY_FIELD_RE.sub(r"\1" + SCRUBBED, text)
    return redact(text)


def scrub_payload(value: Any) -> tuple[Any, bool]:
    """A copy of ``value`` with every ``SECRET_KEYS`` value replaced; and whether anything was."""
    if isinstance(value, dict):
        changed = False
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in SECRET_KEYS and v not in (None, SCRUBBED):
                out[k] = SCRUBBED
                changed = True
            else:
                out[k], sub_changed = scrub_payload(v)
                changed = changed or sub_changed
        return (out, True) if changed else (value, False)
    if isinstance(value, list):
        items = [scrub_payload(v) for v in value]
        if any(c for _, c in items):
            return [v for v, _ in items], True
        return value, False
    return value, False


def is_listen_key_expired(text: str) -> bool:
    """Cheap check in the receive path: is this frame a ``listenKeyExpired`` event?"""
    if _EXPIRED_MARKER not in text:
        return False
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, Mapping) and payload.get("e") == LISTEN_KEY_EXPIRED


# -- stream payloads --------------------------------------------------------------------------------


def _objects(a: Mapping[str, Any], key: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The objects of the list ``a.<key>``, each with its name in error texts (``a.B[0]``)."""
    for i, item in enumerate(array(a.get(key), f"a.{key}")):
        name = f"a.{key}[{i}]"
        if not isinstance(item, Mapping):
            raise FrameError(f"{name}: not an object")
        yield name, item


def account_update_from_ws(account_id: int, frame: Mapping[str, Any]) -> AccountUpdate:
    """ACCOUNT_UPDATE -> AccountUpdate; FrameError when it is not one.

    Binance doc sample (abbreviated)::

        {"e": "ACCOUNT_UPDATE", "E": 1564745798939, "T": 1564745798938,
         "a": {"m": "ORDER",
               "B": [{"a": "USDT",                // asset
                      "wb": "122624.12345678",    // wallet balance
                      "cw": "100.12345678",       // cross wallet balance
                      "bc": "50.12345678"}],      // balance change except PnL and commission
               "P": [{"s": "BTCUSDT", "pa": "20", "ep": "6563.66500", "bep": "6563.6",
                      "up": "2850.21200", "mt": "isolated", "iw": "13200.70726908", "ps": "LONG"}]}}
    """
    e_time = event_time(frame.get("E"))
    if e_time is None:
        raise FrameError("E: missing event time")
    a = frame.get("a")
    if not isinstance(a, Mapping):
        raise FrameError("a: missing update object")
    balances = tuple(
        Balance(
            asset=req_str(b, "a", f"{n}.a"),
            wallet_balance=dec(b.get("wb"), f"{n}.wb"),
            cross_wallet_balance=dec(b.get("cw"), f"{n}.cw"),
            balance_change=dec(b.get("bc"), f"{n}.bc"),
        )
        for n, b in _objects(a, "B")
    )
    positions = tuple(
        Position(
            symbol=req_str(p, "s", f"{n}.s"),
            position_side=p["ps"] if isinstance(p.get("ps"), str) else "BOTH",
            amount=dec(p.get("pa"), f"{n}.pa"),
            entry_price=dec(p.get("ep"), f"{n}.ep"),
            breakeven_price=dec(p.get("bep"), f"{n}.bep"),
            unrealized_pnl=dec(p.get("up"), f"{n}.up"),
            margin_type=p["mt"] if isinstance(p.get("mt"), str) else None,
            isolated_wallet=dec(p.get("iw"), f"{n}.iw"),
        )
        for n, p in _objects(a, "P")
    )
    return AccountUpdate(account_id, e_time, balances, positions)


def _rest_items(items: Any, what: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if not isinstance(items, list):
        raise FrameError(f"{what}: not a list")
    for i, item in enumerate(items):
        name = f"{what}[{i}]"
        if not isinstance(item, Mapping):
            raise FrameError(f"{name}: not an object")
        yield name, item


def _snapshot_time(item: Mapping[str, Any], name: str, asked_at_ms: int) -> int:
    """The event time of one REST item: when it was asked, or its ``updateTime`` if that is later (the
    local estimate of the server clock is behind)."""
    updated = opt_int(item.get("updateTime"), f"{name}.updateTime")
    return max(asked_at_ms, updated or 0)


def positions_from_rest(items: Any, asked_at_ms: int) -> list[tuple[Position, int]]:
    """A ``GET /fapi/v3/positionRisk`` answer -> (Position, event time ms) per item; FrameError if any
    item is unusable (a snapshot is used whole or not at all: it also says which positions are gone).

    The event time is ``asked_at_ms`` (the server time the request was sent): the answer holds every
    change before it, so an older frame processed late loses and a newer one wins. v3 has no
    ``marginType``: an open position with an isolated wallet is ``isolated``, another ``cross``, and a
    zero one says nothing (the stored type stays). Binance doc sample (abbreviated)::

        [{"symbol": "ADAUSDT", "positionSide": "BOTH", "positionAmt": "30", "entryPrice": "0.385",
          "breakEvenPrice": "0.385077", "markPrice": "0.41047590", "unRealizedProfit": "0.76427700",
          "liquidationPrice": "0", "isolatedMargin": "0", "notional": "12.31427700",
          "marginAsset": "USDT", "isolatedWallet": "0", "initialMargin": "0.61571385",
          "maintMargin": "0.08004280", "positionInitialMargin": "0.61571385",
          "openOrderInitialMargin": "0", "adl": 2, "bidNotional": "0", "askNotional": "0",
          "updateTime": 1720736417660}]
    """
    out = []
    for n, p in _rest_items(items, "positionRisk"):
        amount = dec(p.get("positionAmt"), f"{n}.positionAmt")
        if amount is None:
            raise FrameError(f"{n}.positionAmt: missing")
        isolated_wallet = dec(p.get("isolatedWallet"), f"{n}.isolatedWallet")
        margin_type = None
        if amount != 0:
            margin_type = "isolated" if isolated_wallet else "cross"
        position = Position(
            symbol=req_str(p, "symbol", f"{n}.symbol"),
            position_side=req_str(p, "positionSide", f"{n}.positionSide"),
            amount=amount,
            entry_price=dec(p.get("entryPrice"), f"{n}.entryPrice"),
            breakeven_price=dec(p.get("breakEvenPrice"), f"{n}.breakEvenPrice"),
            unrealized_pnl=dec(p.get("unRealizedProfit"), f"{n}.unRealizedProfit"),
            margin_type=margin_type,
            isolated_wallet=isolated_wallet,
        )
        out.append((position, _snapshot_time(p, n, asked_at_ms)))
    return out


def balances_from_rest(items: Any, asked_at_ms: int) -> list[tuple[Balance, int]]:
    """A ``GET /fapi/v3/balance`` answer -> (Balance, event time ms) per asset; FrameError if any item is
    unusable. Event times as in ``positions_from_rest``; a snapshot has no ``balance_change`` (None).
    Binance doc sample::

        [{"accountAlias": "SgsR", "asset": "USDT", "balance": "122607.35137903",
          "crossWalletBalance": "23.72469206", "crossUnPnl": "0.00000000",
          "availableBalance": "23.72469206", "maxWithdrawAmount": "23.72469206",
          "marginAvailable": true, "updateTime": 1617939110373}]
    """
    out = []
    for n, b in _rest_items(items, "balance"):
        wallet = dec(b.get("balance"), f"{n}.balance")
        if wallet is None:
            raise FrameError(f"{n}.balance: missing")
        balance = Balance(
            asset=req_str(b, "asset", f"{n}.asset"),
            wallet_balance=wallet,
            cross_wallet_balance=dec(b.get("crossWalletBalance"), f"{n}.crossWalletBalance"),
            balance_change=None,
        )
        out.append((balance, _snapshot_time(b, n, asked_at_ms)))
    return out


def dispatch_key(frame: Mapping[str, Any]) -> str | None:
    """The allowlist key of a frame: ``x`` for ORDER_TRADE_UPDATE, ``ALGO_<X>`` for ALGO_UPDATE.

    A FINISHED algo order with an executed quantity > 0 is ``ALGO_FILLED``. Other events: None.
    """
    event = frame.get("e")
    body = frame.get("o")
    if not isinstance(body, Mapping):
        return None
    if event == ORDER_TRADE_UPDATE:
        x = body.get("x")
        return x if isinstance(x, str) else None
    if event == ALGO_UPDATE:
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


def _is_wrapped(payload: Any) -> bool:
    """The combined-stream envelope ``{"stream": .., "data": {"e": ..}}``: its ``stream`` is the listenKey."""
    return (
        isinstance(payload, dict)
        and len(payload) == 2
        and isinstance(payload.get("stream"), str)
        and isinstance(payload.get("data"), dict)
        and isinstance(payload["data"].get("e"), str)
    )


def parse_frame(account_id: int, text: str) -> UserEvent:
    """One raw frame of ``account_id`` -> UserEvent; never raises (every frame gets audited).

    A frame in the combined-stream envelope (``/private/stream``: ``{"stream": <listenKey>, "data":
    {...}}``) is the event it carries: audited unwrapped, so its listenKey is never stored."""
    if len(text) > MAX_FRAME_CHARS:
        return UserEvent(
            kind=FrameKind.OVERSIZED,
            raw_text=scrub_text(text[:MAX_RAW_TEXT_CHARS]),
            error=f"frame of more than {MAX_FRAME_CHARS} characters",
        )
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        return UserEvent(
            kind=FrameKind.MALFORMED,
            raw_text=scrub_text(text[:MAX_RAW_TEXT_CHARS]),
            error=f"invalid JSON: {str(e)[:200]}",
        )
    changed = False
    if _is_wrapped(payload):  # a /private/stream frame: {"stream": <listenKey>, "data": {...}}
        payload, changed = payload["data"], True
    if "listenKey" in text:  # the only secret a frame can carry; skip the walk for all other frames
        payload, sub_changed = scrub_payload(payload)
        changed = changed or sub_changed
    # keep the exact text (numbers as sent) unless something had to be scrubbed out of it
    payload_text = scrub_text(orjson.dumps(payload).decode() if changed else text)
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), str):
        return UserEvent(
            kind=FrameKind.NOT_OBJECT,
            payload_text=payload_text,
            error="not a JSON object with an event type 'e'",
        )
    event_type: str = payload["e"]
    key = dispatch_key(payload)
    order: OrderState | None = None
    account: AccountUpdate | None = None
    error: str | None = None
    try:
        if event_type == ORDER_TRADE_UPDATE:
            order = order_from_ws(account_id, payload)
        elif event_type == ALGO_UPDATE:
            order = algo_from_ws(account_id, payload)
        elif event_type == ACCOUNT_UPDATE:
            account = account_update_from_ws(account_id, payload)
    except FrameError as e:
        error = str(e)
    return UserEvent(
        kind=FrameKind.EVENT,
        event_type=event_type[:100],
        event_time_ms=event_time(payload.get("E")),
        known=event_type in KNOWN_EVENTS,
        payload_text=payload_text,
        error=error,
        dispatch_key=key,
        order=order,
        account=account,
    )
