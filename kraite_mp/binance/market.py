"""Mark-price frames at the edge: ``!markPrice@arr`` arrays -> validated exact price text per symbol.

Prices stay the decimal strings Binance sent (never a float); anything that is not a plain finite
positive decimal is counted and skipped, so one broken entry never costs the others their tick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

import orjson

#: The market route of the all-symbols mark-price stream; the old unrouted ``/ws/...`` form connects
#: but delivers nothing.
MARK_PRICE_ROUTE = "/market/ws/!markPrice@arr@1s"
#: Longest accepted symbol name (Binance's are < 20 characters).
MAX_SYMBOL_LEN = 64

#: The validated text of a finite, positive decimal price (digits, at most one dot, no exponent).
PriceText = NewType("PriceText", str)

#: ``86141.00000000``: digits with an optional fraction. Rejects NaN/Infinity, signs, exponents,
#: blanks and anything else that could mean something other than a plain positive decimal.
_PRICE_RE = re.compile(r"[0-9]{1,40}(?:\.[0-9]{1,40})?")


class FrameError(ValueError):
    """A frame that is not a JSON array of mark-price entries (counted, never fatal)."""


def parse_price(value: object) -> PriceText | None:
    """The price text if ``value`` is a finite positive decimal string, else None."""
    if type(value) is not str or _PRICE_RE.fullmatch(value) is None:
        return None
    if not value.strip("0."):  # zero
        return None
    return PriceText(value)


@dataclass
class ParsedFrame:
    """One ``!markPrice@arr`` frame after validation."""

    #: Binance symbol -> validated mark price (the last entry wins if a symbol repeats).
    prices: dict[str, PriceText]
    #: Entries skipped: not an object, no symbol, bad or missing price, wrong event type.
    bad_entries: int = 0
    #: COIN-M entries (``st`` = 2) skipped because ``include_coin_m`` is off.
    coin_m: int = 0


def parse_mark_price_frame(raw: bytes | str, *, include_coin_m: bool = False) -> ParsedFrame:
    """Parse and validate one frame; raise FrameError if it is not a JSON array.

    A real entry::

        {"e":"markPriceUpdate","E":1791201678000,"s":"BTCUSDT","p":"86141.00000000","ap":"86141.00000000",
         "P":"86110.40591268","i":"86181.65630435","r":"0.00003779","T":1791216000000,"st":1}

    Bad entries are counted and skipped. The combined-stream wrapper ``{"stream": .., "data": [..]}``
    is unwrapped.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FrameError("frame is not valid JSON") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise FrameError(f"frame is a JSON {type(data).__name__}, expected an array")
    prices: dict[str, PriceText] = {}
    bad = coin_m = 0
    for item in data:
        if type(item) is not dict:
            bad += 1
            continue
        symbol = item.get("s")
        if type(symbol) is not str or not symbol or len(symbol) > MAX_SYMBOL_LEN:
            bad += 1
            continue
        event = item.get("e", "markPriceUpdate")
        if event != "markPriceUpdate":
            bad += 1
            continue
        if item.get("st") == 2 and not include_coin_m:
            coin_m += 1
            continue
        price = parse_price(item.get("p"))
        if price is None:
            bad += 1
            continue
        prices[symbol] = price
    return ParsedFrame(prices, bad, coin_m)
