"""The mark-price child: Binance ``!markPrice@arr@1s`` -> ``exchange_symbols.mark_price`` on four exchanges.

The hottest write path of the system (every second, every symbol, every exchange). Two threads:

- the stream thread (``MarkPriceStreamer``, on the shared connection loop) receives, parses and
  validates each array frame (``binance.market``) and drops the prices into a one-slot
  ``Mailbox``; it never touches PostgreSQL, so a slow or absent database never stalls the stream.
- the writer thread (``PriceWriter``) owns the database connection and the symbol map
  (``store.symbols``): it takes whatever the mailbox holds, maps Binance symbols to the rows of
  every exchange listing the same token + quote, and writes them in one bulk UPDATE.

Coalescing: a tick that arrives while the previous one is still being written is merged into the
pending slot (newest price per symbol wins) instead of queued, so the writer always writes the
freshest state and memory cannot grow; ``skipped`` counts the ticks coalesced.

Title: ``kraite-mp: mark-price state=streaming symbols=568 rows=2272 ticks=86400 last_write_ms=11 skipped=0``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from kraite_mp import exitcodes
from kraite_mp.backoff import Attempts
from kraite_mp.binance.connections import ConnectionBudget, connection_budget
from kraite_mp.binance.market import MARK_PRICE_ROUTE, FrameError, PriceText, parse_mark_price_frame
from kraite_mp.binance.tls import client_context
from kraite_mp.config import Settings
from kraite_mp.metrics import series
from kraite_mp.store import db as kdb
from kraite_mp.store.symbols import BulkWriter, SymbolMap, load_symbol_map, resolve_rows
from kraite_mp.streams.connection import WebSocketStream
from kraite_mp.streams.liveness import Disconnect, Liveness, Reason
from kraite_mp.supervisor import runfiles
from kraite_mp.supervisor.context import ChildContext

log = logging.getLogger(__name__)

#: Socket read timeout: how quickly the stream loop notices ``ctx.stop``, the watchdog and pings.
RECV_TIMEOUT_S = 0.5
#: TCP connect + WebSocket handshake timeout (short: ``ctx.stop`` is not checked while connecting).
CONNECT_TIMEOUT_S = 5.0
#: How long the writer thread sleeps waiting for a tick before re-checking stop/reload.
WRITER_WAIT_S = 0.5
#: After an unexpected writer error, wait this long before the next tick.
WRITER_ERROR_PAUSE_S = 1.0
#: Counters of bad input are logged at most this often (a broken feed must not flood the log).
BAD_INPUT_LOG_INTERVAL_S = 60.0
#: How long ``shutdown`` waits for an in-flight write to finish (under the supervisor's graceful timeout).
WRITER_JOIN_TIMEOUT_S = 5.0


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

    writes: int = 0  #: committed ticks
    symbols: int = 0  #: last committed tick: Binance symbols matched
    rows: int = 0  #: last committed tick: exchange_symbols rows updated
    last_write_ms: int = 0  #: last committed tick: wall time to COMMIT
    unknown_last: int = 0  #: symbols of the last tick with no exchange_symbols row
    unknown_total: int = 0  #: the same, summed over every tick
    write_errors: int = 0  #: writes that failed (outage or not)
    map_reloads: int = 0  #: times the symbol map was (re)loaded
    map_symbols: int = 0  #: Binance symbols in the current map
    map_rows: int = 0  #: exchange_symbols rows in the current map
    db_down: bool = False  #: PostgreSQL is unreachable right now


class PriceWriter:
    """The database side: symbol map, bulk write, outage handling. ``write_prices`` is the write path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bulk = BulkWriter(settings.mark_price.chunk_size)
        self.mailbox = Mailbox()
        self.stats = WriterStats()
        self.conn: Any = None
        self.symbol_map: SymbolMap | None = None
        self.attempts = Attempts.from_settings(settings.supervisor)
        self._reload = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
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
                self._stop.wait(WRITER_ERROR_PAUSE_S)

    def step(self, timeout: float = WRITER_WAIT_S) -> int | None:
        """Wait for a tick and write it; returns rows written, or None if nothing was written."""
        now = time.monotonic()
        if now < self._retry_at:  # in an outage: leave ticks in the mailbox until the retry time
            self._stop.wait(min(timeout, self._retry_at - now))
            return None
        if self._reload.is_set() or self._map_stale():
            try:
                self.reload_map()
            except Exception as e:
                self._db_failed(e)
                return None
        batch = self.mailbox.take(timeout)
        if not batch:
            return None
        try:
            return self.write_prices(batch)
        except Exception as e:
            if kdb.is_transient(e):
                self.mailbox.restore(batch)
            self._db_failed(e)
            return None

    # database
    def _map_stale(self) -> bool:
        return (
            self.symbol_map is None
            or time.monotonic() - self.symbol_map.loaded_at >= self.settings.mark_price.reload_s
        )

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
        if (
            old is None
            or old.targets.keys() != symbol_map.targets.keys()
            or old.row_count != symbol_map.row_count
        ):
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
        elapsed_s = time.perf_counter() - started
        elapsed_ms = elapsed_s * 1000.0
        m = series()
        m.MARK_PRICE_WRITE.observe(elapsed_s)
        m.MARK_PRICE_ROWS.inc(updated)
        m.MARK_PRICE_LAST_TICK.set(time.time())
        if unknown:
            m.MARK_PRICE_SKIPPED.labels("unknown-symbol").inc(unknown)
        st = self.stats
        st.writes += 1
        st.symbols = matched
        st.rows = updated
        st.last_write_ms = round(elapsed_ms)
        st.unknown_last = unknown
        st.unknown_total += unknown
        if (
            unknown != self._last_unknown_logged
            and time.monotonic() - self._last_unknown_log_at >= BAD_INPUT_LOG_INTERVAL_S
        ):
            self._last_unknown_logged = unknown
            self._last_unknown_log_at = time.monotonic()
            log.info("%d symbols in the mark-price stream have no exchange_symbols row", unknown)
        self._db_ok()
        del rows
        gc.collect()  # cycles from parsing/psycopg2 would otherwise pile up between generations: memory stays flat
        return updated

    def _db_failed(self, error: Exception) -> None:
        """An outage (``is_transient``): keep the stream, retry with backoff. Anything else is a bug: raise it."""
        self.stats.write_errors += 1
        self.close()
        if not kdb.is_transient(error):
            raise error
        delay = self.attempts.next_delay()
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
                self.attempts.count,
            )
        self._outage_since = None
        self.attempts.reset()
        self._retry_at = 0.0
        self.stats.db_down = False


