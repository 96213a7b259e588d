"""Shared fixtures: real PostgreSQL and Redis (given by URL, or embedded), one fresh database and one
Redis namespace per test session, the local simulator, and the ``processes`` group. Helpers that
tests import live in tests/support.py.

- ``KRAITE_TEST_DATABASE_URL``: an admin URL (any database) on a server where we may CREATE DATABASE.
- ``KRAITE_TEST_REDIS_URL``: a Redis URL.
Unset, the session starts embedded servers (the ``embedded`` extra) and stops them at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import ROOT, ProcessGroup

sys.path.insert(0, str(ROOT))

from kraite_mp.config import Settings  # noqa: E402
from kraite_mp.config.load import load_settings  # noqa: E402
from kraite_mp.ops.embedded import PostgresServer, RedisServer  # noqa: E402
from kraite_mp.store import db as kdb  # noqa: E402
from kraite_mp.store.accounts import generate_secret_key  # noqa: E402

SESSION_ID = uuid.uuid4().hex[:10]

#: Every test carries exactly one of these markers: ``make test-unit``, ``test-integration``, ``test-e2e``.
TIERS = frozenset({"unit", "integration", "e2e"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects anything: every collected test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fail collection when a test has no tier marker or more than one."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier marker'}")
    if wrong:
        raise pytest.UsageError(
            "each test needs exactly one of the markers unit, integration, e2e:\n  " + "\n  ".join(wrong)
        )


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
def kraite_env(
    database_url: str, redis_url: str, redis_namespace: str, secret_key: str, run_dir: str
) -> dict[str, str]:
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
        # no metrics endpoint unless a test asks for one (they would all want the same port)
        KRAITE__metrics__listen="",
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
    "order_transitions",
    "orders",
    "api_data_stream",
    "account_balances",
    "account_positions",
    "exchange_symbols",
    "token_mappers",
    "accounts",
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


@pytest.fixture()
def processes() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture()
def stub_broker() -> Iterator[Any]:
    """An in-memory Dramatiq broker, the unit-tier twin of the Redis one (dramatiq's own conftest pattern).

    Declare the actors on it (``kraite_mp.jobs.declare_actors``) to run the job logic without Redis. It is
    not made the global broker: our actors always name theirs.
    """
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    broker.emit_after("process_boot")
    try:
        yield broker
    finally:
        broker.flush_all()
        broker.close()
