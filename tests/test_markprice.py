"""Mark-price child: parsing, the symbol map, the bulk writer, and the stream against the simulator.

Integration tests run ``MarkPriceStreamer`` in a thread of this process against the local
simulator over a real socket and the session's PostgreSQL database; nothing is mocked.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import orjson
import pytest
from support import db_now, prices_by_id, title_of, wait_for

from kraite_mp.binance.market import FrameError, PriceText, parse_mark_price_frame, parse_price
from kraite_mp.config import Settings
from kraite_mp.ops.seed import parse_binance_symbol, seed_symbols
from kraite_mp.store import db as kdb
from kraite_mp.store.symbols import BulkWriter, build_scales, build_symbol_map, load_symbol_map, scale_price
from kraite_mp.streams.liveness import Reason
from kraite_mp.streams.markprice import Mailbox, MarkPriceStreamer, PriceWriter
from kraite_mp.supervisor.context import ChildContext

# -- units ----------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("text", ["86141.00000000", "0.00003120", "1", "10", "0.1", "123456789.123456789"])
def test_parse_price_accepts_positive_decimals(text: str) -> None:
    assert parse_price(text) == text


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "nan",
        "Infinity",
        "-inf",
        "-1.5",
        "+1.5",
        "0",
        "0.00000000",
        "",
        " 1.0",
        "1.0 ",
        "1e5",
        "1E-7",
        "abc",
        "1.2.3",
        ".5",
        "5.",
        "1,5",
        1.5,
        15,
        None,
        True,
        ["1.0"],
        {"p": "1"},
        "9" * 41,
    ],
)
def test_parse_price_rejects_everything_else(value: Any) -> None:
    assert parse_price(value) is None


@pytest.mark.unit
def test_parse_frame_counts_bad_entries_and_coin_m() -> None:
    frame = orjson.dumps(
        [
            {"e": "markPriceUpdate", "s": "BTCUSDT", "p": "86141.00000000", "st": 1},
            {"e": "markPriceUpdate", "s": "BTCUSD_PERP", "p": "86100.10000000", "st": 2},
            {"e": "markPriceUpdate", "s": "ETHUSDT", "p": "NaN", "st": 1},
            {"e": "markPriceUpdate", "s": "SOLUSDT", "p": "-3", "st": 1},
            {"e": "markPriceUpdate", "s": "XRPUSDT", "p": "abc"},
            {"e": "markPriceUpdate", "s": "DOGEUSDT", "p": 0.17},
            {"e": "somethingElse", "s": "ADAUSDT", "p": "1.0"},
            {"p": "1.0"},
            {"s": "", "p": "1.0"},
            17,
            "BTCUSDT",
            None,
            {"s": "BNBUSDT", "p": "610.23000000"},  # no "e"/"st": tolerated
        ]
    )
    parsed = parse_mark_price_frame(frame)
    assert parsed.prices == {"BTCUSDT": "86141.00000000", "BNBUSDT": "610.23000000"}
    assert parsed.coin_m == 1
    assert parsed.bad_entries == 10
    with_coin_m = parse_mark_price_frame(frame, include_coin_m=True)
    assert with_coin_m.prices["BTCUSD_PERP"] == "86100.10000000"
    assert with_coin_m.coin_m == 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "raw",
    [
        b'{"e":"markPriceUpdate","s":"BTCUSDT","p":"1"}',
        b"not json",
        b"\xff\xfe",
        b"",
        b"42",
        b'"x"',
        b'{"stream":"!markPrice@arr@1s","data":{"s":"BTCUSDT"}}',
        b"[1,2",
    ],
)
def test_parse_frame_rejects_non_arrays(raw: bytes) -> None:
    with pytest.raises(FrameError):
        parse_mark_price_frame(raw)


@pytest.mark.unit
def test_parse_frame_unwraps_combined_stream() -> None:
    raw = b'{"stream":"!markPrice@arr@1s","data":[{"e":"markPriceUpdate","s":"BTCUSDT","p":"2.50","st":1}]}'
    assert parse_mark_price_frame(raw).prices == {"BTCUSDT": "2.50"}


@pytest.mark.unit
def test_mailbox_coalesces_instead_of_queueing() -> None:
    box = Mailbox()
    assert box.put({"A": PriceText("1"), "B": PriceText("1")}) is False
    assert box.put({"A": PriceText("2")}) is True
    assert box.put({"A": PriceText("3"), "C": PriceText("3")}) is True
    assert box.take(0) == {"A": "3", "B": "1", "C": "3"}
    assert box.take(0) is None
    # a failed write goes back under whatever is newer
    box.put({"A": PriceText("5")})
    box.restore({"A": PriceText("4"), "D": PriceText("4")})
    assert box.take(0) == {"A": "5", "D": "4"}


@pytest.mark.unit
def test_bulk_writer_rejects_a_negative_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        BulkWriter(-1)


@pytest.mark.unit
def test_build_symbol_map_remaps_and_gives_each_row_one_source() -> None:
    rows = [
        (1, "binance", "BTCUSDT_250328", "BTC", "USDT"),  # older than the perpetual, still loses
        (2, "binance", "BTCUSDT", "BTC", "USDT"),
        (3, "binance", "1000SATSUSDT", "1000SATS", "USDT"),
        (4, "bybit", "BTCUSDT", "BTC", "USDT"),
        (5, "kucoin", "XBTUSDTM", "XBT", "USDT"),
        (6, "kucoin", "BTCUSDTM", "BTC", "USDT"),  # KuCoin spells BTC as XBT: this row is not BTC's
        (7, "bybit", "10000SATSUSDT", "10000SATS", "USDT"),
        (8, "bitget", "1000SATSUSDT", "1000SATS", "USDT"),
        (9, "bitget", "BTCUSDC", "BTC", "USDC"),  # other quote
        (10, "binance", "ETHUSDT", "ETH", "USDT"),
    ]
    mappers = [
        ("kucoin", "BTC", "XBT"),
        ("bybit", "1000SATS", "10000SATS"),
        ("kucoin", "1000SATS", "10000SATS"),
    ]
    assert build_scales(rows, [(*m, "10" if "SATS" in m[1] else "1") for m in mappers]) == {7: Decimal(10)}
    targets = build_symbol_map(rows, mappers)
    assert targets == {
        "BTCUSDT": (2, 4, 5),
        "BTCUSDT_250328": (1,),
        "1000SATSUSDT": (3, 7, 8),
        "ETHUSDT": (10,),
    }


@pytest.mark.unit
def test_scale_price_is_exact_decimal_text() -> None:
    assert scale_price(PriceText("0.00003120"), Decimal(10)) == "0.00031200"
    assert scale_price(PriceText("123456789012345678901234567890.123456789"), Decimal("1000")) == (
        "123456789012345678901234567890123.456789000"
    )


@pytest.mark.unit
def test_parse_binance_symbol() -> None:
    assert parse_binance_symbol("BTCUSDT").token == "BTC"
    assert parse_binance_symbol("1000SATSUSDT").token == "1000SATS"
    coin_m = parse_binance_symbol("BTCUSD_PERP")
    assert (coin_m.token, coin_m.quote, coin_m.contract_type) == ("BTC", "USD", "COIN_M_PERPETUAL")
    quarterly = parse_binance_symbol("ETHUSDT_250328")
    assert (quarterly.token, quarterly.quote, quarterly.contract_type) == ("ETH", "USDT", "CURRENT_QUARTER")
    with pytest.raises(ValueError):
        parse_binance_symbol("WEIRD")


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture()
def sim() -> Iterator[Any]:
    """A simulator ticking mark prices 4x a second (the real one ticks every second)."""
    from kraite_mp.simulator import Simulator

    simulator = Simulator(accounts=1, symbols=60, rate=0.0, mark_price_interval_s=0.25, seed=11)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture()
def mp_settings(settings: Settings, sim: Any) -> Settings:
    settings.binance.ws_url = sim.ws_url
    settings.binance.rest_url = sim.rest_url
    settings.mark_price.watchdog_s = 3.0
    settings.mark_price.reload_s = 3600.0
    settings.supervisor.backoff_base_s = 0.2
    return settings


@contextmanager
def streaming(settings: Settings) -> Iterator[MarkPriceStreamer]:
    """Run the streamer in a thread; always stop and join it."""
    ctx = ChildContext(settings, "mark-price")
    streamer = MarkPriceStreamer(settings, ctx)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", streamer.run()), daemon=True)
    thread.start()
    try:
        yield streamer
    finally:
        ctx.stop.set()
        thread.join(30)
    assert not thread.is_alive(), "streamer did not stop"
    assert result.get("code") == 0


def stream_symbols(sim: Any) -> list[str]:
    return [s for s, _ in sim.mark_symbols]


def pin_prices(sim: Any, symbols: list[str], round_: int) -> dict[str, str]:
    """Pin every symbol to a distinct price with trailing zeros (exactness shows in ::text)."""
    pinned = {}
    for i, symbol in enumerate(symbols):
        price = f"{i + 1}.{round_:02d}{i:04d}00"
        sim.set_mark_price_override(symbol, price)
        pinned[symbol] = price
    return pinned


# -- integration ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_symbol_map_covers_every_exchange_and_remaps_tokens(db: Any) -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "1000SATSUSDT", "BTCUSDC", "BTCUSD_PERP", "BTCUSDT_250328", "TOK1USDT"]
    seeded = seed_symbols(db, symbols, coverage=1.0)
    kucoin, bybit, bitget = seeded.rows["kucoin"], seeded.rows["bybit"], seeded.rows["bitget"]
    assert "XBTUSDTM" in kucoin and "10000SATSUSDTM" in kucoin and "10000SATSUSDT" in bybit
    assert "1000SATSUSDT" in bitget  # Bitget spells it like Binance
    smap = load_symbol_map(db)
    assert set(smap.targets["BTCUSDT"]) == {
        seeded.rows["binance"]["BTCUSDT"],
        bybit["BTCUSDT"],
        kucoin["XBTUSDTM"],
        bitget["BTCUSDT"],
    }
    assert set(smap.targets["1000SATSUSDT"]) == {
        seeded.rows["binance"]["1000SATSUSDT"],
        bybit["10000SATSUSDT"],
        kucoin["10000SATSUSDTM"],
        bitget["1000SATSUSDT"],
    }
    # the quarterly contract shares token+quote with BTCUSDT but only sets its own row
    assert smap.targets["BTCUSDT_250328"] == (seeded.rows["binance"]["BTCUSDT_250328"],)
    assert smap.targets["BTCUSD_PERP"] == (seeded.rows["binance"]["BTCUSD_PERP"],)
    for symbol in symbols:
        assert sorted(smap.targets[symbol]) == sorted(seeded.targets[symbol]), symbol
    # seeding is idempotent
    again = seed_symbols(db, symbols, coverage=1.0)
    assert again.rows == seeded.rows
    # realistic coverage: not every exchange lists every token, the majors always
    many = [f"TOK{n}USDT" for n in range(100, 400)] + ["BTCUSDT", "SOLUSDT"]
    partial = seed_symbols(db, many)
    for exchange in ("bybit", "kucoin", "bitget"):
        assert 0 < len(partial.rows[exchange]) < len(many), exchange
        assert exchange_symbol_name_in(partial.rows[exchange], "SOL")


def exchange_symbol_name_in(rows: dict[str, int], token: str) -> bool:
    return any(name.startswith(token) for name in rows)


@pytest.mark.integration
def test_tick_writes_exact_prices_to_all_exchanges(db: Any, mp_settings: Settings, sim: Any) -> None:
    symbols = stream_symbols(sim)
    usdm = [s for s, st in sim.mark_symbols if st == 1]
    not_seeded = "TOK100USDT"
    assert not_seeded in symbols
    seeded = seed_symbols(db, [s for s in symbols if s != not_seeded] + ["ZZZUSDT"])
    with db.cursor() as cur:  # a Bybit row without a Binance counterpart
        cur.execute(
            "INSERT INTO exchange_symbols (exchange, symbol, token, quote) VALUES ('bybit', 'FOOUSDT', 'FOO', 'USDT')"
            " RETURNING id"
        )
        (orphan_id,) = cur.fetchone()
    db.commit()
    pinned = pin_prices(sim, usdm, 1)
    start = db_now(db)

    ten_lots = {seeded.rows["kucoin"].get("10000SATSUSDTM"), seeded.rows["bybit"].get("10000SATSUSDT")}
    expected = {
        row_id: scale_price(pinned[symbol], Decimal(10)) if row_id in ten_lots else pinned[symbol]
        for symbol, ids in seeded.targets.items()
        if symbol in pinned
        for row_id in ids
    }

    def all_written() -> bool:
        rows = prices_by_id(db)
        return all(rows[i][0] == p for i, p in expected.items())

    with streaming(mp_settings) as streamer:
        wait_for(all_written, 30, message="every matching row holds the pinned price")
        rows = prices_by_id(db)
        wait_for(lambda: streamer.stats.coin_m_ignored > 0 and streamer.writer.stats.unknown_total > 0, 10)
        wait_for(
            lambda: streamer.ctx.fields.get("symbols") == len(usdm) - 1, 10, message="title fields updated"
        )
        title_fields = dict(streamer.ctx.fields)
        state = streamer.ctx.state

    for row_id, price in expected.items():
        text, synced_at = rows[row_id]
        assert Decimal(text) == Decimal(price) and text == price
        assert synced_at >= start
    # remapped tokens got BTC's and 1000SATS's prices
    assert rows[seeded.rows["kucoin"]["XBTUSDTM"]][0] == pinned["BTCUSDT"]
    # 10000SATS is ten 1000SATS lots: exactly ten times the price, still an exact decimal
    ten_lots = Decimal(pinned["1000SATSUSDT"]) * 10
    assert Decimal(rows[seeded.rows["kucoin"]["10000SATSUSDTM"]][0]) == ten_lots
    assert Decimal(rows[seeded.rows["bybit"]["10000SATSUSDT"]][0]) == ten_lots
    # untouched: a symbol not in the stream, an orphan row, COIN-M (st=2) rows
    for row_id in seeded.targets["ZZZUSDT"] + [orphan_id, seeded.rows["binance"]["BTCUSD_PERP"]]:
        assert rows[row_id] == (None, None)
    assert state == "streaming"
    assert set(title_fields) == {"symbols", "rows", "ticks", "last_write_ms", "skipped"}
    assert title_fields["symbols"] == len(usdm) - 1 and title_fields["rows"] == len(expected)
    assert sim.stats()["ws_opened"]["market"] == 1


@pytest.mark.integration
def test_coin_m_written_when_configured(db: Any, mp_settings: Settings, sim: Any) -> None:
    mp_settings.mark_price.include_coin_m = True
    seeded = seed_symbols(db, stream_symbols(sim))
    sim.set_mark_price_override("BTCUSD_PERP", "86000.50000000")
    row_id = seeded.rows["binance"]["BTCUSD_PERP"]
    with streaming(mp_settings):
        wait_for(lambda: prices_by_id(db)[row_id][0] == "86000.50000000", 30, message="COIN-M row written")


@pytest.mark.integration
def test_bad_input_is_skipped_counted_and_the_stream_continues(
    db: Any, mp_settings: Settings, sim: Any
) -> None:
    seeded = seed_symbols(db, stream_symbols(sim), coverage=1.0)
    btc_ids = seeded.targets["BTCUSDT"]
    eth_ids = seeded.targets["ETHUSDT"]
    sim.set_mark_price_override("BTCUSDT", "86000.10000000")
    with streaming(mp_settings) as streamer:
        wait_for(lambda: all(prices_by_id(db)[i][0] == "86000.10000000" for i in btc_ids), 30)
        sim.send_market_raw('{"e":"markPriceUpdate","s":"BTCUSDT","p":"1.0"}')  # an object, not an array
        sim.send_market_raw("definitely not json")
        sim.send_market_raw(
            '[{"s":"BTCUSDT","p":"abc"},5,{"p":"1"},{"s":"ETHUSDT","p":"-1"},{"s":"ETHUSDT","p":"NaN"},'
            '{"s":"ETHUSDT","p":"1e5"},{"s":"ETHUSDT","p":0.5},null]'
        )
        wait_for(
            lambda: streamer.stats.bad_frames >= 2 and streamer.stats.bad_entries >= 7,
            15,
            message="bad frames and entries counted",
        )
        # NaN / negative / zero from the feed itself, tick after tick
        for bad in ("NaN", "-86000.1", "0"):
            sim.set_mark_price_override("BTCUSDT", bad)
            seen = streamer.stats.bad_entries
            wait_for(lambda seen=seen: streamer.stats.bad_entries >= seen + 2, 15, message=f"{bad} counted")
        rows = prices_by_id(db)
        assert all(rows[i][0] == "86000.10000000" for i in btc_ids)  # never overwritten by garbage
        eth_synced = max(rows[i][1] for i in eth_ids)
        # the other symbols keep streaming
        wait_for(
            lambda: min(prices_by_id(db)[i][1] for i in eth_ids) > eth_synced, 15, message="ETH still updated"
        )
        sim.set_mark_price_override("BTCUSDT", "86001.20000000")
        wait_for(lambda: all(prices_by_id(db)[i][0] == "86001.20000000" for i in btc_ids), 15)
        assert streamer.stats.connections == 1 and streamer.stats.reconnects == 0
    assert sim.stats()["ws_opened"]["market"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sighup", "timer"])
def test_reload_picks_up_new_symbol_without_reconnecting(
    db: Any, mp_settings: Settings, sim: Any, how: str
) -> None:
    symbols = stream_symbols(sim)
    late = "TOK105USDT"
    seed_symbols(db, [s for s in symbols if s != late])
    if how == "timer":
        mp_settings.mark_price.reload_s = 1.0
    sim.set_mark_price_override(late, "7.25000000")
    with streaming(mp_settings) as streamer:
        wait_for(lambda: streamer.writer.stats.writes >= 2, 30, message="writing")
        assert late not in (streamer.writer.symbol_map.targets if streamer.writer.symbol_map else {})
        seeded = seed_symbols(db, [late], coverage=1.0)
        if how == "sighup":
            streamer.ctx.reload.set()  # what the SIGHUP handler does
        wait_for(
            lambda: all(prices_by_id(db)[i][0] == "7.25000000" for i in seeded.targets[late]),
            30,
            message="newly inserted symbol written",
        )
        assert streamer.stats.connections == 1
    assert sim.stats()["ws_opened"]["market"] == 1


@pytest.mark.integration
def test_watchdog_reconnects_a_silent_stream(db: Any, mp_settings: Settings, sim: Any) -> None:
    mp_settings.mark_price.watchdog_s = 1.5
    seeded = seed_symbols(db, stream_symbols(sim), coverage=1.0)
    with streaming(mp_settings) as streamer:
        wait_for(lambda: streamer.stats.ticks >= 2, 30)
        assert sim.go_silent("market", 120) == 1  # TCP stays open, nothing arrives
        wait_for(lambda: sim.stats()["ws_opened"].get("market", 0) >= 2, 30, message="reconnected")
        assert streamer.stats.watchdog_reconnects >= 1
        sim.set_mark_price_override("ETHUSDT", "3333.33000000")
        wait_for(
            lambda: all(prices_by_id(db)[i][0] == "3333.33000000" for i in seeded.targets["ETHUSDT"]),
            30,
            message="ticks flow again on the new connection",
        )


@pytest.mark.integration
def test_server_close_reconnects(db: Any, mp_settings: Settings, sim: Any) -> None:
    seed_symbols(db, stream_symbols(sim))
    with streaming(mp_settings) as streamer:
        wait_for(lambda: streamer.stats.ticks >= 2, 30)
        sim.drop_connections("market")
        wait_for(lambda: sim.stats()["ws_opened"].get("market", 0) >= 2, 30, message="reconnected")
        ticks = streamer.stats.ticks
        wait_for(lambda: streamer.stats.ticks > ticks + 2, 30)


@pytest.mark.integration
def test_pong_timeout_reconnects(db: Any, mp_settings: Settings, sim: Any) -> None:
    """A connection that answers no ping and delivers nothing is half-open: left after ``pong_timeout_s``.
    (One that still delivers defers the pong deadline, for a while only: tests/test_idle_wakeups.py.)"""
    mp_settings.mark_price.watchdog_s = 60.0
    mp_settings.mark_price.ping_interval_s = 0.5
    mp_settings.mark_price.pong_timeout_s = 1.0
    seed_symbols(db, stream_symbols(sim))
    with streaming(mp_settings) as streamer:
        wait_for(lambda: streamer.stats.ticks >= 2, 30)
        sim.go_silent("market", 120)  # answers no ping (and sends nothing)
        wait_for(
            lambda: streamer.stats.reasons.get(Reason.PONG_TIMEOUT, 0) >= 1,
            30,
            message="pong timeout noticed",
        )
        wait_for(lambda: sim.stats()["ws_opened"].get("market", 0) >= 2, 30, message="reconnected")


@pytest.mark.integration
def test_database_outage_keeps_stream_and_recovers(
    db: Any,
    mp_settings: Settings,
    sim: Any,
    database_url: str,
    pg_admin_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The session database refuses connections for a while (the server itself stays up for the others)."""
    seeded = seed_symbols(db, stream_symbols(sim), coverage=1.0)
    eth = seeded.targets["ETHUSDT"]
    with db.cursor() as cur:
        cur.execute("SELECT current_database()")
        (dbname,) = cur.fetchone()
    db.commit()
    admin = kdb.connect(pg_admin_url, autocommit=True)
    caplog.set_level("INFO", logger="kraite_mp.streams.markprice")
    try:
        with streaming(mp_settings) as streamer:
            wait_for(lambda: streamer.writer.stats.writes >= 2, 30)
            with admin.cursor() as cur:
                cur.execute("ALTER DATABASE " + quote_ident(admin, dbname) + " ALLOW_CONNECTIONS false")
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name = 'kraite-mp mark-price'",
                    (dbname,),
                )
            wait_for(lambda: streamer.writer.stats.db_down, 30, message="outage noticed")
            ticks = streamer.stats.ticks
            wait_for(
                lambda: streamer.stats.ticks >= ticks + 8, 30, message="stream continues during the outage"
            )
            assert streamer.writer.stats.write_errors >= 2  # retried with backoff
            assert streamer.ctx.state == "db-down"
            with admin.cursor() as cur:
                cur.execute("ALTER DATABASE " + quote_ident(admin, dbname) + " ALLOW_CONNECTIONS true")
            sim.set_mark_price_override("ETHUSDT", "3100.00000000")
            wait_for(
                lambda: all(prices_by_id(db)[i][0] == "3100.00000000" for i in eth), 30, message="recovered"
            )
            assert not streamer.writer.stats.db_down
            assert streamer.stats.connections == 1  # the WebSocket was never dropped
    finally:
        with admin.cursor() as cur:
            cur.execute("ALTER DATABASE " + quote_ident(admin, dbname) + " ALLOW_CONNECTIONS true")
        admin.close()
    outage_logs = [r for r in caplog.records if "PostgreSQL write failed" in r.getMessage()]
    assert len(outage_logs) == 1  # once per outage
    assert any("recovered" in r.getMessage() for r in caplog.records)


