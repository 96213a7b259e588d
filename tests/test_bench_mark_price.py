"""The mark-price benchmark's alternative writers (``bench/mark_price.py``): same exact prices as the product's.

The benchmark compares the shipped UNNEST writer with the seed system's CASE/WHEN and with COPY;
these tests keep the comparison honest: every strategy writes the same rows with the same text.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from support import db_now, prices_by_id

from bench.mark_price import CASE_CHUNK_SIZE, STRATEGIES, case_sql, make_writer
from kraite_mp.binance.market import PriceText
from kraite_mp.config import Settings
from kraite_mp.ops.seed import seed_symbols
from kraite_mp.store import db as kdb
from kraite_mp.store.symbols import BulkWriter, load_symbol_map, resolve_rows, scale_price


@pytest.mark.unit
def test_case_sql_has_placeholders_only() -> None:
    sql = case_sql(3)
    assert sql.count("%s") == 9
    assert sql.count("WHEN %s THEN %s::numeric") == 3
    assert re.search(r"\d", sql.replace("%s", "")) is None  # no literal values in the statement


@pytest.mark.unit
def test_make_writer_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="strategy"):
        make_writer("orm")
    with pytest.raises(ValueError, match="chunk_size"):
        make_writer("unnest", -1)
    assert type(make_writer("unnest")) is BulkWriter  # the benchmark's "unnest" is the product's writer
    assert STRATEGIES == ("unnest", "case", "copy", "floor")


#: The strategies that write prices ("floor" writes only the timestamps: the bench's lower bound).
PRICE_WRITERS = [s for s in STRATEGIES if s != "floor"]


@pytest.mark.integration
def test_the_floor_touches_every_row_of_the_tick_and_only_its_timestamp(db: Any, settings: Settings) -> None:
    seeded = seed_symbols(db, ["BTCUSDT", "ETHUSDT", "SOLUSDC"], coverage=1.0)
    prices = {"BTCUSDT": PriceText("86141.10000000"), "ETHUSDT": PriceText("3000.5")}
    conn = kdb.connect(settings.database_url)
    try:
        writer = make_writer("floor")
        writer.setup(conn)
        rows, matched, _ = resolve_rows(prices, load_symbol_map(conn))
        assert matched == 2
        before = db_now(db)
        assert writer.write(conn, rows) == len(rows) > 0
    finally:
        conn.close()
    after = prices_by_id(db)
    touched = {row_id for symbol in prices for row_id in seeded.targets[symbol]}
    assert touched == {row_id for row_id, _ in rows}
    for row_id, (text, synced_at) in after.items():
        assert text is None  # no price written
        assert (synced_at is not None and synced_at >= before) == (row_id in touched)


@pytest.mark.integration
@pytest.mark.parametrize("strategy", PRICE_WRITERS)
@pytest.mark.parametrize("chunk_size", [0, 7])
def test_strategies_write_identical_exact_prices(
    db: Any, settings: Settings, strategy: str, chunk_size: int
) -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "1000SATSUSDT", "SOLUSDC"] + [f"TOK{n}USDT" for n in range(100, 130)]
    seeded = seed_symbols(db, symbols, coverage=1.0)
    prices = {s: PriceText(f"{i + 1}.{i:03d}00000") for i, s in enumerate(symbols)}
    prices["BTCUSDT"] = PriceText("86141.00000000")
    prices["1000SATSUSDT"] = PriceText("0.00003120")
    prices["NOTLISTEDUSDT"] = PriceText("5.5")

    # the reference: the seed's CASE/WHEN, chunked 500
    reference_writer = make_writer("case", CASE_CHUNK_SIZE)
    conn = kdb.connect(settings.database_url)
    try:
        reference_writer.setup(conn)
        smap = load_symbol_map(conn)
        rows, matched, unknown = resolve_rows(prices, smap)
        assert (matched, unknown) == (len(symbols), 1)
        assert reference_writer.write(conn, rows) == len(rows) == seeded.row_count
        reference = prices_by_id(db)

        with db.cursor() as cur:
            cur.execute("UPDATE exchange_symbols SET mark_price = NULL, mark_price_synced_at = NULL")
        db.commit()
        before = db_now(db)
        writer = make_writer(strategy, chunk_size)
        writer.setup(conn)
        assert writer.write(conn, rows) == len(rows)
        after = prices_by_id(db)
    finally:
        conn.close()
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in reference.items()}
    ten_lots = {seeded.rows["kucoin"]["10000SATSUSDTM"], seeded.rows["bybit"]["10000SATSUSDT"]}
    for symbol, ids in seeded.targets.items():
        for row_id in ids:
            text, synced_at = after[row_id]
            want = scale_price(prices[symbol], Decimal(10)) if row_id in ten_lots else prices[symbol]
            assert text == want  # the exact decimal text, trailing zeros included
            assert synced_at is not None and synced_at >= before
