"""Shared fixtures: real PostgreSQL and Redis (given by URL, or embedded), one fresh database and one
Redis namespace per test session, the local simulator, and subprocess helpers.

- ``KRAITE_TEST_DATABASE_URL``: an admin URL (any database) on a server where we may CREATE DATABASE.
- ``KRAITE_TEST_REDIS_URL``: a Redis URL.
Unset, the session starts embedded servers (the ``embedded`` extra) and stops them at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kraite_mp.config import Settings, load_settings  # noqa: E402
from kraite_mp.ops.embedded import PostgresServer, RedisServer  # noqa: E402
from kraite_mp.store import db as kdb  # noqa: E402
from kraite_mp.store.accounts import generate_secret_key  # noqa: E402

SESSION_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url = os.environ.get("KRAITE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = PostgresServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("KRAITE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    name = f"kraite_test_{SESSION_ID}"
    url = kdb.create_database(pg_admin_url, name)
    conn = kdb.connect(url)
    try:
        kdb.migrate(conn)
    finally:
        conn.close()
    try:
        yield url
    finally:
        kdb.drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A unique key prefix for this session; its keys are deleted at the end."""
    import redis

    namespace = f"kraite-test-{SESSION_ID}"
    yield namespace
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def secret_key() -> str:
    return generate_secret_key()


@pytest.fixture()
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kraite-run-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def kraite_env(database_url: str, redis_url: str, redis_namespace: str, secret_key: str, run_dir: str) -> dict[str, str]:
    """Environment for kraite-mp subprocesses (and for ``settings``): no config file, test services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}
    env.update(
        KRAITE_DATABASE_URL=database_url,
        KRAITE_REDIS_URL=redis_url,
        KRAITE_REDIS_NAMESPACE=redis_namespace,
        KRAITE_SECRET_KEY=secret_key,
        KRAITE_RUN_DIR=os.path.join(run_dir, "run"),
        KRAITE__user_data_stream__spool_dir=os.path.join(run_dir, "spool"),
        KRAITE_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture()
def settings(kraite_env: dict[str, str]) -> Settings:
    s = load_settings(None, environ=kraite_env)
    os.makedirs(s.run_dir, exist_ok=True)
    return s


#: Tables emptied before each test that asks for ``db``; order respects foreign keys via CASCADE.
TABLES = (
    "order_transitions", "orders", "api_data_stream", "account_balances", "account_positions",
    "exchange_symbols", "token_mappers", "accounts",
)


@pytest.fixture()
def db(database_url: str) -> Iterator[Any]:
    """A connection to the session database, with every table emptied first."""
    conn = kdb.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(TABLES) + " RESTART IDENTITY CASCADE")
    conn.commit()
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


@pytest.fixture()
def simulator() -> Iterator[Any]:
    """A local Binance simulator (3 accounts, no automatic events) on a free loopback port."""
    from kraite_mp.simulator import Simulator

    sim = Simulator(accounts=3, symbols=50, rate=0.0, seed=7)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll ``predicate`` until truthy (returned) or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message or predicate!r} (last={last!r})")


#: Environment variable that tags the processes a test starts (see ``marked_pids``).
MARKER_VAR = "KRAITE_TEST_MARKER"


def marked_pids(marker: str, root: Path) -> list[int]:
    """Live processes (zombies excluded) with ``MARKER_VAR=marker`` in their environment or their
    working directory under ``root``. Both, because setproctitle (kraite-mp, redis-server, postgres)
    overwrites the memory /proc/PID/environ reads, while the working directory survives it."""
    needle = f"{MARKER_VAR}={marker}".encode()
    prefix = str(root.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if state == b"Z":
            continue
        if needle in environ.split(b"\0") or cwd == prefix or cwd.startswith(prefix + os.sep):
            found.append(int(entry))
    return found


class ProcessGroup:
    """Subprocesses a test starts; all are killed (with their process groups) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(args, env=env, start_new_session=True, cwd=str(ROOT), **kw)
        self.procs.append(proc)
        return proc

    def kraite(self, *args: str, env: dict[str, str], **kw: Any) -> subprocess.Popen[Any]:
        return self.start([sys.executable, "-m", "kraite_mp", *args], env, **kw)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                # communicate() drains unread pipes: a chatty child blocked on a full pipe cannot exit
                proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture()
def processes() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()