def quote_ident(conn: Any, name: str) -> str:
    from psycopg2.extensions import quote_ident as qi

    return str(qi(name, conn))


@pytest.mark.integration
def test_slow_writes_coalesce_ticks(db: Any, mp_settings: Settings, sim: Any) -> None:
    """While a write waits on a row lock, new ticks merge into one pending batch (never a queue)."""
    seeded = seed_symbols(db, stream_symbols(sim), coverage=1.0)
    btc = seeded.targets["BTCUSDT"]
    blocker = kdb.connect(mp_settings.database_url)
    try:
        with streaming(mp_settings) as streamer:
            wait_for(lambda: streamer.writer.stats.writes >= 2, 30)
            with blocker.cursor() as cur:  # hold the BTC rows: the next write blocks on them
                cur.execute("SELECT id FROM exchange_symbols WHERE id = ANY(%s) FOR UPDATE", (btc,))
            writes = streamer.writer.stats.writes
            wait_for(lambda: streamer.stats.skipped >= 4, 30, message="ticks coalesced while blocked")
            assert streamer.writer.stats.writes <= writes + 1
            sim.set_mark_price_override("BTCUSDT", "90000.00000000")
            time.sleep(0.6)  # let a tick carrying the new price arrive while still blocked
            blocker.rollback()
            wait_for(
                lambda: all(prices_by_id(db)[i][0] == "90000.00000000" for i in btc),
                30,
                message="the newest price written after the lock is released",
            )
            assert streamer.stats.connections == 1
    finally:
        blocker.rollback()
        blocker.close()