# -- the stream --------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """Owned by the stream thread."""

    ticks: int = 0  #: mark-price arrays received
    skipped: int = 0  #: ticks merged into one not yet written (coalesced instead of queued)
    bad_frames: int = 0  #: frames that were not a mark-price array
    bad_entries: int = 0  #: array items without a usable symbol or price
    coin_m_ignored: int = 0  #: COIN-M symbols left out (USD-M only)
    connections: int = 0  #: successful connects
    reconnects: int = 0  #: connections that ended and were reopened
    watchdog_reconnects: int = 0  #: of those, ended by the silence watchdog or a missing pong
    last_tick_at: float = 0.0  #: time.monotonic() of the last tick
    reasons: dict[Reason, int] = field(default_factory=dict)  #: reconnects by reason


class MarkPriceStreamer(WebSocketStream):
    """The stream thread; ``run()`` = ``initialize()``, ``loop()`` until ``ctx.stop``, ``shutdown()``.

    Runnable in-process (tests start ``run`` in a thread and set ``ctx.stop``) or as the forked child.
    """

    def __init__(self, settings: Settings, ctx: ChildContext) -> None:
        mp = settings.mark_price
        super().__init__(
            Liveness(
                ping_interval_s=mp.ping_interval_s,
                pong_timeout_s=mp.pong_timeout_s,
                # a tick comes every second: only valid ticks (and pongs) prove the stream alive
                silence_s=mp.watchdog_s,
                recv_timeout_s=RECV_TIMEOUT_S,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                reconnect_spread_s=settings.binance.reconnect_spread_s,
            ),
            Attempts.from_settings(settings.supervisor),
            ctx.stop,
            log,
        )
        self.settings = settings
        self.ctx = ctx
        self.tls = client_context(settings.binance.ca_file)  # the supervisor's, made before the fork
        self.url = settings.binance.ws_url.rstrip("/") + MARK_PRICE_ROUTE
        self.writer = PriceWriter(settings)
        self.stats = StreamStats()
        #: The egress's connection attempts (built in ``initialize``, after the fork).
        self.connections: ConnectionBudget | None = None
        self._connection_ticks = 0
        self._bad_logged = (0, 0)
        self._bad_logged_at = 0.0

    # lifecycle
    def initialize(self) -> None:
        os.makedirs(runfiles.heartbeat_dir(self.settings.run_dir), exist_ok=True)
        mp = self.settings.mark_price
        log.info(
            "mark-price stream %s: strategy=%s chunk_size=%d watchdog=%.1fs reload=%.0fs",
            self.url,
            mp.strategy,
            mp.chunk_size,
            mp.watchdog_s,
            mp.reload_s,
        )
        self.connections = connection_budget(self.settings)
        self.writer.start()
        self.ctx.beat("connecting", force=True)

    def loop(self) -> None:
        if not self.writer.alive:
            log.error("mark-price writer thread died; exiting for a restart")
            self.exit_code = exitcodes.EXIT_ERROR
            return
        if self.ctx.reload.is_set():  # SIGHUP: new symbol map, same connection
            self.ctx.reload.clear()
            self.writer.request_reload()
        super().loop()

    def shutdown(self) -> None:
        super().shutdown()
        self.writer.stop()
        self.ctx.beat("stopped", force=True)

    # the connection hooks
    def before_connect(self) -> float:
        return 0.0 if self.connections is None else self.connections.take()

    def connect_url(self) -> str:
        return self.url

    def on_connected(self) -> None:
        self._connection_ticks = 0
        self.stats.connections += 1
        log.info("connected to %s", self.url)

    def on_frame(self, data: bytes) -> bool:
        return self.handle_frame(data)

    def on_disconnected(self, d: Disconnect, delay_s: float) -> None:
        st = self.stats
        st.reconnects += 1
        st.reasons[d.reason] = st.reasons.get(d.reason, 0) + 1
        if d.reason is Reason.SILENT:
            st.watchdog_reconnects += 1
        level = logging.INFO if d.planned else logging.WARNING
        log.log(level, "mark-price stream: %s; reconnecting in %s", d, self.delay_text(delay_s))

    def handle_frame(self, raw: bytes | str) -> bool:
        """One text frame: parse, count, hand the prices to the writer; True if it was a tick (never raises)."""
        st = self.stats
        try:
            parsed = parse_mark_price_frame(raw, include_coin_m=self.settings.mark_price.include_coin_m)
        except FrameError as e:
            st.bad_frames += 1
            series().MARK_PRICE_SKIPPED.labels("bad-frame").inc()
            self._log_bad_input(str(e))
            return False
        st.ticks += 1
        st.last_tick_at = time.monotonic()
        self._connection_ticks += 1
        st.coin_m_ignored += parsed.coin_m
        if parsed.bad_entries:
            st.bad_entries += parsed.bad_entries
            series().MARK_PRICE_SKIPPED.labels("bad-entry").inc(parsed.bad_entries)
            self._log_bad_input(f"{parsed.bad_entries} bad entries in the last frame")
        if parsed.prices and self.writer.mailbox.put(parsed.prices):
            st.skipped += 1
            series().MARK_PRICE_SKIPPED.labels("coalesced").inc()
        return True

    def _log_bad_input(self, last: str) -> None:
        now = time.monotonic()
        counts = (self.stats.bad_frames, self.stats.bad_entries)
        if now - self._bad_logged_at >= BAD_INPUT_LOG_INTERVAL_S and counts != self._bad_logged:
            self._bad_logged_at = now
            self._bad_logged = counts
            log.warning(
                "mark-price stream: skipped bad input (%s); totals: %d bad frames, %d bad entries",
                last,
                counts[0],
                counts[1],
            )

    def beat(self, state: str | None = None) -> None:
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
