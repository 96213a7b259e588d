"""The services and processes behind ``kraite-mp demo``: set up, watched, and always stopped.

PostgreSQL (``KRAITE_DATABASE_URL``, or an embedded server), Redis (``KRAITE_REDIS_URL``, or an
embedded ``redis-server``), then three kinds of processes, each in its own process group: the
exchange simulator, a Dramatiq worker and ``kraite-mp run``. Everything it starts is stopped in
``teardown`` (SIGTERM to the process, then SIGKILL to its whole group after a timeout).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kraite_mp.ops.demo_console import (
    Console,
    DemoError,
    ManagedProcess,
    http_json,
    read_line,
    start_process,
    timed,
)
from kraite_mp.supervisor import runfiles

#: The prefix of the database the demo creates (``kraite_demo_<id>``, one per run) on the PostgreSQL
#: server of ``KRAITE_DATABASE_URL`` (never the database in the URL) and drops at the end.
DEMO_DATABASE = "kraite_demo"
#: How long a started process may take to become ready (simulator line, streams connected).
READY_TIMEOUT_S = 90.0
#: Dramatiq's shutdown timeout for the demo worker (milliseconds).
WORKER_SHUTDOWN_TIMEOUT_MS = 10_000
#: The Dramatiq queues the demo worker consumes.
QUEUES = ("user-data-stream", "reconcile")


class _Server(Protocol):
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Server)


@dataclass
class DemoOptions:
    """What ``kraite-mp demo`` was asked for; these defaults are its options' defaults."""

    duration_s: float = 60.0  #: seconds of live streaming before the summary
    accounts: int = 5  #: simulated Binance accounts, one user-data process each
    rate: float = 2.0  #: simulator scenario steps per second per account
    symbols: int = 570  #: symbols in the mark-price stream
    refresh_s: float = 2.0  #: seconds between live-table refreshes
    workdir: Path | None = None  #: logs, run dir and spool (None: a new temporary directory, kept)
    hold: bool = False  #: after the summary keep PostgreSQL and Redis up until Ctrl-C
    worker_processes: int = 1  #: Dramatiq worker processes
    worker_threads: int = 8  #: threads per Dramatiq worker process


@dataclass
class AccountRow:
    id: int
    name: str
    api_key: str