@pytest.mark.integration
def test_title_and_heartbeat(db: Any, mp_settings: Settings, sim: Any) -> None:
    import setproctitle

    from kraite_mp.supervisor.runfiles import read_heartbeat

    seed_symbols(db, stream_symbols(sim))
    original = setproctitle.getproctitle()
    try:
        with streaming(mp_settings) as streamer:
            wait_for(lambda: streamer.writer.stats.writes >= 3 and streamer.ctx.state == "streaming", 30)
            time.sleep(1.2)  # beats are throttled to 1/s
            title = setproctitle.getproctitle()
            beat = read_heartbeat(streamer.ctx.heartbeat_path)
        assert re.fullmatch(
            r"kraite-mp: mark-price state=streaming symbols=\d+ rows=\d+ ticks=\d+ last_write_ms=\d+ skipped=\d+",
            title,
        ), title
        assert beat is not None and beat["role"] == "mark-price" and beat["fields"]["ticks"] >= 3
    finally:
        setproctitle.setproctitle(original)


@pytest.mark.integration
def test_writer_step_retries_after_connect_failure(settings: Settings, db: Any) -> None:
    """PostgreSQL unreachable from the start: no exception escapes, the tick stays pending."""
    from kraite_mp.ops.embedded import free_port

    settings.database_url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    settings.supervisor.backoff_base_s = 0.05
    writer = PriceWriter(settings)
    writer.mailbox.put({"BTCUSDT": PriceText("1.5")})
    assert writer.step(timeout=0) is None
    assert writer.stats.db_down and writer.stats.write_errors == 1
    time.sleep(0.2)
    assert writer.step(timeout=0) is None
    assert writer.stats.write_errors == 2
    assert writer.mailbox.take(0) == {"BTCUSDT": "1.5"}  # kept for the retry, not lost or queued twice


