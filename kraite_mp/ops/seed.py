"""Seed ``exchange_symbols`` and ``token_mappers`` with realistic rows for Binance, Bybit, KuCoin, Bitget.

Used by the demo, the mark-price benchmark and the tests. Given the Binance USD-M symbols (the names
the mark-price array carries), it inserts:

- one Binance row per symbol (token + quote parsed from the name; ``BTCUSD_PERP`` is COIN-M, quote USD;
  ``BTCUSDT_250328`` a quarterly contract);
- for linear perpetuals only, a row on each other exchange that lists the token, with that
  exchange's naming (KuCoin ``XBTUSDTM``) -- not every exchange lists every token: coverage is a
  deterministic draw per (exchange, symbol), the majors are always listed;
- the ``token_mappers`` rows for the tokens another exchange spells differently (KuCoin BTC -> XBT,
  KuCoin/Bybit 1000SATS -> 10000SATS, price x10).

Seeding is idempotent (``ON CONFLICT (exchange, symbol) DO UPDATE``): running it twice returns the
same row ids. All SQL is parametrized.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg2.extras

#: The exchanges the schema knows (exchange_symbols.exchange CHECK constraint).
EXCHANGES: tuple[str, ...] = ("binance", "bybit", "kucoin", "bitget")

#: Quote assets recognised at the end of a Binance symbol, longest-first where they overlap.
QUOTES: tuple[str, ...] = ("USDT", "USDC", "FDUSD", "BUSD")

#: Share of Binance's linear perpetuals that each other exchange also lists (roughly what the
#: seed system saw: Bybit lists nearly everything, KuCoin the least).
DEFAULT_COVERAGE: Mapping[str, float] = {"bybit": 0.92, "bitget": 0.85, "kucoin": 0.78}

#: Tokens every exchange lists (and the remapped ones, so the mapping cases always exist).
ALWAYS_LISTED: frozenset[str] = frozenset({"BTC", "ETH", "SOL", "XRP", "BNB", "DOGE", "1000SATS"})

#: (exchange, Binance token, that exchange's token).
#: (exchange, Binance token, that exchange's token, price multiplier): 10000SATS is ten of Binance's 1000SATS lots.
DEFAULT_TOKEN_MAPPERS: tuple[tuple[str, str, str, str], ...] = (
    ("kucoin", "BTC", "XBT", "1"),
    ("kucoin", "1000SATS", "10000SATS", "10"),
    ("bybit", "1000SATS", "10000SATS", "10"),
)

#: Binance's minimum order notional on USD-M (USDT) contracts.
_MIN_NOTIONAL = Decimal("5")


@dataclass(frozen=True)
class BinanceSymbol:
    """A Binance futures symbol name split into its parts."""

    symbol: str
    token: str
    quote: str
    contract_type: str  #: PERPETUAL, CURRENT_QUARTER (delivery) or COIN_M_PERPETUAL

    @property
    def is_linear_perpetual(self) -> bool:
        return self.contract_type == "PERPETUAL"


@dataclass
class SeedResult:
    """What was seeded: row ids per exchange and, per Binance symbol, every row that shares its price."""

    #: exchange -> {exchange symbol name -> row id}
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Binance symbol -> ids of the rows (Binance's own first) that list the same token + quote.
    targets: dict[str, list[int]] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return sum(len(r) for r in self.rows.values())


def parse_binance_symbol(symbol: str) -> BinanceSymbol:
    """``BTCUSDT`` -> BTC/USDT perpetual; ``BTCUSD_PERP`` -> COIN-M; ``ETHUSDT_250328`` -> delivery."""
    if "_" in symbol:
        pair, suffix = symbol.split("_", 1)
        if pair.endswith("USD") and not pair.endswith(QUOTES):
            return BinanceSymbol(
                symbol, pair[:-3], "USD", "COIN_M_PERPETUAL" if suffix == "PERP" else "COIN_M_DELIVERY"
            )
        base = parse_binance_symbol(pair)
        return BinanceSymbol(symbol, base.token, base.quote, "CURRENT_QUARTER")
    for quote in QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return BinanceSymbol(symbol, symbol[: -len(quote)], quote, "PERPETUAL")
    raise ValueError(f"cannot split Binance symbol {symbol!r} into token and quote")


def exchange_symbol_name(exchange: str, token: str, quote: str) -> str:
    """How ``exchange`` names the linear perpetual of token/quote (already remapped token)."""
    if exchange == "kucoin":
        return f"{token}{quote}M"  # XBTUSDTM
    return f"{token}{quote}"


def _listed(exchange: str, sym: BinanceSymbol, coverage: float, seed: int) -> bool:
    if sym.token in ALWAYS_LISTED:
        return True
    return random.Random(f"{seed}:{exchange}:{sym.symbol}").random() < coverage


def _precision(exchange: str, sym: BinanceSymbol, seed: int) -> tuple[int, int]:
    rng = random.Random(f"{seed}:precision:{exchange}:{sym.symbol}")
    return rng.randint(1, 7), rng.randint(0, 3)


def seed_symbols(
    conn: Any,
    binance_symbols: Sequence[str],
    exchanges: Iterable[str] = EXCHANGES,
    *,
    coverage: Mapping[str, float] | float | None = None,
    token_mappers: Iterable[tuple[str, ...]] = DEFAULT_TOKEN_MAPPERS,
    seed: int = 1,
    commit: bool = True,
) -> SeedResult:
    """Insert the rows for ``binance_symbols`` on ``exchanges``; return their ids and price targets.

    ``coverage`` is the share of linear perpetuals each non-Binance exchange lists (a float for all,
    a mapping per exchange, None for ``DEFAULT_COVERAGE``; 1.0 lists everything).
    """
    exchanges = tuple(dict.fromkeys(exchanges))
    unknown = set(exchanges) - set(EXCHANGES)
    if unknown:
        raise ValueError(f"unknown exchanges {sorted(unknown)}; expected some of {EXCHANGES}")
    if coverage is None:
        coverage = DEFAULT_COVERAGE
    parsed = [parse_binance_symbol(s) for s in dict.fromkeys(binance_symbols)]
    # (exchange, token, exchange_token, multiplier); a 3-tuple is a plain rename (multiplier 1)
    mappers = [(m[0], m[1], m[2], m[3] if len(m) > 3 else "1") for m in token_mappers if m[0] in exchanges]
    remap = {(ex, token): ex_token for ex, token, ex_token, _ in mappers}

    # (exchange, symbol, token, quote, contract_type, price_precision, quantity_precision, tick, step, min_notional)
    values: list[tuple[Any, ...]] = []
    # Binance symbol -> [(exchange, exchange symbol)], Binance's own first
    wanted: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for sym in parsed:
        targets: list[tuple[str, str]] = []
        for exchange in exchanges:
            if exchange == "binance":
                name, token = sym.symbol, sym.token
            else:
                share = coverage if isinstance(coverage, float | int) else coverage.get(exchange, 1.0)
                if not sym.is_linear_perpetual or not _listed(exchange, sym, float(share), seed):
                    continue
                token = remap.get((exchange, sym.token), sym.token)
                name = exchange_symbol_name(exchange, token, sym.quote)
            if (exchange, name) in seen:  # two Binance symbols naming one row: the first keeps it
                continue
            seen.add((exchange, name))
            targets.append((exchange, name))
            pp, qp = _precision(exchange, sym, seed)
            values.append(
                (
                    exchange,
                    name,
                    token,
                    sym.quote,
                    sym.contract_type,
                    pp,
                    qp,
                    Decimal(1).scaleb(-pp),
                    Decimal(1).scaleb(-qp),
                    _MIN_NOTIONAL,
                )
            )
        wanted[sym.symbol] = targets

    result = SeedResult(rows={ex: {} for ex in exchanges})
    with conn.cursor() as cur:
        if mappers:
            psycopg2.extras.execute_values(
                cur,
                "INSERT INTO token_mappers (exchange, token, exchange_token, price_multiplier) VALUES %s"
                " ON CONFLICT (exchange, token) DO UPDATE SET exchange_token = EXCLUDED.exchange_token,"
                " price_multiplier = EXCLUDED.price_multiplier",
                mappers,
            )
        if values:
            returned = psycopg2.extras.execute_values(
                cur,
                "INSERT INTO exchange_symbols (exchange, symbol, token, quote, contract_type, price_precision,"
                " quantity_precision, tick_size, step_size, min_notional) VALUES %s"
                " ON CONFLICT (exchange, symbol) DO UPDATE SET token = EXCLUDED.token, quote = EXCLUDED.quote,"
                " contract_type = EXCLUDED.contract_type, is_active = true, updated_at = now()"
                " RETURNING id, exchange, symbol",
                values,
                page_size=1000,
                fetch=True,
            )
            for row_id, exchange, name in returned:
                result.rows[exchange][name] = int(row_id)
    if commit:
        conn.commit()
    for symbol, targets in wanted.items():
        result.targets[symbol] = [result.rows[ex][name] for ex, name in targets]
    return result
