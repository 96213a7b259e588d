"""``kraite-mp run``: the supervisor's start. The configuration checks, waiting for PostgreSQL with
backoff, the schema check, then the arbiter (kraite_mp.supervisor.arbiter) until it stops."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import click

from kraite_mp import exitcodes
from kraite_mp.config import Settings
from kraite_mp.logs import startup_summary
from kraite_mp.ops.cli import fail, get_settings, preflight, warn_if_redis_down

#: ``run`` waits for PostgreSQL with backoff: base * 2^min(attempt, cap), so at most 32 s between tries.
DB_WAIT_BASE_S = 1.0
DB_WAIT_CAP_EXPONENT = 5

#: Signals that stop ``run`` while it waits for PostgreSQL (the arbiter installs its own afterwards).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@click.command("run")
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Exit 75 when PostgreSQL is unreachable at start instead of waiting for it with backoff.",
)
@click.pass_context
def run_command(ctx: click.Context, fail_fast: bool) -> None:
    """Run the supervisor: one user-data child per owned account, one mark-price child, periodic sync.

    SIGTERM/SIGINT stop gracefully; SIGHUP reloads the configuration and the account list, and retries
    FATAL children. PostgreSQL unreachable at start: waits with backoff (one log line per change).
    """
    from kraite_mp.config.load import parse_shard
    from kraite_mp.store.accounts import SecretKeyError, check_secret_key
    from kraite_mp.store.db import SchemaNotReady, check_schema
    from kraite_mp.supervisor.arbiter import Arbiter
    from kraite_mp.supervisor.publish import RedisStatus, Reporters
    from kraite_mp.supervisor.runfiles import AlreadyRunning, heartbeat_dir

    settings = get_settings(ctx)
    # the first line: which config file, database, Redis, namespace and Binance URLs this run uses
    logging.getLogger("kraite_mp.supervisor").info("%s", startup_summary(settings))
    try:
        check_secret_key(settings.secret_key)  # checks the key's shape; no real secret is touched
        parse_shard(settings.supervisor.shard)
    except SecretKeyError as e:
        fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
    except ValueError as e:
        fail(ctx, f"configuration error: supervisor.shard: {e}", exitcodes.EXIT_FATAL_CONFIG)
    for problem in preflight(settings):
        fail(ctx, f"configuration error: {problem}", exitcodes.EXIT_FATAL_CONFIG)
    try:
        os.makedirs(heartbeat_dir(settings.run_dir), exist_ok=True)
    except OSError as e:
        fail(ctx, f"cannot create {heartbeat_dir(settings.run_dir)}: {e}", exitcodes.EXIT_FATAL_CONFIG)
    conn = wait_for_database(ctx, settings, fail_fast=fail_fast)
    try:
        check_schema(conn)
    except SchemaNotReady as e:
        fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
    finally:
        conn.close()  # no connection may cross the fork
    warn_if_redis_down(settings)
    root = ctx.find_root().ensure_object(dict)
    arbiter = Arbiter(
        settings,
        config_path=root.get("config_path"),
        log_level_override=root.get("log_level"),
        reporters=Reporters([RedisStatus(relay_children=True)]),
    )
    try:
        code = arbiter.run()
    except AlreadyRunning as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
    except ImportError as e:
        fail(ctx, f"cannot load a child entry point: {e}", exitcodes.EXIT_ERROR)
    ctx.exit(code)


def wait_for_database(ctx: click.Context, settings: Settings, *, fail_fast: bool = False) -> Any:
    """A connection, once PostgreSQL answers: retried with capped backoff, one log line per change of the
    error, the process title says so; SIGTERM/SIGINT while waiting exit 0. ``fail_fast``: exit 75 instead."""
    from kraite_mp.backoff import backoff_delay
    from kraite_mp.store.db import DatabaseRefused, DatabaseUnavailable, connect
    from kraite_mp.supervisor.context import set_process_title

    log = logging.getLogger("kraite_mp.supervisor")
    stop = threading.Event()
    previous: dict[int, Any] = {}
    attempt, last_error = 0, None
    try:
        while True:
            try:
                conn = connect(settings.database_url, application_name="kraite-mp supervisor")
            except DatabaseRefused as e:  # waiting would not fix a wrong database name, user or password
                fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
            except DatabaseUnavailable as e:
                if fail_fast:
                    fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
                if not previous:
                    previous = {sig: signal.signal(sig, lambda _s, _f: stop.set()) for sig in STOP_SIGNALS}
                    set_process_title("kraite-mp: supervisor waiting for PostgreSQL")
                if str(e) != last_error:
                    log.warning(
                        "%s; waiting for it (retrying with backoff, at most %.0f s apart)",
                        e,
                        _db_wait_max_s(),
                    )
                    last_error = str(e)
                delay = backoff_delay(attempt, base_s=DB_WAIT_BASE_S, cap_exponent=DB_WAIT_CAP_EXPONENT)
                attempt += 1
                if stop.wait(delay):
                    log.info("stopped while waiting for PostgreSQL")
                    ctx.exit(exitcodes.EXIT_OK)
                continue
            if last_error is not None:
                log.info("PostgreSQL is reachable: starting (after %d attempt(s))", attempt + 1)
            return conn
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _db_wait_max_s() -> float:
    return float(DB_WAIT_BASE_S * 2**DB_WAIT_CAP_EXPONENT)
