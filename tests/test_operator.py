"""Operator mistakes get one clear line, never a traceback (issue "operator-proof").

Each test runs the real ``kraite-mp`` command as a subprocess and asserts its exit code, its one-line
message and the absence of "Traceback". Services are real: PostgreSQL, Redis, and loopback ports that
nothing listens on (found free, then left closed) for "unreachable".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support import ROOT, ProcessGroup, require_tcp_loopback, title_of, wait_for

from kraite_mp import exitcodes
from kraite_mp.store import db as kdb

#: One command of these tests never runs longer than this.
COMMAND_TIMEOUT_S = 60


def kraite(
    env: dict[str, str], *args: str, stdin: str | bytes | None = None
) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "kraite_mp", *args],
        env=env,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        input=data,
        cwd=str(ROOT),
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


#: ``kraite-mp run``'s first log line (which config, database, Redis, Binance): context, not the error.
STARTUP_LINE = re.compile(r"^\S+ INFO \[\d+\] kraite_mp\.supervisor: settings from ")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr, which must be exactly one line (after ``run``'s start-up line) and no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not STARTUP_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once to find it, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def empty_database(pg_admin_url: str) -> Iterator[str]:
    """A database with no kraite-mp schema (someone forgot `db migrate`), dropped at the end."""
    name = f"kraite_nomigrate_{uuid.uuid4().hex[:8]}"
    url = kdb.create_database(pg_admin_url, name)
    try:
        yield url
    finally:
        kdb.drop_database(pg_admin_url, name)


# -- 4: db migrate forgotten ---------------------------------------------------------------------
@pytest.mark.integration
def test_forgotten_migrate_is_one_line_from_every_command(
    kraite_env: dict[str, str], empty_database: str, simulator: Any
) -> None:
    env = dict(kraite_env, KRAITE_DATABASE_URL=empty_database, KRAITE_BINANCE_REST_URL=simulator.rest_url)
    for args in (("accounts", "list"), ("sync-orders",), ("run",), ("check-config", "--connect")):
        r = kraite(env, *args)
        assert r.returncode == exitcodes.EXIT_FATAL_CONFIG, (args, r.stderr)
        assert "run `kraite-mp db migrate`" in one_line(r), args
    assert kraite(env, "db", "migrate").returncode == 0
    r = kraite(env, "accounts", "list")
    assert r.returncode == 0, r.stderr


# -- 2: PostgreSQL unreachable when `run` starts --------------------------------------------------
class Forwarder:
    """A loopback TCP port that forwards to PostgreSQL once ``open()`` is called: "the database is back"."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.sock: socket.socket | None = None
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []

    def open(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        assert self.sock is not None
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            for s in (client, upstream):
                s.settimeout(0.2)
                self.conns.append(s)
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        for s in [*self.conns, *([self.sock] if self.sock else [])]:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=2)


@pytest.mark.e2e
def test_run_waits_for_postgresql_then_starts(
    kraite_env: dict[str, str], database_url: str, processes: ProcessGroup, tmp_path: Path
) -> None:
    require_tcp_loopback(database_url)
    from urllib.parse import urlsplit

    parts = urlsplit(database_url)
    port = closed_port()
    url = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
    env = dict(kraite_env, KRAITE_DATABASE_URL=url, KRAITE__supervisor__mark_price="false")
    env["KRAITE__supervisor__sync_interval_s"] = "0"

    # --fail-fast keeps the old behaviour: exit 75, one line
    r = kraite(env, "run", "--fail-fast")
    assert r.returncode == exitcodes.EXIT_TEMPFAIL and "PostgreSQL unavailable" in one_line(r)
    # the first line says what this run uses (the database without its password), before anything else
    first = r.stderr.splitlines()[0]
    assert STARTUP_LINE.match(first) and f" database=127.0.0.1:{port}/" in first, first
    assert f" namespace={env['KRAITE_REDIS_NAMESPACE']} " in first and " binance_rest=" in first, first

    log_path = tmp_path / "run.log"
    forwarder = Forwarder(port, (parts.hostname or "127.0.0.1", parts.port or 5432))
    with open(log_path, "wb") as log:
        proc = processes.kraite("run", env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "waiting for it" in log_path.read_text(), 30, message="the waiting line")
        wait_for(lambda: "waiting for PostgreSQL" in title_of(proc.pid), 10, message="the title")
        assert proc.poll() is None
        forwarder.open()
        wait_for(lambda: "supervisor starting" in log_path.read_text(), 60, message="start once reachable")
        text = log_path.read_text()
        assert "PostgreSQL is reachable: starting" in text
        # one line per change of state, however many attempts it took
        assert text.count("waiting for it") == 1, text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        forwarder.close()
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


