"""``exchange_symbols``: which rows a Binance mark price sets, and the bulk UPDATE that sets them.

The symbol map joins every active row to the Binance symbol whose price it takes (same token and
quote on every exchange, tokens renamed by ``token_mappers``); ``BulkWriter`` writes one tick's
``(row id, price)`` pairs in one transaction with one parametrized ``UPDATE ... FROM unnest(...)``.
Prices stay exact decimal text from the frame to the ``numeric`` column.
"""

from __future__ import annotations

import decimal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg2

from kraite_mp.binance.market import PriceText

#: Every active row and every token mapping, read in two plain queries; the join happens in Python
#: so that its cost is linear whatever the planner thinks of a freshly seeded, never-analyzed table
#: (a SQL version of this join ran a nested loop over thousands of unanalyzed rows).
SYMBOL_ROWS_SQL = (
    "SELECT id, exchange, symbol, token, quote FROM exchange_symbols WHERE is_active ORDER BY id"
)
TOKEN_MAPPERS_SQL = "SELECT exchange, token, exchange_token, price_multiplier FROM token_mappers"

#: One statement for the whole tick: ids and prices go as two array parameters.
UNNEST_SQL = (
    "UPDATE exchange_symbols AS s SET mark_price = v.price, mark_price_synced_at = now()"
    " FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, price) WHERE s.id = v.id"
)
#: A write that takes longer than this is cancelled by PostgreSQL (a lock held elsewhere, say):
#: the tick is retried with the next one instead of hanging the writer forever.
STATEMENT_TIMEOUT_MS = 10_000

#: Enough digits for any validated price (<= 40 + 40) times any multiplier: scaling stays exact.
_SCALE_CONTEXT = decimal.Context(prec=120)


@dataclass(frozen=True)
class SymbolMap:
    """Binance symbol -> ids of every row its mark price sets (its own Binance row first)."""

    targets: Mapping[str, tuple[int, ...]]
    loaded_at: float
    #: Row id -> price multiplier, only for rows whose token_mapper says the lot differs (10000SATS).
    scales: Mapping[int, Decimal] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return sum(len(v) for v in self.targets.values())


def build_symbol_map(
    rows: Sequence[tuple[int, str, str, str, str]], mappers: Sequence[tuple[Any, ...]]
) -> dict[str, tuple[int, ...]]:
    """Map from ``(id, exchange, symbol, token, quote)`` rows and ``(exchange, token, exchange_token)``.

    A Binance symbol sets its own row and, on every other exchange, the rows listing the same token
    (rewritten by token_mappers: KuCoin BTC -> XBT) and quote. Each non-Binance row has exactly one
    source: the Binance symbol spelled token||quote (the perpetual) wins, then the oldest row, so a
    quarterly ``BTCUSDT_250328`` never fights ``BTCUSDT`` over Bybit's BTCUSDT.
    """
    remap = {(m[0], m[1]): m[2] for m in mappers}
    binance: list[tuple[int, str, str, str]] = []
    others: dict[tuple[str, str, str], list[int]] = {}
    exchanges: dict[str, None] = {}
    for row_id, exchange, symbol, token, quote in rows:
        if exchange == "binance":
            binance.append((row_id, symbol, token, quote))
        else:
            exchanges[exchange] = None
            others.setdefault((exchange, token, quote), []).append(row_id)
    binance.sort(key=lambda r: (r[1] != r[2] + r[3], r[0]))
    claimed: set[int] = set()
    targets: dict[str, list[int]] = {}
    for row_id, symbol, token, quote in binance:
        ids = targets.setdefault(symbol, [])
        ids.append(row_id)
        for exchange in exchanges:
            for other_id in others.get((exchange, remap.get((exchange, token), token), quote), ()):
                if other_id not in claimed:
                    claimed.add(other_id)
                    ids.append(other_id)
    return {symbol: tuple(ids) for symbol, ids in targets.items()}


