"""A streamed frame's transaction in few round trips (issue 17, ``store.db.TripCursor``).

Real PostgreSQL throughout. The round trips are counted on the wire: the worker reaches PostgreSQL
through a loopback TCP relay of this test, which counts the client's turns (data from the client after
data from the server, or first).
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Any

import psycopg2
import pytest
from test_jobs import Harness, account_id, job_env, load_jsonl, make_settings  # noqa: F401 - fixtures

from kraite_mp.store import db as kdb

#: The relay's select() wakes this often to see whether it must stop (seconds).
RELAY_POLL_S = 0.05
#: The relay thread ends within this long once told to stop.
RELAY_JOIN_S = 5.0


class TurnCountingRelay:
    """A TCP relay to PostgreSQL that counts the client's turns: one per round trip."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target  # (host, port), or the path of a Unix socket (an embedded server's)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.turns = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        client_side: set[socket.socket] = set()
        last_from_client: dict[socket.socket, bool] = {}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([self.listener, *pairs], [], [], RELAY_POLL_S)
                for sock in readable:
                    if sock is self.listener:
                        client, _ = self.listener.accept()
                        server = self._connect()
                        pairs[client], pairs[server] = server, client
                        client_side.add(client)
                        last_from_client[client] = False
                        continue
                    data = sock.recv(65536)
                    peer = pairs.get(sock)
                    if peer is None:
                        continue
                    if not data:
                        for s in (sock, peer):
                            pairs.pop(s, None)
                            client_side.discard(s)
                            s.close()
                        continue
                    client = sock if sock in client_side else peer
                    from_client = sock is client
                    if from_client and not last_from_client.get(client, False):
                        with self._lock:
                            self.turns += 1
                    last_from_client[client] = from_client
                    peer.sendall(data)
        finally:
            for s in pairs:
                s.close()
            self.listener.close()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.target)
            return server
        return socket.create_connection(self.target)

    def count(self) -> int:
        with self._lock:
            return self.turns

    def close(self) -> None:
        self._stop.set()
        self._thread.join(RELAY_JOIN_S)
        assert not self._thread.is_alive()


@pytest.fixture()
def relay(database_url: str) -> Any:
    dsn = psycopg2.extensions.parse_dsn(database_url)
    host, port = dsn.get("host") or "127.0.0.1", int(dsn.get("port") or 5432)
    r = TurnCountingRelay(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))
    user = dsn.get("user")
    r.url = f"postgresql://{user + '@' if user else ''}127.0.0.1:{r.port}/{dsn['dbname']}"  # type: ignore[attr-defined]
    try:
        yield r
    finally:
        r.close()


@pytest.mark.integration
def test_an_order_frame_takes_four_round_trips_and_an_audit_only_frame_one(
    db: Any,
    account_id: int,  # noqa: F811 - the fixture
    job_env: dict[str, str],  # noqa: F811 - the fixture
    relay: Any,
) -> None:
    env = {**job_env, "KRAITE_DATABASE_URL": relay.url}
    samples = load_jsonl("binance_samples.jsonl")
    trade = samples[2]["frame"]  # a TRADE of a new order: audit, order row, transition
    lite = samples[4]["frame"]  # a TRADE_LITE: audit only
    h = Harness(make_settings(env))
    shadow = Harness(make_settings(env, user_data_stream__binance__dispatched_executions=""))
    try:

        def trips(harness: Harness, frame: str, frame_id: str, expected: str) -> int:
            before = relay.count()
            assert harness.runner.process_user_data_event(account_id, frame, frame_id, 1.7e12) == expected
            return int(relay.count() - before)

        # the first frame of a runner also opens its connection: not counted
        assert h.runner.process_user_data_event(account_id, lite, "warm-1", 1.7e12) == "audited"
        assert trips(h, lite, "lite-1", "audited") == 1  # the audit insert, a transaction of its own
        assert (
            trips(h, trade, "f-1", "dispatched") == 4
        )  # BEGIN+audit, select-for-update, insert, transition+COMMIT
        assert trips(h, trade, "f-1", "duplicate") == 2  # BEGIN+audit (nothing inserted), ROLLBACK
        assert shadow.runner.process_user_data_event(account_id, lite, "warm-2", 1.7e12) == "audited"
        assert trips(shadow, trade, "f-2", "shadow") == 1  # the audit insert, a transaction of its own
    finally:
        h.close()
        shadow.close()
    with db.cursor() as cur:
        cur.execute("SELECT frame_id, outcome FROM api_data_stream ORDER BY frame_id")
        audited = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM order_transitions")
        transitions = cur.fetchone()[0]
    db.commit()
    assert audited["f-1"] == "dispatched" and audited["f-2"] == "shadow"
    assert transitions == 1  # the one new order, once, however often its frame came


@pytest.mark.integration
def test_a_trip_cursor_transaction_is_atomic_and_keeps_percent_signs(database_url: str, db: Any) -> None:
    conn = kdb.connect(database_url, autocommit=True)
    other = kdb.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS t (k int PRIMARY KEY, v text)")
        with conn.cursor(cursor_factory=kdb.TripCursor) as cur:
            cur.begin()
            cur.execute("INSERT INTO t VALUES (%s, %s)", (1, "100% sure"))
            cur.defer("INSERT INTO t VALUES (%s, %s)", (2, "50%s off"))
            # the deferred text travels with a statement that has parameters of its own
            cur.execute("SELECT count(*) FROM t WHERE k >= %s", (1,))
            assert cur.fetchone()[0] == 2
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            cur.commit()
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SELECT k, v FROM t ORDER BY k")
            assert cur.fetchall() == [(1, "100% sure"), (2, "50%s off")]
        # a deferred statement that fails at the COMMIT: nothing of the transaction stays
        with conn.cursor(cursor_factory=kdb.TripCursor) as cur:
            cur.begin()
            cur.execute("INSERT INTO t VALUES (%s, %s)", (3, "kept?"))
            cur.defer("INSERT INTO t VALUES (%s, %s)", (1, "a duplicate key"))
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.commit()
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        kdb.end_transaction(conn)
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SELECT k FROM t ORDER BY k")
            assert cur.fetchall() == [(1,), (2,)]
        # and an explicit rollback drops what was deferred
        with conn.cursor(cursor_factory=kdb.TripCursor) as cur:
            cur.begin()
            cur.execute("INSERT INTO t VALUES (%s, %s)", (4, "rolled back"))
            cur.defer("INSERT INTO t VALUES (%s, %s)", (5, "never sent"))
            cur.rollback()
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone()[0] == 2
        # a connection that is not autocommit ends its transaction the usual way
        with other.cursor() as cur:
            cur.execute("SELECT 1")
        kdb.end_transaction(other)
        assert other.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        conn.close()
        other.close()
