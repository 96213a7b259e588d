"""The mark-price child: Binance ``!markPrice@arr@1s`` -> ``exchange_symbols.mark_price`` on four exchanges.

The hottest write path of the system (1 Hz x ~570 symbols x 4 exchanges). Two threads:

- the stream thread (``MarkPriceStreamer.loop``) owns the WebSocket: it receives, parses and
  validates each array frame and drops the prices into a one-slot ``Mailbox``. It pings, watches
  for silence (watchdog) and reconnects with the shared capped backoff; it never touches PostgreSQL,
  so a slow or absent database never stalls the stream.
- the writer thread (``PriceWriter``) owns the database connection and the symbol map. It takes
  whatever the mailbox holds, maps Binance symbols to the row ids of every exchange listing the
  same token + quote, and writes them in one transaction with one raw parametrized bulk UPDATE.

Coalescing: when a tick arrives while the previous one is still being written, the new prices are
merged into the pending slot (newest price per symbol wins) instead of queued, so the writer
always writes the freshest state and memory cannot grow; ``skipped`` counts the ticks coalesced.

Prices are validated decimal strings from the frame to the ``numeric`` column (never a float).

Title: ``kraite-mp: mark-price state=streaming symbols=568 rows=2272 ticks=86400 last_write_ms=11 skipped=0``.
"""

from __future__ import annotations

import decimal
import gc
import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NewType

import orjson
import psycopg2
import websocket

from kraite_mp import exitcodes
from kraite_mp.backoff import backoff_delay
from kraite_mp.config import Settings
from kraite_mp.store import db as kdb
from kraite_mp.supervisor.context import ChildContext, heartbeat_dir

log = logging.getLogger(__name__)

#: The 2026 market route; the old unrouted ``/ws/...`` form connects but delivers nothing.
MARK_PRICE_ROUTE = "/market/ws/!markPrice@arr@1s"
#: Socket read timeout: how quickly the stream loop notices ``ctx.stop``, the watchdog and pings.
RECV_TIMEOUT_S = 0.5
#: TCP connect + WebSocket handshake timeout (short: ``ctx.stop`` is not checked while connecting).
CONNECT_TIMEOUT_S = 5.0
#: The reconnect backoff starts over only after a connection delivered ticks for this long
#: (supervisor's startsecs): a server that accepts and drops us at once must not get a 1 Hz
#: reconnect loop (Binance allows 300 new connections per 5 minutes per IP).
STREAM_HEALTHY_AFTER_S = 30.0
#: Payload of our client pings (the server echoes it in the pong).
PING_PAYLOAD = b"kraite-mp"
#: A write that takes longer than this is cancelled by PostgreSQL (a lock held elsewhere, say):
#: the tick is retried with the next one instead of hanging the writer forever.
STATEMENT_TIMEOUT_MS = 10_000
#: How long the writer thread sleeps waiting for a tick before re-checking stop/reload.
WRITER_WAIT_S = 0.5
#: Counters of bad input are logged at most this often (a broken feed must not flood the log).
BAD_INPUT_LOG_INTERVAL_S = 60.0
#: How long ``shutdown`` waits for an in-flight write to finish (under the supervisor's graceful timeout).
WRITER_JOIN_TIMEOUT_S = 5.0
#: Longest accepted symbol name (Binance's are < 20 characters).
MAX_SYMBOL_LEN = 64

STRATEGIES: tuple[str, ...] = ("unnest", "case", "copy")

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

    Bad entries are counted and skipped, so one broken symbol never costs the others their tick.
    The combined-stream wrapper ``{"stream": .., "data": [..]}`` is unwrapped.
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


# -- symbol map --------------------------------------------------------------------------------------

#: Every active row and every token mapping, read in two plain queries; the join happens in Python
#: so that its cost is linear whatever the planner thinks of a freshly seeded, never-analyzed table
#: (a SQL version of this join ran 1 s on 2,000 unanalyzed rows via a nested loop).
SYMBOL_ROWS_SQL = "SELECT id, exchange, symbol, token, quote FROM exchange_symbols WHERE is_active ORDER BY id"
TOKEN_MAPPERS_SQL = "SELECT exchange, token, exchange_token, price_multiplier FROM token_mappers"


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
    return {row_id: multipliers[(exchange, token)] for row_id, exchange, _symbol, token, _quote in rows
            if (exchange, token) in multipliers}


