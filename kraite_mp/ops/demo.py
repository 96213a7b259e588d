"""``kraite-mp demo``: the whole system on one machine, with no configuration, for a bounded time.

Steps (each one printed as it happens):

1. PostgreSQL: ``KRAITE_DATABASE_URL`` if set (a database ``kraite_demo`` is (re)created on that
   server, the given database is never touched), else an embedded server (``kraite_mp.ops.embedded``).
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

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from kraite_mp import exitcodes

log = logging.getLogger(__name__)

#: The database the demo creates on an external PostgreSQL server (never the one in the URL).
DEMO_DATABASE = "kraite_demo"
#: How long a started process may take to become ready (simulator line, streams connected).
READY_TIMEOUT_SECS = 90.0
#: SIGTERM -> wait this long -> SIGKILL the process group (kraite-mp's own graceful timeout is 10 s).
STOP_TIMEOUT_SECS = 20.0
#: After the run, wait at most this long for queued frames to be processed before the summary.
DRAIN_TIMEOUT_SECS = 20.0
#: Dramatiq's shutdown timeout for the demo worker (milliseconds).
WORKER_SHUTDOWN_TIMEOUT_MS = 10_000
#: Lines of a process log shown when it fails.
LOG_TAIL_LINES = 25
#: The window of the live latency columns.
LIVE_WINDOW_SECS = 30
QUEUES = ("user-data-stream", "reconcile")


class DemoError(RuntimeError):
    """A step failed; the message says which and why (no secrets)."""


# -- output ------------------------------------------------------------------------------------


class Console:
    """Progress lines, and a table redrawn in place on a terminal (appended otherwise)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = 0

    def line(self, text: str = "") -> None:
        self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, n: int, total: int, text: str) -> None:
        self.line(f"[{n}/{total}] {text}")

    def detail(self, text: str) -> None:
        self.line(f"      {text}")

    def redraw(self, lines: list[str]) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # cursor up N lines, clear to the end
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines) if self.tty else 0