@pytest.mark.e2e
def test_run_stopped_while_waiting_for_postgresql_exits_0(
    kraite_env: dict[str, str], processes: ProcessGroup, tmp_path: Path
) -> None:
    env = dict(kraite_env, KRAITE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/x")
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = processes.kraite("run", env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: "waiting for it" in log_path.read_text(), 30, message="the waiting line")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "Traceback" not in log_path.read_text()


# -- 6: Redis ------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:notaport/0", "redis://:6379/0"],  # more shapes: test_config.py, in-process
)
def test_malformed_redis_url_is_refused_by_check_config(kraite_env: dict[str, str], url: str) -> None:
    r = kraite(dict(kraite_env, KRAITE_REDIS_URL=url), "check-config")
    assert r.returncode == exitcodes.EXIT_FATAL_CONFIG
    assert one_line(r).startswith("kraite-mp: configuration error: redis_url:")


@pytest.mark.e2e
def test_redis_unreachable_at_start_is_reported_once(
    kraite_env: dict[str, str], db: Any, processes: ProcessGroup, tmp_path: Path
) -> None:
    env = dict(kraite_env, KRAITE_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    env.update(KRAITE__supervisor__mark_price="false", KRAITE__supervisor__sync_interval_s="0")
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = processes.kraite("run", env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "supervisor starting" in log_path.read_text(), 30, message="start")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log_path.read_text()
    assert text.count("Redis unreachable at") == 1, text
    assert "streams spool their frames locally and workers wait" in text and "Traceback" not in text


# -- 7: the worker -------------------------------------------------------------------------------
@pytest.mark.integration
def test_worker_bad_configuration_is_one_line_exit_78(kraite_env: dict[str, str]) -> None:
    for extra in (
        {"KRAITE__jobs__max_retries": "many"},
        {"KRAITE__jobs__observers": "no_such_module.observer"},
        {"KRAITE_SECRET_KEY": ""},
    ):
        r = kraite(dict(kraite_env, **extra), "worker", "--queues", "user-data-stream")
        assert r.returncode == exitcodes.EXIT_FATAL_CONFIG, (extra, r.stderr)
        assert one_line(r).startswith("kraite-mp: configuration error:"), extra


@pytest.mark.e2e
def test_worker_runs_dramatiq_on_the_installed_package(
    kraite_env: dict[str, str], processes: ProcessGroup, tmp_path: Path
) -> None:
    import kraite_mp

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(kraite_mp.__file__)))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = processes.kraite(
            "worker", "--queues", "user-data-stream", "--processes", "1", "--threads", "1",
            env=kraite_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # exec'd: the same pid is now dramatiq, told to import from the installed package
        wait_for(
            lambda: "dramatiq" in title_of(proc.pid), 30, message=f"dramatiq; log: {log_path.read_text()}"
        )
        cmdline = title_of(proc.pid)
        assert "kraite_mp.jobs" in cmdline and cmdline.endswith(f"--path {package_root}")
        wait_for(lambda: "is ready for action" in log_path.read_text(), 30, message="worker ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log_path.read_text()[-2000:]


# -- 8: check-config catches what run would refuse ------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"KRAITE_SECRET_KEY": ""}, "secret_key is not set"),
        ({"KRAITE_SECRET_KEY": "not-a-fernet-key"}, "secret_key: not a valid Fernet key"),
        ({"KRAITE__supervisor__heartbeat_timeout_s": "0"}, "supervisor.heartbeat_timeout_s: must be > 0"),
        ({"KRAITE__binance__rest_timeout_s": "-1"}, "binance.rest_timeout_s: must be > 0"),
        ({"KRAITE__supervisor__fatal_retry_s": "-5"}, "supervisor.fatal_retry_s: must be >= 0"),
        ({"KRAITE__jobs__observers": "nosuchpkg.fn"}, "jobs.observers: cannot load 'nosuchpkg.fn'"),
    ],
)
def test_check_config_refuses_what_run_would(
    kraite_env: dict[str, str], extra: dict[str, str], expected: str
) -> None:
    r = kraite(dict(kraite_env, **extra), "check-config")
    assert r.returncode == exitcodes.EXIT_FATAL_CONFIG, r.stderr
    assert expected in one_line(r)