def load_symbol_map(conn: Any) -> SymbolMap:
    """Read the rows and mappings in one short transaction and build the map."""
    with conn.cursor() as cur:
        cur.execute(SYMBOL_ROWS_SQL)
        rows = cur.fetchall()
        cur.execute(TOKEN_MAPPERS_SQL)
        mappers = cur.fetchall()
    conn.commit()
    return SymbolMap(build_symbol_map(rows, mappers), time.monotonic(), build_scales(rows, mappers))


#: Enough digits for any validated price (<= 40 + 40) times any multiplier: scaling stays exact.
_SCALE_CONTEXT = decimal.Context(prec=120)


def scale_price(price: PriceText, multiplier: Decimal) -> PriceText:
    """``price * multiplier`` exactly, as plain decimal text (never float, never an exponent)."""
    return PriceText(format(_SCALE_CONTEXT.multiply(Decimal(price), multiplier), "f"))


def resolve_rows(prices: Mapping[str, PriceText], symbol_map: SymbolMap) -> tuple[list[tuple[int, PriceText]], int, int]:
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


# -- bulk writers ------------------------------------------------------------------------------------

UNNEST_SQL = (
    "UPDATE exchange_symbols AS s SET mark_price = v.price, mark_price_synced_at = now()"
    " FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, price) WHERE s.id = v.id"
)
COPY_TABLE = "kraite_mark_price_tick"
COPY_CREATE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS kraite_mark_price_tick (id bigint NOT NULL, price numeric NOT NULL)"
    " ON COMMIT DELETE ROWS"
)
COPY_SQL = "COPY kraite_mark_price_tick (id, price) FROM STDIN"
COPY_UPDATE_SQL = (
    "UPDATE exchange_symbols AS s SET mark_price = v.price, mark_price_synced_at = now()"
    " FROM kraite_mark_price_tick AS v WHERE s.id = v.id"
)
COPY_CLEAR_SQL = "DELETE FROM kraite_mark_price_tick"
#: The seed system's chunk size for CASE/WHEN.
CASE_CHUNK_SIZE = 500


def case_sql(n: int) -> str:
    """The seed's statement for ``n`` rows: placeholders only, values always go as parameters."""
    whens = " ".join(["WHEN %s THEN %s::numeric"] * n)
    ids = ", ".join(["%s"] * n)
    # only %s placeholders are joined in: every id and price is bound as a parameter
    return (
        "UPDATE exchange_symbols SET mark_price = CASE id " + whens + " END,"  # noqa: S608
        " mark_price_synced_at = now() WHERE id IN (" + ids + ")"
    )


def _chunks(rows: Sequence[tuple[int, PriceText]], size: int) -> Iterator[Sequence[tuple[int, PriceText]]]:
    if size <= 0 or len(rows) <= size:
        yield rows
        return
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _array_text(values: Iterator[str]) -> str:
    """A PostgreSQL array literal passed as ONE bound parameter (ids are ints, prices validated digits)."""
    return "{" + ",".join(values) + "}"