@contextmanager
def timed(console: Console, what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    console.detail(f"{what} ({time.monotonic() - started:.1f} s)")


# -- processes ---------------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A subprocess in its own session (process group), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_SECS) -> str:
        """SIGTERM to the process itself (it stops its own children: dramatiq treats a second TERM as
        "kill now"), then SIGKILL to the whole group if it is late or left anything behind."""
        outcome = "had already exited"
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
                outcome = "stopped"
            except subprocess.TimeoutExpired:
                outcome = f"did not stop within {timeout_s:.0f} s: killed"
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in its group, if any
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        return f"{outcome}, exit code {self.proc.returncode}"


def start_process(name: str, args: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path,
                  stdout_pipe: bool = False) -> ManagedProcess:
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below in the parent
    try:
        proc = subprocess.Popen(
            args, env=dict(env), cwd=str(cwd), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file, stderr=log_file,
            start_new_session=True,  # Ctrl-C reaches only the demo, which stops everything in order
        )
    finally:
        log_file.close()
    return ManagedProcess(name, proc, log_path)


def read_line(proc: ManagedProcess, timeout_s: float) -> str:
    """The first stdout line of ``proc`` within ``timeout_s`` (the simulator's JSON line)."""
    assert proc.proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = proc.proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode()
        elif not proc.alive():
            break
    raise DemoError(f"{proc.name} printed nothing usable within {timeout_s:.0f} s:\n{proc.tail()}")


def http_json(url: str, body: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback simulator URL
        return json.loads(resp.read())


# -- the demo ----------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    duration_s: float = 60.0
    accounts: int = 5
    rate: float = 2.0
    symbols: int = 570
    refresh_s: float = 2.0
    workdir: Path | None = None
    hold: bool = False
    worker_processes: int = 1
    worker_threads: int = 8


@dataclass
class AccountRow:
    id: int
    name: str
    api_key: str


@dataclass
class Demo:
    options: DemoOptions
    console: Console = field(default_factory=Console)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []
        self.workdir = Path(self.options.workdir or tempfile.mkdtemp(prefix="kraite-demo-")).resolve()
        self.namespace = f"kraite-demo-{uuid.uuid4().hex[:8]}"
        self.database_url = ""
        self.redis_url = ""
        self.embedded_pg = False
        self.embedded_redis = False
        self.accounts: list[AccountRow] = []
        self.sim: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.conn: Any = None
        self.started_wall = 0.0
        self.run_seconds = 0.0
        self.failure: str | None = None
        self.interrupted = False
        self.seeded_rows = 0

    # -- entry point ---------------------------------------------------------------------------
    def run(self) -> int:
        c = self.console
        c.line(f"kraite-mp demo: {self.options.accounts} accounts, {self.options.symbols} symbols, "
               f"{self.options.rate:g} events/s per account, {self.options.duration_s:g} s (Ctrl-C stops early)")
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

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        total = 8
        c = self.console
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "run").mkdir(parents=True, exist_ok=True)

        c.step(1, total, "PostgreSQL")
        self._setup_postgres()
        c.step(2, total, "Redis")
        self._setup_redis()
        c.step(3, total, f"database {DEMO_DATABASE}: schema and secret key")
        self._setup_database()
        c.step(4, total, f"exchange simulator: {self.options.accounts} accounts, {self.options.symbols} symbols")
        self._start_simulator()
        c.step(5, total, "seeding accounts and symbols (Binance, Bybit, KuCoin, Bitget)")
        self._seed()
        c.step(6, total, "Dramatiq worker (queues " + ", ".join(QUEUES) + ")")
        self._start_worker()
        c.step(7, total, "kraite-mp run (one user-data process per account + the mark-price process)")
        self._start_supervisor()
        c.step(8, total, f"market opens: {self.options.rate:g} scenario steps/s per account")
        http_json(f"{self.sim['control_url']}/set_rate", {"events_per_s": self.options.rate})

    def _setup_postgres(self) -> None:
        from kraite_mp.config import redact_url
        from kraite_mp.store import db as kdb

        url = self.environ.get("KRAITE_DATABASE_URL")
        if url:
            self.console.detail(f"using KRAITE_DATABASE_URL ({redact_url(url)}); the demo uses its own "
                                f"database {DEMO_DATABASE} there")
            try:
                kdb.drop_database(url, DEMO_DATABASE)
                self.database_url = kdb.create_database(url, DEMO_DATABASE)
            except Exception as e:  # noqa: BLE001 - any failure here is a setup error to explain
                raise DemoError(f"cannot (re)create database {DEMO_DATABASE} with {redact_url(url)}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                                "(unset KRAITE_DATABASE_URL to use an embedded PostgreSQL)") from None
            return
        from kraite_mp.ops.embedded import PostgresServer

        with timed(self.console, "embedded PostgreSQL started"):
            warnings.filterwarnings("ignore", module="platformdirs")
            try:
                server = PostgresServer(datadir=str(self.workdir / "pg")).start()
            except Exception as e:  # noqa: BLE001
                raise DemoError(f"cannot start an embedded PostgreSQL: {e}") from None
        self.embedded_pg = True
        self.cleanups.append(("embedded PostgreSQL", server.stop))
        self.database_url = kdb.create_database(server.url, DEMO_DATABASE)

    def _setup_redis(self) -> None:
        from kraite_mp.config import redact_url
        from kraite_mp.ops.embedded import RedisServer, redis_reachable

        url = self.environ.get("KRAITE_REDIS_URL")
        if url:
            if not redis_reachable(url):
                raise DemoError(f"KRAITE_REDIS_URL {redact_url(url)} is not reachable "
                                "(unset it to use an embedded Redis)")
            self.redis_url = url
            self.console.detail(f"using KRAITE_REDIS_URL ({redact_url(url)}), keys under {self.namespace}:*")
            self.cleanups.append(("demo keys in Redis", self._delete_redis_keys))
            return
        with timed(self.console, "embedded Redis started"):
            (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
            try:
                server = RedisServer(workdir=str(self.workdir / "redis")).start()
            except Exception as e:  # noqa: BLE001
                raise DemoError(f"cannot start an embedded Redis: {e}") from None
        self.embedded_redis = True
        self.cleanups.append(("embedded Redis", server.stop))
        self.redis_url = server.url

    def _delete_redis_keys(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
        finally:
            client.close()

    def _setup_database(self) -> None:
        from kraite_mp.store import db as kdb
        from kraite_mp.store.accounts import generate_secret_key

        conn = kdb.connect(self.database_url, application_name="kraite-mp demo")
        applied = kdb.migrate(conn)
        conn.autocommit = True
        self.conn = conn
        self.console.detail(f"migrations applied: {', '.join(applied) if applied else 'none needed'}")
        secret_key = generate_secret_key()
        self.console.detail("generated a secret key (encrypts the API secrets at rest; not printed)")
        package_root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in self.environ.items() if not k.startswith("KRAITE")}
        env.update({
            "KRAITE_DATABASE_URL": self.database_url,
            "KRAITE_REDIS_URL": self.redis_url,
            "KRAITE_REDIS_NAMESPACE": self.namespace,
            "KRAITE_SECRET_KEY": secret_key,
            "KRAITE_RUN_DIR": str(self.workdir / "run"),
            "KRAITE__user_data_stream__spool_dir": str(self.workdir / "spool"),
            "KRAITE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        })
        self.env = env

    def _start_simulator(self) -> None:
        o = self.options
        proc = start_process(
            "simulator",
            [sys.executable, "-m", "kraite_mp", "simulate", "--port", "0", "--accounts", str(o.accounts),
             "--symbols", str(o.symbols), "--rate", "0"],
            self.env, self.workdir, self.workdir / "logs", stdout_pipe=True,
        )
        self.processes.append(proc)
        try:
            info = json.loads(read_line(proc, READY_TIMEOUT_SECS))
        except ValueError:
            raise DemoError(f"the simulator's first line is not JSON:\n{proc.tail()}") from None
        self.sim = info
        self.env["KRAITE_BINANCE_REST_URL"] = info["rest_url"]
        self.env["KRAITE_BINANCE_WS_URL"] = info["ws_url"]
        self.console.detail(f"pid {proc.pid}: REST {info['rest_url']}, WebSocket {info['ws_url']}")

    def _seed(self) -> None:
        from kraite_mp.store.accounts import add_account

        symbols_info = http_json(f"{self.sim['rest_url']}/fapi/v1/exchangeInfo")
        symbols = [s["symbol"] for s in symbols_info.get("symbols", [])]
        for i, acc in enumerate(self.sim["accounts"], start=1):
            account = add_account(self.conn, self.env["KRAITE_SECRET_KEY"], name=f"demo-{i}",
                                  api_key=acc["api_key"], api_secret=acc["api_secret"])
            self.accounts.append(AccountRow(account.id, account.name, acc["api_key"]))
        self.console.detail(f"{len(self.accounts)} accounts (secrets encrypted with the generated key)")
        try:
            from kraite_mp.ops.seed import seed_symbols
        except ImportError:
            self.console.detail("kraite_mp.ops.seed is not available: no symbols seeded (mark prices have no rows)")
            return
        self.conn.autocommit = False
        result = seed_symbols(self.conn, symbols)
        self.conn.autocommit = True
        self.seeded_rows = result.row_count
        per_exchange = ", ".join(f"{ex} {len(rows)}" for ex, rows in result.rows.items())
        self.console.detail(f"{result.row_count} exchange_symbols rows: {per_exchange}")

    def _start_worker(self) -> None:
        o = self.options
        proc = start_process(
            "worker",
            [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--queues", *QUEUES,
             "--processes", str(o.worker_processes), "--threads", str(o.worker_threads),
             "--worker-shutdown-timeout", str(WORKER_SHUTDOWN_TIMEOUT_MS)],
            self.env, self.workdir, self.workdir / "logs",
        )
        self.processes.append(proc)
        self.console.detail(f"pid {proc.pid}: {o.worker_processes} process(es) x {o.worker_threads} threads")

    def _start_supervisor(self) -> None:
        proc = start_process("kraite-mp-run", [sys.executable, "-m", "kraite_mp", "run"], self.env, self.workdir,
                             self.workdir / "logs")
        self.processes.append(proc)
        self.console.detail(f"pid {proc.pid}; waiting for every stream to connect ...")
        keys = [f"user-data-{a.id}" for a in self.accounts] + ["mark-price"]
        deadline = time.monotonic() + READY_TIMEOUT_SECS
        last_report = ""
        while True:
            self._check_processes()
            states = {k: (self._heartbeat(k) or {}).get("state", "-") for k in keys}
            ready = sum(1 for s in states.values() if s == "streaming")
            report = f"{ready}/{len(keys)} streaming"
            if report != last_report:
                self.console.detail(report + "  (" + ", ".join(f"{k}={v}" for k, v in states.items()) + ")")
                last_report = report
            if ready == len(keys):
                return
            if time.monotonic() > deadline:
                self.console.detail(f"not every stream is up after {READY_TIMEOUT_SECS:.0f} s; going on anyway")
                return
            time.sleep(0.5)

    # -- running -------------------------------------------------------------------------------
    def _heartbeat(self, key: str) -> dict[str, Any] | None:
        from kraite_mp.supervisor.context import read_heartbeat

        return read_heartbeat(str(self.workdir / "run" / "heartbeats" / f"{key}.json"))

    def _supervisor_snapshot(self) -> dict[str, Any]:
        try:
            with open(self.workdir / "run" / "supervisor.json") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _check_processes(self) -> None:
        for p in self.processes:
            if not p.alive():
                raise DemoError(f"{p.name} (pid {p.pid}) exited with code {p.proc.returncode}; "
                                f"last lines of {p.log_path}:\n{p.tail()}")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

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
                stats[account_id].update(p50_ms=p50 * 1000 if p50 is not None else None,
                                         p99_ms=p99 * 1000 if p99 is not None else None, window_frames=frames)
        for account_id, audited in self._query("SELECT account_id, count(*) FROM api_data_stream GROUP BY 1"):
            if account_id in stats:
                stats[account_id]["audited"] = audited
        for account_id, orders in self._query("SELECT account_id, count(*) FROM orders GROUP BY 1"):
            if account_id in stats:
                stats[account_id]["orders"] = orders
        for account_id, transitions in self._query("SELECT account_id, count(*) FROM order_transitions GROUP BY 1"):
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
        stats = self.account_stats(LIVE_WINDOW_SECS)
        snap = {c.get("key"): c for c in self._supervisor_snapshot().get("children", []) if isinstance(c, dict)}
        header = (f"{'ACCOUNT':<12} {'STATE':<12} {'FRAMES':>7} {'AUDITED':>8} {'ORDERS':>7} {'UPDATES':>8} "
                  f"{'P50 ms':>8} {'P99 ms':>8} {'RESTARTS':>8}")
        lines = [f"--- {elapsed:5.0f} s / {self.options.duration_s:g} s "
                 f"(latency = frame received -> row committed, last {LIVE_WINDOW_SECS} s) ---", header]
        for a in self.accounts:
            beat = self._heartbeat(f"user-data-{a.id}") or {}
            fields = beat.get("fields") or {}
            s = stats.get(a.id, {})
            child = snap.get(f"user-data-{a.id}") or {}
            lines.append(
                f"{a.id:<3}{a.name:<9} {str(beat.get('state', '-')):<12} {fields.get('frames', '-'):>7} "
                f"{s.get('audited', 0):>8} {s.get('orders', 0):>7} {s.get('transitions', 0):>8} "
                f"{_ms(s.get('p50_ms')):>8} {_ms(s.get('p99_ms')):>8} {child.get('restarts', '-'):>8}"
            )
        mp = self._heartbeat("mark-price") or {}
        mf = mp.get("fields") or {}
        per_exchange = "  ".join(f"{ex} {fresh}/{total}" for ex, fresh, total in self.mark_price_stats())
        lines.append(f"mark-price   {str(mp.get('state', '-')):<12} ticks={mf.get('ticks', '-')} "
                     f"rows/tick={mf.get('rows', '-')} write={mf.get('last_write_ms', '-')} ms")
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
            c.line("\nCtrl-C: stopping the market and writing the summary (Ctrl-C again is ignored while stopping)")
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
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECS
        sent = received = audited = -1
        settled = 0
        while time.monotonic() < deadline:
            previous = received
            sent = self._frames_sent()
            received = sum(int(((self._heartbeat(f"user-data-{a.id}") or {}).get("fields") or {}).get("frames", 0) or 0)
                           for a in self.accounts)
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
        c.line(f"frames processed (audited in api_data_stream): {audited} "
               f"({audited / max(self.run_seconds, 1e-9):.1f}/s); sent by the simulator: {self._frames_sent()}")
        outcomes = self._query("SELECT event_type, outcome, count(*) FROM api_data_stream GROUP BY 1, 2 ORDER BY 3 DESC")
        c.line("  by event and outcome: " + ", ".join(f"{e or '?'}/{o} {n}" for e, o, n in outcomes[:10]))
        (lat,) = self._query(
            "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM processed_at - received_at)), max(processed_at - received_at)"
            " FROM api_data_stream"
        )
        if lat[0]:
            p50, p95, p99 = (v * 1000 for v in lat[0])
            c.line(f"latency frame received -> row committed: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                   f"p99 {p99:.1f} ms, max {lat[1].total_seconds() * 1000:.1f} ms")
        orders = sum(s.get("orders", 0) for s in stats.values())
        transitions = sum(s.get("transitions", 0) for s in stats.values())
        matched, in_db, at_exchange = self._truth_check()
        c.line(f"orders: {orders} rows, {transitions} status transitions; {matched}/{in_db} match the exchange's "
               f"current status ({at_exchange} orders at the exchange: NEW-only orders are not dispatched by "
               "default and arrive with the periodic REST reconciliation)")
        (mp,) = self._query(
            "SELECT count(*) FILTER (WHERE mark_price IS NOT NULL), count(*), max(mark_price_synced_at)"
            " FROM exchange_symbols"
        )
        beat = (self._heartbeat("mark-price") or {}).get("fields") or {}
        c.line(f"mark prices: {mp[0]}/{mp[1]} exchange_symbols rows priced across 4 exchanges; "
               f"{beat.get('ticks', '?')} ticks of {beat.get('rows', '?')} rows each")
        snapshot = self._supervisor_snapshot()
        c.line(f"supervisor: {snapshot.get('children_alive', '?')} children, restarts {snapshot.get('restarts', '?')}")
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
        c.line(f"  KRAITE_REDIS_URL={display_url(self.redis_url)} KRAITE_REDIS_NAMESPACE={self.namespace} "
               "kraite-mp status")
        c.line(f"  logs: {self.workdir / 'logs'}")
        if self.embedded_pg or self.embedded_redis:
            if self.options.hold:
                c.line("  the embedded servers stay up until you press Ctrl-C")
            else:
                c.line("  the embedded servers stop with the demo: run it with --hold "
                       "(make demo DEMO_ARGS=--hold) to keep them up for these commands")
        else:
            c.line(f"  the database {DEMO_DATABASE} stays on your server; drop it with: dropdb {DEMO_DATABASE}")

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

    # -- teardown ------------------------------------------------------------------------------
    def stop_processes(self) -> None:
        # the streams first (nothing new is enqueued), then the worker (drains), then the exchange
        order = {"kraite-mp-run": 0, "worker": 1, "simulator": 2}
        for p in sorted(self.processes, key=lambda p: order.get(p.name, 9)):
            outcome = p.stop()
            self.console.line(f"stopped {p.name} (pid {p.pid}): {outcome}")
        self.processes.clear()

    def teardown(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        try:
            self.stop_processes()
            if self.conn is not None:
                try:
                    self.conn.close()
                except Exception:  # noqa: BLE001
                    pass
                self.conn = None
            for name, fn in reversed(self.cleanups):
                try:
                    fn()
                    self.console.line(f"stopped {name}")
                except Exception as e:  # noqa: BLE001 - keep cleaning up the rest
                    self.console.line(f"could not stop {name}: {e}")
            self.cleanups.clear()
            if self.embedded_pg:
                shutil.rmtree(self.workdir / "pg", ignore_errors=True)
            if self.embedded_redis:
                shutil.rmtree(self.workdir / "redis", ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def display_url(url: str) -> str:
    """The URL to print: a password is masked, an empty one (embedded PostgreSQL) is left out."""
    from kraite_mp.config import redact_url

    parts = urllib.parse.urlsplit(url)
    if parts.password == "":
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(":@", "@", 1)))
    return redact_url(url)


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


@click.command("demo")
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds of live streaming before the summary.")
@click.option("--accounts", type=click.IntRange(1, 500), default=5, show_default=True,
              help="Simulated Binance accounts (one user-data process each).")
@click.option("--rate", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Simulator scenario steps per second per account.")
@click.option("--symbols", type=click.IntRange(1, 5000), default=570, show_default=True,
              help="Symbols in the mark-price stream.")
@click.option("--refresh", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between table refreshes.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Logs, run dir and spool go here (default: a new temporary directory, kept).")
@click.option("--hold", is_flag=True, help="After the summary keep PostgreSQL and Redis up until Ctrl-C.")
@click.option("--worker-processes", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--worker-threads", type=click.IntRange(1, 256), default=8, show_default=True)
@click.pass_context
def demo_command(ctx: click.Context, duration: float, accounts: int, rate: float, symbols: int, refresh: float,
                 workdir: Path | None, hold: bool, worker_processes: int, worker_threads: int) -> None:
    """Run everything locally against the exchange simulator, with a live table, then a summary.

    Needs no configuration: uses KRAITE_DATABASE_URL / KRAITE_REDIS_URL when set, else embedded
    PostgreSQL and Redis. Stops every process it started, also on Ctrl-C or error.
    """
    from kraite_mp.logs import setup_logging

    setup_logging("WARNING")
    options = DemoOptions(duration_s=duration, accounts=accounts, rate=rate, symbols=symbols, refresh_s=refresh,
                          workdir=workdir, hold=hold, worker_processes=worker_processes,
                          worker_threads=worker_threads)
    # SIGTERM cleans up like Ctrl-C; SIGINT is set explicitly because a shell starts background jobs
    # with it ignored, and Python then installs no KeyboardInterrupt handler
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = Demo(options).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ctx.exit(code)