@dataclass
class DemoStack:
    """Everything the demo runs; ``setup`` brings it up step by step, ``teardown`` stops it all."""

    options: DemoOptions
    console: Console = field(default_factory=Console)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []
        self.workdir = Path(self.options.workdir or tempfile.mkdtemp(prefix="kraite-demo-")).resolve()
        run_id = uuid.uuid4().hex[:8]
        self.namespace = f"kraite-demo-{run_id}"
        #: this run's own database: two demos on one server never touch each other's (or anyone's) data
        self.database_name = f"{DEMO_DATABASE}_{run_id}"
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

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        total = 8
        c = self.console
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)

        c.step(1, total, "PostgreSQL")
        self._setup_postgres()
        c.step(2, total, "Redis")
        self._setup_redis()
        c.step(3, total, f"database {self.database_name}: schema and secret key")
        self._setup_database()
        c.step(
            4, total, f"exchange simulator: {self.options.accounts} accounts, {self.options.symbols} symbols"
        )
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
            self.console.detail(
                f"using KRAITE_DATABASE_URL ({redact_url(url)}); the demo creates its own "
                f"database {self.database_name} there and drops it at the end"
            )
            try:
                self.database_url = kdb.create_database(url, self.database_name)
            except Exception as e:  # noqa: BLE001 - any failure here is a setup error to explain
                raise DemoError(
                    f"cannot create database {self.database_name} with {redact_url(url)}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                    "(unset KRAITE_DATABASE_URL to use an embedded PostgreSQL)"
                ) from None
            self.cleanups.append(
                (f"database {self.database_name}", lambda: kdb.drop_database(url, self.database_name))
            )
            return
        from kraite_mp.ops.embedded import PostgresServer

        warnings.filterwarnings("ignore", module="platformdirs")
        server = self._start_embedded(
            "PostgreSQL", lambda: PostgresServer(datadir=str(self.workdir / "pg")).start()
        )
        self.embedded_pg = True
        self.database_url = kdb.create_database(server.url, self.database_name)

    def _setup_redis(self) -> None:
        from kraite_mp.config import redact_url
        from kraite_mp.ops.embedded import RedisServer, redis_reachable

        url = self.environ.get("KRAITE_REDIS_URL")
        if url:
            if not redis_reachable(url):
                raise DemoError(
                    f"KRAITE_REDIS_URL {redact_url(url)} is not reachable (unset it to use an embedded Redis)"
                )
            self.redis_url = url
            self.console.detail(f"using KRAITE_REDIS_URL ({redact_url(url)}), keys under {self.namespace}:*")
            self.cleanups.append(("demo keys in Redis", self._delete_redis_keys))
            return
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        server = self._start_embedded(
            "Redis", lambda: RedisServer(workdir=str(self.workdir / "redis")).start()
        )
        self.embedded_redis = True
        self.redis_url = server.url

    def _start_embedded(self, what: str, start: Callable[[], _S]) -> _S:
        """Start an embedded server (timed, a failure explained) and register its stop."""
        with timed(self.console, f"embedded {what} started"):
            try:
                server = start()
            except Exception as e:  # noqa: BLE001
                raise DemoError(f"cannot start an embedded {what}: {e}") from None
        self.cleanups.append((f"embedded {what}", server.stop))
        return server

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
        from kraite_mp.ops.embedded import free_port

        package_root = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in self.environ.items() if not k.startswith("KRAITE")}
        env.update(
            {
                "KRAITE_DATABASE_URL": self.database_url,
                "KRAITE_REDIS_URL": self.redis_url,
                "KRAITE_REDIS_NAMESPACE": self.namespace,
                "KRAITE_SECRET_KEY": secret_key,
                "KRAITE_RUN_DIR": self.run_dir,
                "KRAITE__user_data_stream__spool_dir": str(self.workdir / "spool"),
                # a free port: the demo must not depend on 9464 being free (or steal it from a deployment)
                "KRAITE__metrics__listen": f"127.0.0.1:{free_port()}",
                "KRAITE_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": package_root
                + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            }
        )
        self.env = env

    def _start_simulator(self) -> None:
        o = self.options
        proc = self._spawn(
            "simulator",
            "kraite_mp",
            "simulate",
            "--port",
            "0",
            "--accounts",
            str(o.accounts),
            "--symbols",
            str(o.symbols),
            "--rate",
            "0",
            stdout_pipe=True,
        )
        try:
            info = json.loads(read_line(proc, READY_TIMEOUT_S))
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
            account = add_account(
                self.conn,
                self.env["KRAITE_SECRET_KEY"],
                name=f"demo-{i}",
                api_key=acc["api_key"],
                api_secret=acc["api_secret"],
            )
            self.accounts.append(AccountRow(account.id, account.name, acc["api_key"]))
        self.console.detail(f"{len(self.accounts)} accounts (secrets encrypted with the generated key)")
        from kraite_mp.ops.seed import seed_symbols

        self.conn.autocommit = False
        result = seed_symbols(self.conn, symbols)
        self.conn.autocommit = True
        self.seeded_rows = result.row_count
        per_exchange = ", ".join(f"{ex} {len(rows)}" for ex, rows in result.rows.items())
        self.console.detail(f"{result.row_count} exchange_symbols rows: {per_exchange}")

    def _start_worker(self) -> None:
        o = self.options
        proc = self._spawn(
            "worker",
            "dramatiq",
            "kraite_mp.jobs",
            "--queues",
            *QUEUES,
            "--processes",
            str(o.worker_processes),
            "--threads",
            str(o.worker_threads),
            "--worker-shutdown-timeout",
            str(WORKER_SHUTDOWN_TIMEOUT_MS),
        )
        self.console.detail(f"pid {proc.pid}: {o.worker_processes} process(es) x {o.worker_threads} threads")

    def _start_supervisor(self) -> None:
        proc = self._spawn("kraite-mp-run", "kraite_mp", "run")
        self.console.detail(f"pid {proc.pid}; waiting for every stream to connect ...")
        keys = [self.user_data_key(a) for a in self.accounts] + [runfiles.ROLE_MARK_PRICE]
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_report = ""
        while True:
            self._check_processes()
            states = {k: self._beat(k)[0] for k in keys}
            ready = sum(1 for s in states.values() if s == "streaming")
            report = f"{ready}/{len(keys)} streaming"
            if report != last_report:
                self.console.detail(report + "  (" + ", ".join(f"{k}={v}" for k, v in states.items()) + ")")
                last_report = report
            if ready == len(keys):
                return
            if time.monotonic() > deadline:
                self.console.detail(f"not every stream is up after {READY_TIMEOUT_S:.0f} s; going on anyway")
                return
            time.sleep(0.5)

    def _spawn(self, name: str, module: str, *args: str, stdout_pipe: bool = False) -> ManagedProcess:
        """Start ``python -m module args`` with the demo's environment, logging to logs/<name>.log."""
        proc = start_process(
            name,
            [sys.executable, "-m", module, *args],
            self.env,
            self.workdir,
            self.workdir / "logs",
            stdout_pipe=stdout_pipe,
        )
        self.processes.append(proc)
        return proc

    # -- reading what runs -----------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return str(self.workdir / "run")

    @staticmethod
    def user_data_key(account: AccountRow) -> str:
        return runfiles.child_key(runfiles.ROLE_USER_DATA, account.id)

    def _beat(self, key: str) -> tuple[str, dict[str, Any]]:
        """A child's heartbeat ``state`` and ``fields``; ("-", {}) before its first beat."""
        beat = runfiles.read_heartbeat(runfiles.heartbeat_path(self.run_dir, key))
        return (beat["state"], beat["fields"] or {}) if beat else ("-", {})

    def _supervisor_snapshot(self) -> dict[str, Any]:
        return dict(runfiles.read_snapshot(self.run_dir) or {})

    def _check_processes(self) -> None:
        for p in self.processes:
            if not p.alive():
                raise DemoError(
                    f"{p.name} (pid {p.pid}) exited with code {p.proc.returncode}; "
                    f"last lines of {p.log_path}:\n{p.tail()}"
                )

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    # -- teardown ------------------------------------------------------------------------------
    def stop_processes(self) -> None:
        # the streams first (nothing new is enqueued), then the worker (drains), then the exchange
        order = {"kraite-mp-run": 0, "worker": 1, "simulator": 2}
        for p in sorted(self.processes, key=lambda p: order.get(p.name, 9)):
            outcome = p.stop()
            self.console.line(f"stopped {p.name} (pid {p.pid}): {outcome}")
        self.processes.clear()

    def teardown(self) -> None:
        previous = signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # a second Ctrl-C must not leave processes behind
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