class BulkWriter:
    """One strategy of the bulk UPDATE. ``setup(conn)`` once per connection, then ``write`` per tick."""

    def __init__(self, strategy: str = "unnest", chunk_size: int = 0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown mark-price write strategy {strategy!r}; expected one of {STRATEGIES}")
        if chunk_size < 0:
            raise ValueError("chunk_size must be >= 0")
        self.strategy = strategy
        self.chunk_size = chunk_size
        self._case_sql: dict[int, str] = {}

    def setup(self, conn: Any, *, synchronous_commit: bool = False) -> None:
        """Per-session settings; a new connection must get them again."""
        with conn.cursor() as cur:
            # A single statement over thousands of rows can cross jit_above_cost, and compiling it
            # costs far more than the update itself (the seed's "JIT cliff").
            cur.execute("SET jit = off")
            # Mark prices are rewritten every second: losing the last tick in a crash costs nothing,
            # waiting for a WAL flush on every commit costs latency.
            cur.execute("SELECT set_config('synchronous_commit', %s, false)", ("on" if synchronous_commit else "off",))
            cur.execute("SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),))
            if self.strategy == "copy":
                cur.execute(COPY_CREATE_SQL)
        conn.commit()

    def write(self, conn: Any, rows: Sequence[tuple[int, PriceText]]) -> int:
        """Write ``rows`` (sorted by id) in one transaction and commit; return the rows updated."""
        if not rows:
            return 0
        updated = 0
        try:
            with conn.cursor() as cur:
                if self.strategy == "unnest":
                    for chunk in _chunks(rows, self.chunk_size):
                        cur.execute(
                            UNNEST_SQL,
                            (_array_text(str(i) for i, _ in chunk), _array_text(p for _, p in chunk)),
                        )
                        updated += cur.rowcount
                elif self.strategy == "case":
                    for chunk in _chunks(rows, self.chunk_size):
                        n = len(chunk)
                        sql = self._case_sql.get(n)
                        if sql is None:
                            sql = self._case_sql[n] = case_sql(n)
                        params: list[object] = [v for pair in chunk for v in pair]
                        params.extend(i for i, _ in chunk)
                        cur.execute(sql, params)
                        updated += cur.rowcount
                else:
                    first = True
                    for chunk in _chunks(rows, self.chunk_size):
                        if not first:
                            cur.execute(COPY_CLEAR_SQL)
                        first = False
                        text = "".join(f"{i}\t{p}\n" for i, p in chunk)
                        cur.copy_expert(COPY_SQL, io.StringIO(text))
                        cur.execute(COPY_UPDATE_SQL)
                        updated += cur.rowcount
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except psycopg2.Error:
                pass
            raise
        return updated


# -- the writer thread -------------------------------------------------------------------------------


class Mailbox:
    """A one-slot mailbox: ``put`` merges into an unconsumed batch instead of queueing behind it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[str, PriceText] | None = None

    def put(self, prices: dict[str, PriceText]) -> bool:
        """Deliver a tick; True if it was coalesced with one the writer had not taken yet."""
        with self._cond:
            if self._pending is None:
                self._pending = prices
                self._cond.notify()
                return False
            self._pending.update(prices)
            return True

    def take(self, timeout: float) -> dict[str, PriceText] | None:
        with self._cond:
            if self._pending is None:
                self._cond.wait(timeout)
            batch, self._pending = self._pending, None
            return batch

    def restore(self, prices: dict[str, PriceText]) -> None:
        """Put back a batch whose write failed, under anything newer that arrived meanwhile."""
        with self._cond:
            if self._pending is not None:
                prices.update(self._pending)
            self._pending = prices

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


@dataclass
class WriterStats:
    """Owned by the writer thread (read-only elsewhere)."""

    writes: int = 0
    #: Last committed tick: Binance symbols matched, rows updated, wall time to COMMIT.
    symbols: int = 0
    rows: int = 0
    last_write_ms: int = 0
    #: Symbols in the stream with no exchange_symbols row (last tick / cumulative).
    unknown_last: int = 0
    unknown_total: int = 0
    write_errors: int = 0
    map_reloads: int = 0
    map_symbols: int = 0
    map_rows: int = 0
    db_down: bool = False


class PriceWriter:
    """The database side: symbol map, bulk write, outage handling. ``write_prices`` is the write path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        mp = settings.mark_price
        self.bulk = BulkWriter(mp.strategy, mp.chunk_size)
        self.mailbox = Mailbox()
        self.stats = WriterStats()
        self.conn: Any = None
        self.symbol_map: SymbolMap | None = None
        self._reload = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._attempt = 0
        self._outage_since: float | None = None
        self._last_unknown_logged = 0
        self._last_unknown_log_at = -BAD_INPUT_LOG_INTERVAL_S

    # lifecycle
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="mark-price-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = WRITER_JOIN_TIMEOUT_S) -> None:
        self._stop.set()
        self.mailbox.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("mark-price writer still busy after %.0fs; leaving it", timeout)
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None

    def request_reload(self) -> None:
        self._reload.set()
        self.mailbox.wake()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the writer must outlive any single bad tick
                log.exception("mark-price writer: unexpected error; retrying")
                self._stop.wait(1.0)

    def step(self, timeout: float = WRITER_WAIT_S) -> int | None:
        """Wait for a tick and write it; returns rows written, or None if nothing was written."""
        now = time.monotonic()
        if now < self._retry_at:  # in an outage: leave ticks in the mailbox until the retry time
            self._stop.wait(min(timeout, self._retry_at - now))
            return None
        if self._reload.is_set() or self._map_stale():
            try:
                self.reload_map()
            except (psycopg2.Error, kdb.DatabaseUnavailable) as e:
                self._db_failed(e)
                return None
        batch = self.mailbox.take(timeout)
        if not batch:
            return None
        try:
            return self.write_prices(batch)
        except (psycopg2.Error, kdb.DatabaseUnavailable) as e:
            self.mailbox.restore(batch)
            self._db_failed(e)
            return None

    # database
    def _map_stale(self) -> bool:
        return self.symbol_map is None or time.monotonic() - self.symbol_map.loaded_at >= self.settings.mark_price.reload_s

    def _connection(self) -> Any:
        if self.conn is None or self.conn.closed:
            conn = kdb.connect(self.settings.database_url, application_name="kraite-mp mark-price")
            try:
                self.bulk.setup(conn, synchronous_commit=self.settings.mark_price.synchronous_commit)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        return self.conn

    def reload_map(self) -> SymbolMap:
        self._reload.clear()
        symbol_map = load_symbol_map(self._connection())
        old = self.symbol_map
        self.symbol_map = symbol_map
        self.stats.map_reloads += 1
        self.stats.map_symbols = len(symbol_map.targets)
        self.stats.map_rows = symbol_map.row_count
        if old is None or old.targets.keys() != symbol_map.targets.keys() or old.row_count != symbol_map.row_count:
            log.info("symbol map: %d Binance symbols -> %d rows", self.stats.map_symbols, self.stats.map_rows)
        self._db_ok()
        return symbol_map

    def write_prices(self, prices: Mapping[str, PriceText]) -> int:
        """Map one tick to rows and write them in one transaction (raises on database errors)."""
        conn = self._connection()
        if self.symbol_map is None:
            self.reload_map()
        assert self.symbol_map is not None
        started = time.perf_counter()
        rows, matched, unknown = resolve_rows(prices, self.symbol_map)
        updated = self.bulk.write(conn, rows)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        st = self.stats
        st.writes += 1
        st.symbols = matched
        st.rows = updated
        st.last_write_ms = round(elapsed_ms)
        st.unknown_last = unknown
        st.unknown_total += unknown
        if unknown != self._last_unknown_logged and time.monotonic() - self._last_unknown_log_at >= BAD_INPUT_LOG_INTERVAL_S:
            self._last_unknown_logged = unknown
            self._last_unknown_log_at = time.monotonic()
            log.info("%d symbols in the mark-price stream have no exchange_symbols row", unknown)
        self._db_ok()
        del rows
        gc.collect()  # cycles from parsing/psycopg2 would otherwise pile up between generations: memory stays flat
        return updated

    def _db_failed(self, error: BaseException) -> None:
        self.stats.write_errors += 1
        self.close()
        delay = backoff_delay(
            self._attempt,
            base_s=self.settings.supervisor.backoff_base_s,
            cap_exponent=self.settings.supervisor.backoff_cap_exponent,
            jitter_ratio=self.settings.supervisor.backoff_jitter_ratio,
        )
        self._attempt += 1
        self._retry_at = time.monotonic() + delay
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self.stats.db_down = True
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning(
                "PostgreSQL write failed (%s: %s): keeping the stream, retrying with backoff",
                type(error).__name__,
                first_line,
            )
        else:
            log.debug("PostgreSQL still failing (%s); next try in %.1fs", type(error).__name__, delay)

    def _db_ok(self) -> None:
        if self._outage_since is not None:
            log.info(
                "PostgreSQL writes recovered after %.1fs (%d failed attempts)",
                time.monotonic() - self._outage_since,
                self._attempt,
            )
        self._outage_since = None
        self._attempt = 0
        self._retry_at = 0.0
        self.stats.db_down = False


# -- the stream --------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """Owned by the stream thread."""

    ticks: int = 0
    #: Ticks merged into one not yet written (coalesced instead of queued).
    skipped: int = 0
    bad_frames: int = 0
    bad_entries: int = 0
    coin_m_ignored: int = 0
    connections: int = 0
    reconnects: int = 0
    watchdog_reconnects: int = 0
    last_tick_at: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


class MarkPriceStreamer:
    """huey-style: ``initialize()``, ``loop()`` until ``ctx.stop``, ``shutdown()``; ``run()`` does all three.

    Runnable in-process (tests start ``run`` in a thread and set ``ctx.stop``) or as the forked child.
    """

    def __init__(self, settings: Settings, ctx: ChildContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.url = settings.binance.ws_url.rstrip("/") + MARK_PRICE_ROUTE
        self.writer = PriceWriter(settings)
        self.stats = StreamStats()
        self.ws: websocket.WebSocket | None = None
        self._attempt = 0
        self._next_connect_at = 0.0
        self._connected_at = 0.0
        self._connection_ticks = 0
        self._last_tick_at = 0.0
        self._last_ping_at = 0.0
        self._ping_sent_at: float | None = None
        self._bad_logged = (0, 0)
        self._bad_logged_at = 0.0

    # lifecycle
    def initialize(self) -> None:
        os.makedirs(heartbeat_dir(self.settings), exist_ok=True)
        mp = self.settings.mark_price
        log.info(
            "mark-price stream %s: strategy=%s chunk_size=%d watchdog=%.1fs reload=%.0fs",
            self.url, mp.strategy, mp.chunk_size, mp.watchdog_s, mp.reload_s,
        )
        self.writer.start()
        self.ctx.beat("connecting", force=True)

    def run(self) -> int:
        self.initialize()
        try:
            while not self.ctx.stop.is_set():
                if not self.writer.alive:
                    log.error("mark-price writer thread died; exiting for a restart")
                    return exitcodes.EXIT_ERROR
                self.loop()
        finally:
            self.shutdown()
        return exitcodes.EXIT_OK

    def shutdown(self) -> None:
        self._close()
        self.writer.stop()
        self.ctx.beat("stopped", force=True)

    # one step of the stream: connect, or receive one frame and check liveness
    def loop(self) -> None:
        if self.ctx.reload.is_set():  # SIGHUP: new symbol map, same connection
            self.ctx.reload.clear()
            self.writer.request_reload()
        if self.ws is None:
            wait = self._next_connect_at - time.monotonic()
            if wait > 0:
                self._beat("backoff")
                self.ctx.stop.wait(min(wait, RECV_TIMEOUT_S))
                return
            self._connect()
            return
        self._receive()
        if self.ws is not None:
            self._check_liveness()
        self._beat()

    def _connect(self) -> None:
        self._beat("connecting")
        try:
            ws = websocket.create_connection(self.url, timeout=CONNECT_TIMEOUT_S, skip_utf8_validation=True)
        except (OSError, websocket.WebSocketException) as e:
            self._reconnect_later(f"connect failed: {type(e).__name__}: {e}")
            return
        ws.settimeout(RECV_TIMEOUT_S)
        self.ws = ws
        now = time.monotonic()
        self._last_tick_at = now  # the watchdog runs from the handshake
        self._connected_at = now
        self._connection_ticks = 0
        self._last_ping_at = now
        self._ping_sent_at = None
        self.stats.connections += 1
        log.info("connected to %s", self.url)

    def _close(self, graceful: bool = True) -> None:
        """Close handshake on a healthy connection; just drop the socket of a dead or silent one."""
        if self.ws is not None:
            try:
                if graceful:
                    self.ws.close(timeout=1.0)
                else:
                    self.ws.shutdown()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail any way it likes
                pass
            self.ws = None

    def _reconnect_later(self, reason: str) -> None:
        self._close(graceful=False)
        delay = backoff_delay(
            self._attempt,
            base_s=self.settings.supervisor.backoff_base_s,
            cap_exponent=self.settings.supervisor.backoff_cap_exponent,
            jitter_ratio=self.settings.supervisor.backoff_jitter_ratio,
        )
        self._attempt += 1
        self._next_connect_at = time.monotonic() + delay
        self.stats.reconnects += 1
        key = reason.split(":", 1)[0]
        self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
        log.warning("mark-price stream: %s; reconnecting in %.1fs", reason, delay)

    def _receive(self) -> None:
        assert self.ws is not None
        try:
            opcode, data = self.ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return
        except (OSError, websocket.WebSocketException) as e:
            self._reconnect_later(f"connection lost: {type(e).__name__}: {e}")
            return
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            self.handle_frame(data)
        elif opcode == websocket.ABNF.OPCODE_PONG:
            self._ping_sent_at = None
        elif opcode == websocket.ABNF.OPCODE_CLOSE:
            self._reconnect_later("server closed the connection")
        # OPCODE_PING: websocket-client already answered with the same payload

    def handle_frame(self, raw: bytes | str) -> None:
        """One text frame: parse, count, hand the prices to the writer (never raises on bad input)."""
        st = self.stats
        try:
            parsed = parse_mark_price_frame(raw, include_coin_m=self.settings.mark_price.include_coin_m)
        except FrameError as e:
            st.bad_frames += 1
            self._log_bad_input(str(e))
            return
        now = time.monotonic()
        st.ticks += 1
        st.last_tick_at = self._last_tick_at = now
        self._connection_ticks += 1
        if self._attempt and now - self._connected_at >= STREAM_HEALTHY_AFTER_S:
            self._attempt = 0
        st.coin_m_ignored += parsed.coin_m
        if parsed.bad_entries:
            st.bad_entries += parsed.bad_entries
            self._log_bad_input(f"{parsed.bad_entries} bad entries in the last frame")
        if parsed.prices and self.writer.mailbox.put(parsed.prices):
            st.skipped += 1

    def _log_bad_input(self, last: str) -> None:
        now = time.monotonic()
        counts = (self.stats.bad_frames, self.stats.bad_entries)
        if now - self._bad_logged_at >= BAD_INPUT_LOG_INTERVAL_S and counts != self._bad_logged:
            self._bad_logged_at = now
            self._bad_logged = counts
            log.warning(
                "mark-price stream: skipped bad input (%s); totals: %d bad frames, %d bad entries",
                last, counts[0], counts[1],
            )

    def _check_liveness(self) -> None:
        assert self.ws is not None
        mp = self.settings.mark_price
        now = time.monotonic()
        silent = now - self._last_tick_at
        if silent > mp.watchdog_s:
            self.stats.watchdog_reconnects += 1
            self._reconnect_later(f"watchdog: no tick for {silent:.1f}s")
            return
        if self._ping_sent_at is not None and now - self._ping_sent_at > mp.pong_timeout_s:
            self._reconnect_later(f"pong timeout: no pong for {now - self._ping_sent_at:.1f}s")
            return
        if self._ping_sent_at is None and now - self._last_ping_at >= mp.ping_interval_s:
            try:
                self.ws.ping(PING_PAYLOAD)
            except (OSError, websocket.WebSocketException) as e:
                self._reconnect_later(f"ping failed: {type(e).__name__}: {e}")
                return
            self._last_ping_at = self._ping_sent_at = now

    def _beat(self, state: str | None = None) -> None:
        w = self.writer.stats
        if state is None:
            state = "db-down" if w.db_down else ("streaming" if self._connection_ticks else "connecting")
        self.ctx.beat(
            state,
            symbols=w.symbols,
            rows=w.rows,
            ticks=self.stats.ticks,
            last_write_ms=w.last_write_ms,
            skipped=self.stats.skipped,
        )


def run_mark_price_child(ctx: ChildContext) -> int:
    """Entry point of the forked mark-price child (``run_child`` has already called ``after_fork``)."""
    # Everything inherited from the supervisor lives as long as this process: move it out of the
    # collector's reach, so the gc.collect() after every batch scans only what the ticks allocate
    # (and never touches -- copy-on-write duplicates -- the parent's pages).
    gc.freeze()
    return MarkPriceStreamer(ctx.settings, ctx).run()