def build_scales(
    rows: Sequence[tuple[int, str, str, str, str]], mappers: Sequence[tuple[Any, ...]]
) -> dict[int, Decimal]:
    """Row id -> multiplier for rows listed under a mapped token whose mapper has a multiplier != 1."""
    multipliers = {(m[0], m[2]): Decimal(m[3]) for m in mappers if len(m) > 3 and Decimal(m[3]) != 1}
    return {
        row_id: multipliers[(exchange, token)]
        for row_id, exchange, _symbol, token, _quote in rows
        if (exchange, token) in multipliers
    }


def load_symbol_map(conn: Any) -> SymbolMap:
    """Read the rows and mappings in one short transaction and build the map."""
    with conn.cursor() as cur:
        cur.execute(SYMBOL_ROWS_SQL)
        rows = cur.fetchall()
        cur.execute(TOKEN_MAPPERS_SQL)
        mappers = cur.fetchall()
    conn.commit()
    return SymbolMap(build_symbol_map(rows, mappers), time.monotonic(), build_scales(rows, mappers))


def scale_price(price: PriceText, multiplier: Decimal) -> PriceText:
    """``price * multiplier`` exactly, as plain decimal text (never float, never an exponent)."""
    return PriceText(format(_SCALE_CONTEXT.multiply(Decimal(price), multiplier), "f"))


def resolve_rows(
    prices: Mapping[str, PriceText], symbol_map: SymbolMap
) -> tuple[list[tuple[int, PriceText]], int, int]:
    """(sorted (row id, price) pairs, symbols matched, symbols unknown). Sorted ids: a stable lock order."""
    by_row: dict[int, PriceText] = {}
    matched = unknown = 0
    targets, scales = symbol_map.targets, symbol_map.scales
    for symbol, price in prices.items():
        ids = targets.get(symbol)
        if ids is None:
            unknown += 1
            continue
        matched += 1
        for row_id in ids:
            multiplier = scales.get(row_id)
            by_row[row_id] = price if multiplier is None else scale_price(price, multiplier)
    return sorted(by_row.items()), matched, unknown


def chunks(rows: Sequence[tuple[int, PriceText]], size: int) -> Iterator[Sequence[tuple[int, PriceText]]]:
    """``rows`` in slices of ``size`` (0: all at once)."""
    if size <= 0 or len(rows) <= size:
        yield rows
        return
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def array_text(values: Iterator[str]) -> str:
    """A PostgreSQL array literal passed as ONE bound parameter (ids are ints, prices validated digits)."""
    return "{" + ",".join(values) + "}"


class BulkWriter:
    """The bulk UPDATE of one tick. ``setup(conn)`` once per connection, then ``write`` per tick."""

    #: How the rows are sent; subclasses (the benchmark's alternatives) override ``execute``.
    strategy = "unnest"

    def __init__(self, chunk_size: int = 0) -> None:
        if chunk_size < 0:
            raise ValueError("chunk_size must be >= 0")
        self.chunk_size = chunk_size

    def setup(self, conn: Any, *, synchronous_commit: bool = False) -> None:
        """Per-session settings; a new connection must get them again."""
        with conn.cursor() as cur:
            # A single statement over thousands of rows can cross jit_above_cost, and compiling it
            # costs far more than the update itself.
            cur.execute("SET jit = off")
            # Mark prices are rewritten every second: losing the last tick in a crash costs nothing,
            # waiting for a WAL flush on every commit costs latency.
            cur.execute(
                "SELECT set_config('synchronous_commit', %s, false)", ("on" if synchronous_commit else "off",)
            )
            cur.execute("SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),))
        conn.commit()

    def write(self, conn: Any, rows: Sequence[tuple[int, PriceText]]) -> int:
        """Write ``rows`` (sorted by id) in one transaction and commit; return the rows updated."""
        if not rows:
            return 0
        try:
            with conn.cursor() as cur:
                updated = self.execute(cur, rows)
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except psycopg2.Error:
                pass
            raise
        return updated

    def execute(self, cur: Any, rows: Sequence[tuple[int, PriceText]]) -> int:
        """Send the UPDATE statement(s) inside the open transaction; return the rows updated."""
        updated = 0
        for chunk in chunks(rows, self.chunk_size):
            cur.execute(UNNEST_SQL, (array_text(str(i) for i, _ in chunk), array_text(p for _, p in chunk)))
            updated += cur.rowcount
        return updated
