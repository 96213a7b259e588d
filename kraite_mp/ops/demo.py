"""``kraite-mp demo``: the whole system on one machine, with no configuration, for a bounded time.

Steps (each one printed as it happens):

1. PostgreSQL: ``KRAITE_DATABASE_URL`` if set (a database ``kraite_demo_<id>`` of this run is created on
   that server and dropped at the end, the given database is never touched), else an embedded server (``kraite_mp.ops.embedded``).
2. Redis: ``KRAITE_REDIS_URL`` if set (keys under a fresh ``kraite-demo-<id>`` namespace, deleted at
   the end), else an embedded ``redis-server``.
3. Schema migrations, a new secret key (Fernet), the simulator's accounts and its symbols seeded on
   Binance, Bybit, KuCoin and Bitget.
4. Three kinds of processes, each in its own process group: the exchange simulator
   (``kraite-mp simulate``), a Dramatiq worker (``dramatiq kraite_mp.jobs``) and ``kraite-mp run``.
5. A live per-account table (frames, audited rows, orders, transitions, latency frame -> row) and
   the mark-price writes, for ``--duration`` seconds or until Ctrl-C.
6. A summary, and the commands to inspect the data.

Every process the demo starts is stopped in a ``finally`` (SIGTERM to the process, then SIGKILL to
its whole group after a timeout), on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kraite_mp import exitcodes
from kraite_mp.ops.demo_console import DemoError, http_json
from kraite_mp.ops.demo_stack import DemoOptions, DemoStack
from kraite_mp.supervisor import runfiles

#: After the run, wait at most this long for queued frames to be processed before the summary.
DRAIN_TIMEOUT_S = 20.0
#: The window of the live latency columns (seconds).
LIVE_WINDOW_S = 30


class Demo(DemoStack):
    """The demo run: the stack up, the live table, the drain, the summary, everything stopped."""

    # -- entry point ---------------------------------------------------------------------------
    def run(self) -> int:
        c = self.console
        c.line(
            f"kraite-mp demo: {self.options.accounts} accounts, {self.options.symbols} symbols, "
            f"{self.options.rate:g} events/s per account, {self.options.duration_s:g} s (Ctrl-C stops early)"
        )
        c.line(f"work directory (logs, run dir, spool): {self.workdir}")
        code = exitcodes.EXIT_OK
        try:
            self.setup()
            self.live()
            self.drain()
            code = self.summary()
            if self.options.hold:
                self.hold()
        except KeyboardInterrupt:
            self.interrupted = True
            c.line("\ninterrupted: stopping everything")
            code = exitcodes.EXIT_ERROR
        except DemoError as e:
            c.line(f"\ndemo failed: {e}")
            code = exitcodes.EXIT_ERROR
        finally:
            self.teardown()
        return code

    def account_stats(self, window_s: float | None) -> dict[int, dict[str, Any]]:
        """Per account: audited frames, latency (ms, over the last ``window_s`` or the whole run), orders."""
        stats: dict[int, dict[str, Any]] = {a.id: {} for a in self.accounts}
        for account_id, frames, p50, p99 in self._query(
            "SELECT account_id, count(*),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at))"
            " FROM api_data_stream WHERE (%s::float8 IS NULL OR received_at > now() - make_interval(secs => %s))"
            " GROUP BY account_id",
            (window_s, window_s or 0.0),
        ):
            if account_id in stats:
                stats[account_id].update(
                    p50_ms=p50 * 1000 if p50 is not None else None,
                    p99_ms=p99 * 1000 if p99 is not None else None,
                    window_frames=frames,
                )
        for account_id, audited in self._query("SELECT account_id, count(*) FROM api_data_stream GROUP BY 1"):
            if account_id in stats:
                stats[account_id]["audited"] = audited
        for account_id, orders in self._query("SELECT account_id, count(*) FROM orders GROUP BY 1"):
            if account_id in stats:
                stats[account_id]["orders"] = orders
        for account_id, transitions in self._query(
            "SELECT account_id, count(*) FROM order_transitions GROUP BY 1"
        ):
            if account_id in stats:
                stats[account_id]["transitions"] = transitions
        return stats

    def mark_price_stats(self) -> list[tuple[str, int, int]]:
        """(exchange, rows with a mark price written in the last 5 s, rows) per exchange."""
        rows = self._query(
            "SELECT exchange, count(*) FILTER (WHERE mark_price_synced_at > now() - interval '5 seconds'), count(*)"
            " FROM exchange_symbols GROUP BY exchange ORDER BY exchange"
        )
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def table(self, elapsed: float) -> list[str]:
        stats = self.account_stats(LIVE_WINDOW_S)
        snap = {
            c.get("key"): c for c in self._supervisor_snapshot().get("children", []) if isinstance(c, dict)
        }
        header = (
            f"{'ACCOUNT':<12} {'STATE':<12} {'FRAMES':>7} {'AUDITED':>8} {'ORDERS':>7} {'UPDATES':>8} "
            f"{'P50 ms':>8} {'P99 ms':>8} {'RESTARTS':>8}"
        )
        lines = [
            f"--- {elapsed:5.0f} s / {self.options.duration_s:g} s "
            f"(latency = frame received -> row committed, last {LIVE_WINDOW_S} s) ---",
            header,
        ]
        for a in self.accounts:
            state, fields = self._beat(self.user_data_key(a))
            s = stats.get(a.id, {})
            child = snap.get(self.user_data_key(a)) or {}
            lines.append(
                f"{a.id:<3}{a.name:<9} {state:<12} {fields.get('frames', '-'):>7} "
                f"{s.get('audited', 0):>8} {s.get('orders', 0):>7} {s.get('transitions', 0):>8} "
                f"{_ms(s.get('p50_ms')):>8} {_ms(s.get('p99_ms')):>8} {child.get('restarts', '-'):>8}"
            )
        mp_state, mf = self._beat(runfiles.ROLE_MARK_PRICE)
        per_exchange = "  ".join(f"{ex} {fresh}/{total}" for ex, fresh, total in self.mark_price_stats())
        lines.append(
            f"mark-price   {mp_state:<12} ticks={mf.get('ticks', '-')} "
            f"rows/tick={mf.get('rows', '-')} write={mf.get('last_write_ms', '-')} ms"
        )
        lines.append(f"             rows priced in the last 5 s: {per_exchange or '-'}")
        return lines

    def live(self) -> None:
        c = self.console
        c.line("")
        self.started_wall = time.time()
        started = time.monotonic()
        next_draw = started
        try:
            while True:
                now = time.monotonic()
                elapsed = now - started
                if elapsed >= self.options.duration_s:
                    break
                self._check_processes()
                if now >= next_draw:
                    c.redraw(self.table(elapsed))
                    next_draw = now + self.options.refresh_s
                time.sleep(min(0.2, max(0.0, self.options.duration_s - elapsed)))
        except KeyboardInterrupt:
            self.interrupted = True
            c.line(
                "\nCtrl-C: stopping the market and writing the summary (Ctrl-C again is ignored while stopping)"
            )
        finally:
            self.run_seconds = time.monotonic() - started

    def drain(self) -> None:
        """Stop new events and let the queued frames reach the database, so the summary adds up."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        c = self.console
        try:
            http_json(f"{self.sim['control_url']}/set_rate", {"events_per_s": 0})
        except (OSError, urllib.error.URLError, ValueError) as e:
            c.line(f"cannot pause the simulator ({e}); the summary may miss frames in flight")
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        sent = received = audited = -1
        settled = 0
        while time.monotonic() < deadline:
            previous = received
            sent = self._frames_sent()
            received = sum(
                int(self._beat(self.user_data_key(a))[1].get("frames", 0) or 0) for a in self.accounts
            )
            audited = self._query("SELECT count(*) FROM api_data_stream")[0][0]
            if audited >= received >= sent >= 0:
                break
            # frames lost in a disconnect never arrive: stop waiting once what arrived is processed
            settled = settled + 1 if audited >= received == previous else 0
            if settled >= 4:
                break
            time.sleep(0.5)
        c.line(f"market paused; frames sent {sent}, received {received}, audited {audited}")

    def _frames_sent(self) -> int:
        try:
            stats = http_json(f"{self.sim['control_url']}/stats")
        except (OSError, urllib.error.URLError, ValueError):
            return -1
        sent = stats.get("frames_sent") or {}
        return sum(int(sent.get(a.api_key, 0)) for a in self.accounts)

    def _truth_check(self) -> tuple[int, int, int]:
        """(orders in the DB whose status equals the exchange's, orders in the DB, orders at the exchange)."""
        matched = in_db = at_exchange = 0
        for a in self.accounts:
            try:
                truth = http_json(f"{self.sim['control_url']}/truth?api_key={urllib.parse.quote(a.api_key)}")
            except (OSError, urllib.error.URLError, ValueError):
                continue
            exchange: dict[tuple[str, int], str] = {}
            for o in truth.get("orders", []):
                exchange[("regular", int(o["orderId"]))] = o["status"]
            for o in truth.get("algo_orders", []):
                exchange[("algo", int(o["algoId"]))] = o.get("algoStatus") or o.get("status") or ""
            at_exchange += len(exchange)
            for kind, order_id, status in self._query(
                "SELECT kind, exchange_order_id, status FROM orders WHERE account_id = %s", (a.id,)
            ):
                in_db += 1
                if exchange.get((kind, int(order_id))) == status:
                    matched += 1
        return matched, in_db, at_exchange

    def summary(self) -> int:
        c = self.console
        c.line("")
        c.line(f"=== summary: {self.run_seconds:.0f} s, {len(self.accounts)} accounts ===")
        stats = self.account_stats(None)
        audited = sum(s.get("audited", 0) for s in stats.values())
        c.line(
            f"frames processed (audited in api_data_stream): {audited} "
            f"({audited / max(self.run_seconds, 1e-9):.1f}/s); sent by the simulator: {self._frames_sent()}"
        )
        outcomes = self._query(
            "SELECT event_type, outcome, count(*) FROM api_data_stream GROUP BY 1, 2 ORDER BY 3 DESC"
        )
        c.line("  by event and outcome: " + ", ".join(f"{e or '?'}/{o} {n}" for e, o, n in outcomes[:10]))
        (lat,) = self._query(
            "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM processed_at - received_at)), max(processed_at - received_at)"
            " FROM api_data_stream"
        )
        if lat[0]:
            p50, p95, p99 = (v * 1000 for v in lat[0])
            c.line(
                f"latency frame received -> row committed: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                f"p99 {p99:.1f} ms, max {lat[1].total_seconds() * 1000:.1f} ms"
            )
        orders = sum(s.get("orders", 0) for s in stats.values())
        transitions = sum(s.get("transitions", 0) for s in stats.values())
        matched, in_db, at_exchange = self._truth_check()
        c.line(
            f"orders: {orders} rows, {transitions} status transitions; {matched}/{in_db} match the exchange's "
            f"current status ({at_exchange} orders at the exchange: NEW-only orders are not dispatched by "
            "default and arrive with the periodic REST reconciliation)"
        )
        (mp,) = self._query(
            "SELECT count(*) FILTER (WHERE mark_price IS NOT NULL), count(*), max(mark_price_synced_at)"
            " FROM exchange_symbols"
        )
        beat = self._beat(runfiles.ROLE_MARK_PRICE)[1]
        c.line(
            f"mark prices: {mp[0]}/{mp[1]} exchange_symbols rows priced across 4 exchanges; "
            f"{beat.get('ticks', '?')} ticks of {beat.get('rows', '?')} rows each"
        )
        snapshot = self._supervisor_snapshot()
        c.line(
            f"supervisor: {snapshot.get('children_alive', '?')} children, restarts {snapshot.get('restarts', '?')}"
        )
        c.line("")
        for line in self.table(self.run_seconds)[1:]:
            c.line(line)
        self.print_inspection()
        if audited == 0:
            c.line("\nno frame was processed: see the logs in " + str(self.workdir / "logs"))
            return exitcodes.EXIT_ERROR
        return exitcodes.EXIT_OK

    def print_inspection(self) -> None:
        c = self.console
        url = display_url(self.database_url)
        c.line("")
        c.line("=== inspect the data ===")
        queries = (
            "SELECT account_id, event_type, outcome, count(*) FROM api_data_stream GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;",
            "SELECT account_id, kind, symbol, side, status, filled_quantity, updated_at FROM orders"
            " ORDER BY updated_at DESC LIMIT 20;",
            "SELECT o.account_id, o.exchange_order_id, t.from_status, t.to_status, t.source FROM order_transitions t"
            " JOIN orders o ON o.id = t.order_id ORDER BY t.id DESC LIMIT 20;",
            "SELECT exchange, symbol, mark_price, mark_price_synced_at FROM exchange_symbols"
            " WHERE token IN ('BTC', 'XBT') ORDER BY exchange;",
        )
        for q in queries:
            c.line(f'  psql "{url}" -c "{q}"')
        c.line("  process status (while the demo runs, or with --hold):")
        c.line(
            f"  KRAITE_REDIS_URL={display_url(self.redis_url)} KRAITE_REDIS_NAMESPACE={self.namespace} "
            "kraite-mp status"
        )
        listen = self.env.get("KRAITE__metrics__listen", "127.0.0.1:9464")
        if listen:
            c.line(
                f"  metrics (Prometheus; docs/METRICS.md): curl http://{listen}/metrics  (also /healthz, /readyz)"
            )
        c.line(f"  logs: {self.workdir / 'logs'}")
        if self.embedded_pg or self.embedded_redis:
            if self.options.hold:
                c.line("  the embedded servers stay up until you press Ctrl-C")
            else:
                c.line(
                    "  the embedded servers stop with the demo: run it with --hold "
                    "(make demo DEMO_ARGS=--hold) to keep them up for these commands"
                )
        elif self.options.hold:
            c.line(f"  the database {self.database_name} stays on your server until you press Ctrl-C")
        else:
            c.line(
                f"  the database {self.database_name} is dropped when the demo ends: run it with --hold"
                " to keep it for these commands"
            )

    def hold(self) -> None:
        """Stop the streams but keep PostgreSQL and Redis up for inspection until Ctrl-C."""
        self.stop_processes()
        self.console.line("\nstreams stopped; PostgreSQL and Redis are up. Ctrl-C to stop them.")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def display_url(url: str) -> str:
    """The URL to print: a password is masked, an empty one (embedded PostgreSQL) is left out."""
    from kraite_mp.config import redact_url

    parts = urllib.parse.urlsplit(url)
    if parts.password == "":
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(":@", "@", 1)))
    return redact_url(url)


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