@pytest.mark.unit
def test_env_variable_typo_gets_a_warning_with_the_closest_name(kraite_env: dict[str, str]) -> None:
    env = dict(kraite_env, KRAITE_DATABSE_URL="postgresql://x@127.0.0.1/x", KRAITE_TEST_SOMETHING="1")
    r = kraite(env, "check-config")
    assert r.returncode == 0, r.stderr
    assert one_line(r) == (
        "kraite-mp: warning: KRAITE_DATABSE_URL is not a kraite-mp variable; did you mean KRAITE_DATABASE_URL?"
    )


# -- 9: ordinary input never raises a traceback ----------------------------------------------------
@pytest.mark.unit
def test_unknown_log_level_is_a_usage_error(kraite_env: dict[str, str]) -> None:
    r = kraite(kraite_env, "--log-level", "verbose", "check-config")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'verbose' is not one of" in r.stderr
    assert kraite(kraite_env, "--log-level", "debug", "check-config").returncode == 0


@pytest.mark.unit
def test_non_utf8_config_file_is_one_line(kraite_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "kraite-mp.toml"
    cfg.write_bytes(b'log_level = "INFO"\n# caf\xe9\n')
    r = kraite(kraite_env, "--config", str(cfg), "check-config")
    assert r.returncode == exitcodes.EXIT_FATAL_CONFIG
    assert f"config file {cfg}: not UTF-8" in one_line(r)
    r = kraite(kraite_env, "--config", str(tmp_path), "check-config")  # a directory is not a file
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.integration
def test_non_utf8_or_empty_secret_file_is_one_line(
    kraite_env: dict[str, str], db: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfesecret\n")
    base = ("accounts", "add", "--name", "x", "--api-key", "KEY-0123456789abcdef")
    r = kraite(kraite_env, *base, "--api-secret-file", str(secret))
    assert r.returncode == 2 and "not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    r = kraite(kraite_env, *base, "--api-secret-stdin", stdin=b"\xff\n")
    assert r.returncode == 2 and "stdin: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    secret.write_bytes(b"\n")
    r = kraite(kraite_env, *base, "--api-secret-file", str(secret))
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = kraite(kraite_env, *base, "--api-secret-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


# -- 1: `accounts enable` of a FATAL account ------------------------------------------------------
@pytest.mark.e2e
def test_accounts_enable_retries_a_fatal_stream_at_once(
    kraite_env: dict[str, str], db: Any, secret_key: str, processes: ProcessGroup, tmp_path: Path
) -> None:
    """The CLI finds the supervisor of its run_dir and SIGHUPs it: no wait for fatal_retry_s (1 h here)."""
    from kraite_mp.store.accounts import add_account, mark_credentials_invalid

    acct = add_account(db, secret_key, name="bad-1", api_key="BADKEY0000000001", api_secret="bad-secret-123")
    mark_credentials_invalid(db, acct.id, "Binance -2015: Invalid API-key")  # what the real child does
    env = dict(
        kraite_env,
        KRAITE__supervisor__mark_price="false",
        KRAITE__supervisor__sync_interval_s="0",
        KRAITE__supervisor__fatal_retry_s="3600",
        KRAITE__supervisor__accounts_refresh_s="3600",
    )
    log_path = tmp_path / "supervisor.log"
    spawned = f"spawned user-data-{acct.id} "
    with open(log_path, "wb") as log:
        # a real Arbiter whose "bad-*" child exits 77 like an invalid API key (tests/scripts/run_arbiter.py)
        proc = processes.start(
            [sys.executable, str(ROOT / "tests" / "scripts" / "run_arbiter.py")],
            env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "exited with code 77" in log_path.read_text(), 30, message="the FATAL exit")
        assert log_path.read_text().count(spawned) == 1
        r = kraite(env, "accounts", "enable", str(acct.id))
        assert r.returncode == 0 and f"the supervisor (pid {proc.pid}) was told (SIGHUP)" in r.stdout, (
            r.stderr
        )
        wait_for(lambda: log_path.read_text().count(spawned) >= 2, 30, message="the retry after enable")
        assert "retrying FATAL" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.integration
def test_wrong_database_name_or_role_is_a_configuration_error(
    kraite_env: dict[str, str], database_url: str
) -> None:
    """The server answered and refused the URL: exit 78 at once (waiting would not fix it), not 75."""
    require_tcp_loopback(database_url)
    from urllib.parse import urlsplit

    parts = urlsplit(database_url)
    for url, refused in (
        (parts._replace(path="/kraite_no_such_db").geturl(), 'database "kraite_no_such_db" does not exist'),
        (parts._replace(netloc=f"kraite_no_such_role@{parts.hostname}:{parts.port}").geturl(), "role"),
    ):
        env = dict(kraite_env, KRAITE_DATABASE_URL=url)
        for args in (("accounts", "list"), ("run",)):
            r = kraite(env, *args)
            assert r.returncode == exitcodes.EXIT_FATAL_CONFIG, (args, r.stderr)
            line = one_line(r)
            assert "configuration error: PostgreSQL refused database_url:" in line and refused in line


@pytest.mark.integration
def test_check_config_connect_reaches_postgresql_redis_and_binance(
    kraite_env: dict[str, str], db: Any, simulator: Any
) -> None:
    env = dict(kraite_env, KRAITE_BINANCE_REST_URL=simulator.rest_url)
    r = kraite(env, "check-config", "--connect")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # every unreachable server is named, one line each (the first problem is the exit line, printed last)
    env.update(
        KRAITE_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        KRAITE_BINANCE_REST_URL=f"http://127.0.0.1:{closed_port()}",
    )
    r = kraite(env, "check-config", "--connect")
    assert r.returncode == exitcodes.EXIT_FATAL_CONFIG and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert "Binance REST unreachable at" in lines[0] and "Redis unreachable at" in lines[1]


@pytest.mark.unit
def test_cli_reconcile_modes_are_the_sweeps() -> None:
    from kraite_mp.ops.cli import RECONCILE_MODES
    from kraite_mp.reconcile.modes import MODES, OPERATOR_MODES

    assert RECONCILE_MODES == OPERATOR_MODES and set(OPERATOR_MODES) <= set(MODES)


# -- 3: a PostgreSQL outage longer than any retry budget -------------------------------------------
#: Frames enqueued while PostgreSQL is away.
OUTAGE_FRAMES = 12
#: The test's retry limit: every frame is tried well past it during the outage.
OUTAGE_MAX_RETRIES = 2


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_postgresql_outage_longer_than_the_retry_budget_dead_letters_nothing(
    kraite_env: dict[str, str], database_url: str, db: Any, processes: ProcessGroup, tmp_path: Path
) -> None:
    """The worker starts while PostgreSQL is unreachable, frames arrive and are retried far past
    ``jobs.max_retries`` (shortened here, with a short backoff): none goes to the dead-letter queue, and once
    PostgreSQL is back each frame is audited exactly once."""
    require_tcp_loopback(database_url)
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from kraite_mp.config.load import load_settings
    from kraite_mp.messages import PROCESS_ACTOR, broker_namespace, redis_client
    from kraite_mp.ops.deadletters import counts

    parts = urlsplit(database_url)
    port = closed_port()
    env = dict(
        kraite_env,
        KRAITE_DATABASE_URL=parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl(),
        KRAITE_REDIS_NAMESPACE=f"kraite-outage-{uuid.uuid4().hex[:8]}",
        KRAITE__jobs__max_retries=str(OUTAGE_MAX_RETRIES),
        KRAITE__jobs__retry_min_backoff_ms="100",
        KRAITE__jobs__retry_max_backoff_ms="300",
    )
    settings = load_settings(None, environ=env)
    queue = settings.user_data_stream.queue_name
    log_path = tmp_path / "worker.log"
    forwarder = Forwarder(port, (parts.hostname or "127.0.0.1", parts.port or 5432))
    with open(log_path, "wb") as log:
        worker = processes.start(
            [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--queues", queue, "--processes", "1"]
            + ["--threads", "2"],
            env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    broker = RedisBroker(
        client=redis_client(settings.redis_url), namespace=broker_namespace(settings), middleware=[]
    )
    frame_ids = [f"outage-{i}-{uuid.uuid4().hex[:6]}" for i in range(OUTAGE_FRAMES)]
    try:
        broker.declare_queue(queue)
        for i, frame_id in enumerate(frame_ids):
            frame = f'{{"e":"ACCOUNT_CONFIG_UPDATE","E":{1_796_000_000_000 + i},"T":1,"ac":{{"s":"BTCUSDT","l":{i + 1}}}}}'
            broker.enqueue(
                dramatiq.Message(
                    queue_name=queue,
                    actor_name=PROCESS_ACTOR,
                    args=(),
                    kwargs={"account_id": 1, "frame": frame, "frame_id": frame_id, "received_at": 1.79e12},
                    options={},
                )
            )
        # every frame tried more often than the retry limit allows for a job that fails on its own
        tries_needed = OUTAGE_FRAMES * (OUTAGE_MAX_RETRIES + 3)
        wait_for(
            lambda: log_path.read_text().count("PostgreSQL unavailable") >= tries_needed,
            90,
            message=f"{tries_needed} tries during the outage; log:\n{log_path.read_text()[-3000:]}",
        )
        assert counts(settings.redis_url, broker_namespace(settings), [queue]) == {queue: 0}
        assert _audited(db, frame_ids) == 0
        forwarder.open()  # PostgreSQL is back
        wait_for(
            lambda: _audited(db, frame_ids) == OUTAGE_FRAMES,
            60,
            message=f"every frame audited once PostgreSQL is back; log:\n{log_path.read_text()[-3000:]}",
        )
        time.sleep(1.0)  # a late second delivery would show now
        assert _audited(db, frame_ids) == OUTAGE_FRAMES
        assert counts(settings.redis_url, broker_namespace(settings), [queue]) == {queue: 0}
    finally:
        broker.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        finally:
            forwarder.close()
            client = redis_client(settings.redis_url)
            keys = list(client.scan_iter(match=f"{settings.redis_namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]


def _audited(db: Any, frame_ids: list[str]) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM api_data_stream WHERE frame_id = ANY(%s)", (frame_ids,))
        n = int(cur.fetchone()[0])
    db.commit()
    return n
