"""Symbols of the simulated exchange and the mark-price random walk behind ``!markPrice@arr``.

Prices are ``Decimal`` throughout and leave this module as decimal strings with 8 decimals,
the way Binance writes them. The walk is deterministic for a given seed and tick count.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

#: Default number of symbols in the mark-price array (production showed 568).
DEFAULT_SYMBOL_COUNT = 570

#: Funding happens every 8 hours on USD-M perpetuals.
FUNDING_PERIOD_MS = 8 * 3600 * 1000

#: Quantum of the 8-decimal prices in mark-price frames.
_EIGHT_DP = Decimal("0.00000001")
#: Precision of the random walk itself, finer than any tick so that rounding does not stall it.
_WALK_DP = Decimal("1E-14")

#: (symbol, base price as a decimal string whose exponent is the tick size, quantity precision).
#: Ordered so that even a short list mixes USD-M, USDC-quoted, COIN-M and 1000x symbols.
KNOWN_SYMBOLS: tuple[tuple[str, str, int], ...] = (
    ("BTCUSDT", "86000.10", 3),
    ("ETHUSDT", "3200.51", 3),
    ("SOLUSDT", "142.3100", 0),
    ("BNBUSDT", "610.230", 2),
    ("XRPUSDT", "2.1034", 1),
    ("BTCUSDC", "86001.2", 3),
    ("BTCUSD_PERP", "86000.1", 0),
    ("1000SATSUSDT", "0.0000312", 0),
    ("DOGEUSDT", "0.171230", 0),
    ("ETHUSDC", "3200.62", 3),
    ("ETHUSD_PERP", "3200.51", 0),
    ("ADAUSDT", "0.65210", 0),
    ("TRXUSDT", "0.24310", 0),
    ("LINKUSDT", "14.210", 2),
    ("AVAXUSDT", "21.3400", 0),
    ("SOLUSDC", "142.320", 2),
    ("BNBUSD_PERP", "610.230", 0),
    ("DOTUSDT", "4.123", 1),
    ("LTCUSDT", "85.31", 3),
    ("BCHUSDT", "340.12", 3),
    ("UNIUSDT", "6.1230", 0),
    ("ATOMUSDT", "4.512", 2),
    ("ETCUSDT", "17.123", 2),
    ("FILUSDT", "2.512", 1),
    ("APTUSDT", "5.1230", 1),
    ("ARBUSDT", "0.3512", 1),
    ("OPUSDT", "0.7123", 1),
    ("NEARUSDT", "2.512", 0),
    ("SUIUSDT", "2.8123", 1),
    ("1000PEPEUSDT", "0.0091230", 0),
    ("1000SHIBUSDT", "0.013120", 0),
    ("1000BONKUSDT", "0.017123", 0),
    ("BNBUSDC", "610.25", 2),
    ("XRPUSDC", "2.1035", 1),
    ("DOGEUSDC", "0.171240", 0),
    ("SOLUSD_PERP", "142.310", 0),
    ("XRPUSD_PERP", "2.1034", 0),
    ("WIFUSDT", "0.7123", 1),
    ("TONUSDT", "3.1230", 1),
    ("INJUSDT", "12.123", 1),
    ("AAVEUSDT", "180.12", 1),
    ("XLMUSDT", "0.28123", 0),
    ("HBARUSDT", "0.17123", 0),
    ("ICPUSDT", "5.123", 0),
    ("FETUSDT", "0.6123", 0),
    ("TIAUSDT", "3.1230", 0),
    ("SEIUSDT", "0.21230", 0),
    ("ENAUSDT", "0.41230", 0),
)

#: TradFi perpetuals (metals, equities) with a real-looking price: they arrive as a separate array.
TRADFI_SYMBOLS: tuple[tuple[str, str, int], ...] = (
    ("XAUUSDT", "4012.35", 3),
    ("XAGUSDT", "48.123", 1),
    ("TSLAUSDT", "431.27", 2),
    ("NVDAUSDT", "181.44", 2),
)

#: ``KNOWN_SYMBOLS`` by name: symbol -> (base price, quantity precision).
_KNOWN_BY_NAME = {
    name: (price, qty_precision) for name, price, qty_precision in KNOWN_SYMBOLS + TRADFI_SYMBOLS
}


@dataclass
class MarketSymbol:
    """One symbol of the simulated exchange with its current mark-price state."""

    symbol: str
    st: int  #: 1 = USD-M, 2 = COIN-M
    base_asset: str
    quote_asset: str
    tick: Decimal  #: price step; its exponent is the price precision
    qty_precision: int
    mark: Decimal
    index: Decimal
    funding_rate: Decimal
    override: str | None = None
    walk: Decimal | None = None  #: unrounded walk state, so sub-tick moves accumulate
    tradfi: bool = False  #: a TradFi perpetual (gold, stocks): its own array in each tick

    @property
    def price_precision(self) -> int:
        return -int(self.tick.as_tuple().exponent)

    @property
    def step(self) -> Decimal:
        return Decimal(1).scaleb(-self.qty_precision)


def split_symbol(symbol: str) -> tuple[str, str, int]:
    """Return (base asset, quote asset, st) for a symbol name."""
    if "_" in symbol:
        pair = symbol.split("_", 1)[0]
        return (pair[:-3] if pair.endswith("USD") else pair), "USD", 2
    for quote in ("USDT", "USDC", "BUSD"):
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote, 1
    return symbol, "USDT", 1


def make_symbol(symbol: str, rng: random.Random) -> MarketSymbol:
    """Build a symbol; known names get their real-looking price, others a generated one."""
    base, quote, st = split_symbol(symbol)
    known = _KNOWN_BY_NAME.get(symbol)
    if known is not None:
        price = Decimal(known[0])
        qty_precision = known[1]
    else:
        # log-uniform prices between 0.0001 and 1000 with 5 significant digits, like most alts
        magnitude = rng.randint(-4, 2)
        digits = rng.randint(10000, 99999)
        price = Decimal(digits).scaleb(magnitude - 4)
        qty_precision = max(0, min(3, magnitude + 1))
    tick = Decimal(1).scaleb(int(price.as_tuple().exponent))
    index = (price * (1 + Decimal(rng.randint(-200, 200)) / 1000000)).quantize(_EIGHT_DP)
    funding = Decimal(rng.randint(-50, 150)).scaleb(-6)
    return MarketSymbol(symbol, st, base, quote, tick, qty_precision, price, index, funding)


def default_symbol_names(count: int, rng: random.Random) -> list[str]:
    """The known symbols first, then generated ``TOK<n>USDT`` names up to ``count``."""
    names = [name for name, _, _ in KNOWN_SYMBOLS[:count]]
    used = set(names)
    n = 100
    while len(names) < count:
        name = f"TOK{n}USDT"
        n += 1
        if name not in used:
            names.append(name)
            used.add(name)
    return names


def next_funding_time_ms(now_ms: int) -> int:
    return (now_ms // FUNDING_PERIOD_MS + 1) * FUNDING_PERIOD_MS


def fmt8(value: Decimal) -> str:
    """A decimal string with exactly 8 decimals, as Binance writes mark prices."""
    return f"{value.quantize(_EIGHT_DP):.8f}"


class Market:
    """Thread-safe symbol table and mark-price walk; ``tick()`` builds one array frame."""

    def __init__(self, symbols: int | Sequence[str], seed: int, tradfi: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}:market")
        names = default_symbol_names(symbols, self._rng) if isinstance(symbols, int) else list(symbols)
        self._symbols: dict[str, MarketSymbol] = {}
        self._set(names)
        self._tradfi: dict[str, MarketSymbol] = {}
        self.set_tradfi_symbols(tradfi)

    def set_tradfi_symbols(self, symbols: Iterable[str]) -> None:
        """The TradFi symbols: each tick sends them as a second array (none: one array per tick)."""
        with self._lock:
            old = self._tradfi
            self._tradfi = {}
            for name in dict.fromkeys(symbols):
                sym = old.get(name) or make_symbol(name, self._rng)
                sym.tradfi = True
                self._tradfi[name] = sym

    def _set(self, names: Iterable[str]) -> None:
        old = self._symbols
        self._symbols = {name: old.get(name) or make_symbol(name, self._rng) for name in dict.fromkeys(names)}

    def set_symbols(self, symbols: Iterable[str]) -> None:
        """Replace the symbols of the mark-price array (existing ones keep their price)."""
        with self._lock:
            self._set(symbols)

    def symbols(self) -> list[tuple[str, int]]:
        """(symbol, st) of every symbol, the TradFi ones last."""
        with self._lock:
            return [(s.symbol, s.st) for s in (*self._symbols.values(), *self._tradfi.values())]

    def get(self, symbol: str) -> MarketSymbol | None:
        with self._lock:
            return self._symbols.get(symbol) or self._tradfi.get(symbol)

    def usdm_symbols(self) -> list[MarketSymbol]:
        with self._lock:
            return [s for s in (*self._symbols.values(), *self._tradfi.values()) if s.st == 1]

    def set_override(self, symbol: str, price: str | None) -> None:
        """Pin the mark price ``p`` (and ``ap``) of a symbol to ``price`` verbatim; None releases it."""
        if price is not None:
            Decimal(price)  # validate: raises on garbage
        with self._lock:
            sym = self._symbols.get(symbol)
            if sym is None:
                sym = make_symbol(symbol, self._rng)
                self._symbols[symbol] = sym
            sym.override = price
            if price is not None:
                sym.mark = Decimal(price)
                sym.walk = None

    def tick(self, now_ms: int | None = None) -> list[dict[str, object]]:
        """Advance every symbol one step and return the markPriceUpdate array (TradFi ones last)."""
        return [item for array in self.tick_messages(now_ms) for item in array]

    def tick_messages(self, now_ms: int | None = None) -> list[list[dict[str, Any]]]:
        """Advance every symbol one step: the arrays of the tick, the crypto one and, if there are TradFi
        symbols, theirs (Binance sends them as a separate message in the same tick)."""
        with self._lock:
            crypto = self._tick(self._symbols.values(), now_ms)
            if not self._tradfi:
                return [crypto]
            return [crypto, self._tick(self._tradfi.values(), now_ms)]

    def _tick(self, symbols: Iterable[MarketSymbol], now_ms: int | None) -> list[dict[str, Any]]:
        event_ms = int(time.time() * 1000) if now_ms is None else now_ms
        funding_ms = next_funding_time_ms(event_ms)
        frame: list[dict[str, Any]] = []
        # the caller holds the lock
        rng = self._rng
        for sym in symbols:
            if sym.override is None:
                walk = sym.mark if sym.walk is None else sym.walk
                walk = (walk * (1 + Decimal(rng.randint(-30, 30)) / 100000)).quantize(_WALK_DP)
                sym.walk = max(walk, sym.tick)
                sym.mark = sym.walk.quantize(sym.tick)
            basis = Decimal(rng.randint(-200, 200)) / 1000000
            sym.index = sym.mark * (1 + basis)
            sym.funding_rate = min(
                Decimal("0.003"),
                max(Decimal("-0.003"), sym.funding_rate + Decimal(rng.randint(-2, 2)).scaleb(-6)),
            )
            settle = (sym.mark + sym.index) / 2
            p = sym.override if sym.override is not None else fmt8(sym.mark)
            frame.append(
                {
                    "e": "markPriceUpdate",
                    "E": event_ms,
                    "s": sym.symbol,
                    "p": p,
                    "ap": p,
                    "P": fmt8(settle),
                    "i": fmt8(sym.index),
                    "r": fmt8(sym.funding_rate),
                    "T": funding_ms,
                    "st": sym.st,
                }
            )
        return frame