_F = TypeVar("_F", bound=Callable[..., Any])


def _option(
    flag: str, name: str, type: click.ParamType[Any, Any], help: str | None = None
) -> Callable[[_F], _F]:
    """``--flag`` for the ``DemoOptions`` field ``name``; the default is the dataclass's own."""
    return click.option(
        flag, name, type=type, default=getattr(DemoOptions, name), show_default=True, help=help
    )


@click.command("demo")
@_option("--duration", "duration_s", click.FloatRange(min=1), "Seconds of live streaming before the summary.")
@_option(
    "--accounts",
    "accounts",
    click.IntRange(1, 500),
    "Simulated Binance accounts (one user-data process each).",
)
@_option("--rate", "rate", click.FloatRange(min=0), "Simulator scenario steps per second per account.")
@_option("--symbols", "symbols", click.IntRange(1, 5000), "Symbols in the mark-price stream.")
@_option("--refresh", "refresh_s", click.FloatRange(min=0.2), "Seconds between table refreshes.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Logs, run dir and spool go here (default: a new temporary directory, kept).",
)
@click.option("--hold", is_flag=True, help="After the summary keep PostgreSQL and Redis up until Ctrl-C.")
@_option("--worker-processes", "worker_processes", click.IntRange(1, 64))
@_option("--worker-threads", "worker_threads", click.IntRange(1, 256))
@click.pass_context
def demo_command(ctx: click.Context, /, **options: Any) -> None:
    """Run everything locally against the exchange simulator, with a live table, then a summary.

    Needs no configuration: uses KRAITE_DATABASE_URL / KRAITE_REDIS_URL when set, else embedded
    PostgreSQL and Redis. Stops every process it started, also on Ctrl-C or error.
    """
    from kraite_mp.logs import setup_logging

    setup_logging("WARNING")
    # SIGTERM cleans up like Ctrl-C; SIGINT is set explicitly because a shell starts background jobs
    # with it ignored, and Python then installs no KeyboardInterrupt handler
    previous = {
        sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        code = Demo(DemoOptions(**options)).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ctx.exit(code)