CHILD_SCRIPT = """
import os, sys
from kraite_mp.supervisor.context import ChildContext, run_child
from kraite_mp.config.load import load_settings
from kraite_mp.logs import setup_logging
from kraite_mp.streams.markprice import run_mark_price_child

settings = load_settings()
setup_logging(settings.log_level)
os.makedirs(settings.run_dir, exist_ok=True)
ctx = ChildContext(settings, "mark-price")
ctx.parent_pid = os.getppid()  # as if the supervisor (here: the test) had forked us
sys.exit(run_child(ctx, run_mark_price_child))
"""


@pytest.mark.integration
def test_child_process_title_sighup_and_sigterm(
    db: Any, sim: Any, kraite_env: dict[str, str], processes: Any
) -> None:
    """The real entry point in its own process: title, SIGHUP reload on the same connection, clean SIGTERM."""
    import signal
    import sys

    symbols = stream_symbols(sim)
    late = "TOK107USDT"
    seeded = seed_symbols(db, [s for s in symbols if s != late], coverage=1.0)
    sim.set_mark_price_override("ETHUSDT", "3200.25000000")
    sim.set_mark_price_override(late, "1.75000000")
    env = dict(kraite_env, KRAITE_BINANCE_WS_URL=sim.ws_url, KRAITE__mark_price__reload_s="3600")
    proc = processes.start([sys.executable, "-c", CHILD_SCRIPT], env=env)
    pattern = re.compile(
        r"kraite-mp: mark-price state=streaming symbols=\d+ rows=\d+ ticks=\d+ last_write_ms=\d+ skipped=\d+"
    )
    wait_for(
        lambda: pattern.fullmatch(title_of(proc.pid)) and "rows=0 " not in title_of(proc.pid),
        60,
        message="streaming title",
    )
    wait_for(lambda: all(prices_by_id(db)[i][0] == "3200.25000000" for i in seeded.targets["ETHUSDT"]), 30)
    added = seed_symbols(db, [late], coverage=1.0)
    proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: all(prices_by_id(db)[i][0] == "1.75000000" for i in added.targets[late]),
        30,
        message="SIGHUP reloaded the symbol map",
    )
    assert sim.stats()["ws_opened"]["market"] == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
