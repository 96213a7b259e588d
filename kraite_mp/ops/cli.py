"""The ``kraite-mp`` command line (click). Heavy subcommands are imported only when used."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from kraite_mp import exitcodes
from kraite_mp.config import ConfigError, Settings, env_typos, load_settings
from kraite_mp.logs import describe_error, setup_logging, startup_summary

#: ``sync-orders --every`` never sleeps less than this between passes.
MIN_EVERY_S = 1.0

#: ``sync-orders --mode`` choices: ``kraite_mp.reconcile.sweep.OPERATOR_MODES``, spelled out so that every command
#: does not import the REST and Redis stack just to build its option list (a test keeps them equal).
RECONCILE_MODES = ("full", "targeted", "auto")

#: What ``--log-level`` accepts (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: ``run`` waits for PostgreSQL with backoff: base * 2^min(attempt, cap), so at most 32 s between tries.
DB_WAIT_BASE_S = 1.0
DB_WAIT_CAP_EXPONENT = 5

#: Subcommands that live in their own modules: name -> "module:attribute".
LAZY_COMMANDS: dict[str, str] = {
    "simulate": "kraite_mp.simulator.cli:simulate",
    "status": "kraite_mp.ops.status:status_command",
    "fleet": "kraite_mp.ops.fleet_cmd:fleet_command",
    "demo": "kraite_mp.ops.demo:demo_command",
    "dead-letters": "kraite_mp.ops.deadletters:dead_letters",
    "init": "kraite_mp.ops.init_cmd:init_cmd",
}


#: Subcommands of ``db`` in their own modules: name -> "module:attribute".
LAZY_DB_COMMANDS: dict[str, str] = {"prune": "kraite_mp.ops.retention_cmd:prune_cmd"}


class LazyGroup(click.Group):
    #: name -> "module:attribute" of the subcommands imported only when used.
    lazy_commands: dict[str, str] = LAZY_COMMANDS

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            module_name, attr = self.lazy_commands[cmd_name].split(":")
            try:
                module = importlib.import_module(module_name)
            except click.ClickException as e:  # the simulator without aiohttp: listed, and says so when run
                return _unavailable(cmd_name, e)
            return getattr(module, attr)  # type: ignore[no-any-return]
        return super().get_command(ctx, cmd_name)


class LazyDbGroup(LazyGroup):
    lazy_commands = LAZY_DB_COMMANDS


def _unavailable(name: str, error: click.ClickException) -> click.Command:
    """A stand-in for a command whose module cannot be imported: ``--help`` lists it, running it prints
    ``error`` (one line, exit 1)."""

    def callback() -> None:
        raise error

    return click.Command(
        name,
        callback=callback,
        help=f"Unavailable: {error.format_message()}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )


def get_settings(ctx: click.Context) -> Settings:
    """The settings for this invocation; bad config exits 78 with a message naming the key."""
    obj = ctx.find_root().ensure_object(dict)
    if "settings" not in obj:
        try:
            settings = load_settings(obj.get("config_path"))
        except ConfigError as e:
            fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
        if obj.get("log_level"):
            settings.log_level = obj["log_level"].upper()
        setup_logging(settings.log_level, fmt=settings.log_format)
        for name, close in env_typos(os.environ):
            click.echo(
                f"kraite-mp: warning: {name} is not a kraite-mp variable; did you mean {close}?", err=True
            )
        obj["settings"] = settings
    return obj["settings"]  # type: ignore[no-any-return]


def fail(ctx: click.Context, message: object, code: int = 1) -> NoReturn:
    """Print ``kraite-mp: message`` on stderr and exit with ``code``."""
    click.echo(f"kraite-mp: {message}", err=True)
    ctx.exit(code)


def open_db(ctx: click.Context, settings: Settings, *, schema: bool = True) -> Any:
    """A connection (exit 75 when PostgreSQL is down); with ``schema``, exit 78 unless it is migrated."""
    from kraite_mp.store.db import DatabaseRefused, DatabaseUnavailable, SchemaNotReady, check_schema, connect

    try:
        conn = connect(settings.database_url, application_name="kraite-mp cli")
    except DatabaseRefused as e:
        fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
    except DatabaseUnavailable as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
    if schema:
        try:
            check_schema(conn)
        except SchemaNotReady as e:
            conn.close()
            fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
    return conn


@contextmanager
def connected(ctx: click.Context, *, schema: bool = True) -> Iterator[Any]:
    """A database connection for one command, closed when the block ends."""
    conn = open_db(ctx, get_settings(ctx), schema=schema)
    try:
        yield conn
    finally:
        conn.close()


def notify_supervisor(settings: Settings) -> int | None:
    """SIGHUP the supervisor that holds this host's ``run_dir`` lock, if one runs: it re-reads the accounts
    now and retries its FATAL children. Its pid, or None (supervisors elsewhere notice within
    ``supervisor.accounts_refresh_s``)."""
    import fcntl

    from kraite_mp.supervisor.runfiles import LOCK_FILE

    try:
        fd = os.open(os.path.join(settings.run_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a supervisor runs (an unheld lock file holds a stale pid)
        else:
            return None
        pid = int(os.read(fd, 32).split()[0])
        os.kill(pid, signal.SIGHUP)
        return pid
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def _announce(ctx: click.Context, settings: Settings, what: str) -> None:
    pid = notify_supervisor(settings)
    if pid is not None:
        click.echo(f"{what}; the supervisor (pid {pid}) was told (SIGHUP)")
    else:
        refresh_s = settings.supervisor.accounts_refresh_s
        click.echo(f"{what}; running supervisors pick it up within {refresh_s:g} s (or at SIGHUP)")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default etc/kraite-mp.toml if present, or $KRAITE_CONFIG).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Override log_level.",
)
@click.version_option(package_name="kraite-mp")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """kraite-mp: Binance USD-M user-data and mark-price push daemon."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["log_level"] = log_level


@cli.command("check-config")
@click.option(
    "--connect",
    is_flag=True,
    help="Also reach PostgreSQL (schema, and that secret_key decrypts every stored secret), Redis and"
    " Binance's REST time endpoint.",
)
@click.pass_context
def check_config(ctx: click.Context, connect: bool) -> None:
    """Validate the configuration and print it with secrets redacted.

    Exit 78 with one line for what `run` or the workers would refuse; warnings go to stderr.
    """
    settings = get_settings(ctx)
    problems = preflight(settings)
    if connect and not problems:
        problems = connect_checks(settings)
    if problems:
        for problem in problems[1:]:
            click.echo(f"kraite-mp: configuration error: {problem}", err=True)
        fail(ctx, f"configuration error: {problems[0]}", exitcodes.EXIT_FATAL_CONFIG)
    from kraite_mp.binance.user import USER_DATA_EVENTS, check_events

    if list(settings.user_data_stream.events) != list(USER_DATA_EVENTS):  # the defaults are a known trade
        for warning in check_events(settings.user_data_stream.events)[1]:
            click.echo(f"kraite-mp: warning: user_data_stream.events: {warning}", err=True)
    click.echo(json.dumps(settings.redacted(), indent=2))


def preflight(settings: Settings) -> list[str]:
    """What `run` and the workers would refuse beyond ``config.validate``: the secret key, the observers."""
    from kraite_mp.observers import load_observer
    from kraite_mp.store.accounts import SecretKeyError, check_secret_key

    problems = []
    try:
        check_secret_key(settings.secret_key)
    except SecretKeyError as e:
        problems.append(str(e))
    for path in settings.jobs.observers:
        try:
            load_observer(path)
        except Exception as e:  # noqa: BLE001 - an observer module may raise anything at import
            problems.append(f"jobs.observers: cannot load {path!r}: {describe_error(e)}")
    return problems


def connect_checks(settings: Settings) -> list[str]:
    """``check-config --connect``: PostgreSQL (schema, secrets decrypt) and Redis, one line per problem."""
    import redis

    from kraite_mp.config import redact_url
    from kraite_mp.messages import redis_client
    from kraite_mp.store.accounts import undecryptable_accounts
    from kraite_mp.store.db import DatabaseUnavailable, SchemaNotReady, check_schema, connect

    problems = []
    try:
        conn = connect(settings.database_url, application_name="kraite-mp check-config")
    except DatabaseUnavailable as e:
        problems.append(str(e))
    else:
        try:
            check_schema(conn)
            bad = undecryptable_accounts(conn, settings.secret_key)
            if bad:
                problems.append(
                    f"secret_key cannot decrypt the API secret of account(s) {', '.join(map(str, bad))}"
                    " (after a key change: `kraite-mp rotate-secret-key`)"
                )
        except SchemaNotReady as e:
            problems.append(str(e))
        finally:
            conn.close()
    client = redis_client(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as e:
        problems.append(f"Redis unreachable at {redact_url(settings.redis_url)}: {describe_error(e)}")
    finally:
        client.close()
    problems += binance_time_check(settings)
    return problems


def binance_time_check(settings: Settings) -> list[str]:
    """GET ``<binance.rest_url>/fapi/v1/time`` (weight 1, unsigned): the REST base answers like Binance."""
    from urllib.request import urlopen

    url = settings.binance.rest_url.rstrip("/") + "/fapi/v1/time"
    try:
        with urlopen(url, timeout=settings.binance.rest_timeout_s) as response:  # noqa: S310 - http(s) only (validated)
            server_time = json.loads(response.read())["serverTime"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"Binance REST unreachable at {settings.binance.rest_url}: {describe_error(e)}"]
    if not isinstance(server_time, int):
        return [f"binance.rest_url {settings.binance.rest_url}: /fapi/v1/time answered no serverTime"]
    return []


@cli.command("gen-secret-key")
def gen_secret_key() -> None:
    """Print a new Fernet key for KRAITE_SECRET_KEY."""
    from kraite_mp.store.accounts import generate_secret_key

    click.echo(generate_secret_key())


@cli.command("rotate-secret-key")
@click.option("--old-key-file", type=click.Path(dir_okay=False), help="File holding the previous key.")
@click.option("--old-key-env", metavar="VAR", help="Environment variable holding the previous key.")
@click.option("--old-key-stdin", is_flag=True, help="Read the previous key from the first line of stdin.")
@click.pass_context
def rotate_secret_key(
    ctx: click.Context, old_key_file: str | None, old_key_env: str | None, old_key_stdin: bool
) -> None:
    """Re-encrypt every stored API secret under the configured secret_key (its first key).

    Without downtime: set secret_key = "NEW,OLD" (comma-separated: the first encrypts, every one decrypts)
    everywhere and restart, run this, then drop OLD. Or, with secret_key = NEW only, give OLD here once.
    All or nothing: a secret that decrypts under none of the keys changes nothing (exit 78).
    """
    from kraite_mp.store.accounts import SecretKeyError, rotate_secrets, split_keys

    settings = get_settings(ctx)
    given = [x for x in (old_key_file, old_key_env, old_key_stdin or None) if x]
    if len(given) > 1:
        raise click.UsageError("give at most one of --old-key-file, --old-key-env, --old-key-stdin")
    old_keys: list[str] = []
    if given:
        old_keys = split_keys(_read_value(old_key_file, old_key_env, old_key_stdin, "--old-key"))
    with connected(ctx) as conn:
        try:
            count = rotate_secrets(conn, settings.secret_key, old_keys)
        except SecretKeyError as e:
            fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
    _announce(ctx, settings, f"re-encrypted {count} account secret(s) under the first key of secret_key")


@cli.group(cls=LazyDbGroup)
def db() -> None:
    """Database schema, and api_data_stream's day partitions (prune)."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations (idempotent), and make api_data_stream's next day partitions."""
    from kraite_mp.store.db import migrate
    from kraite_mp.store.retention import PartitionsBusy, ensure_partitions

    with connected(ctx, schema=False) as conn:
        applied = migrate(conn)
        try:
            created = ensure_partitions(conn)
        except PartitionsBusy as e:  # the periodic maintenance makes them: days are made well ahead
            click.echo(f"kraite-mp: warning: {e}", err=True)
            created = []
    click.echo(
        f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date"
    )
    if created:
        click.echo(f"created {len(created)} partition(s) of api_data_stream: {', '.join(created)}")


@cli.group()
def accounts() -> None:
    """Manage exchange accounts (no SQL needed)."""


def _read_value(path: str | None, env: str | None, stdin: bool, option: str) -> str:
    """One secret from a file, an environment variable or stdin: UTF-8, stripped, not empty."""
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise click.UsageError(f"{option}-file {path}: {e.strerror or e}") from None
        where = f"{option}-file {path}"
    elif env:
        value = os.environ.get(env, "")
        if not value.strip():
            raise click.UsageError(f"environment variable {env} is empty or not set")
        return value.strip()
    else:
        raw = sys.stdin.buffer.readline() if stdin else b""
        where = "stdin"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise click.UsageError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if not text:
        raise click.UsageError(f"{where}: empty")
    return text


def _read_secret(secret_file: str | None, secret_env: str | None, secret_stdin: bool) -> str:
    chosen = [x for x in (secret_file, secret_env, secret_stdin or None) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --api-secret-file, --api-secret-env, --api-secret-stdin")
    return _read_value(secret_file, secret_env, secret_stdin, "--api-secret")


def _secret_options(f: Any) -> Any:
    f = click.option(
        "--api-secret-stdin", is_flag=True, help="Read the API secret from the first line of stdin."
    )(f)
    f = click.option(
        "--api-secret-env", metavar="VAR", help="Name of an environment variable holding the API secret."
    )(f)
    return click.option(
        "--api-secret-file", type=click.Path(dir_okay=False), help="File holding the API secret."
    )(f)


@accounts.command("add")
@click.option("--name", required=True)
@click.option("--api-key", required=True, help="The API key (not secret).")
@_secret_options
@click.option("--inactive", is_flag=True, help="Add it disabled.")
@click.pass_context
def accounts_add(
    ctx: click.Context,
    name: str,
    api_key: str,
    api_secret_file: str | None,
    api_secret_env: str | None,
    api_secret_stdin: bool,
    inactive: bool,
) -> None:
    """Add an account; the secret never goes on the command line (ps would show it)."""
    import psycopg2

    from kraite_mp.store.accounts import DuplicateApiKey, SecretKeyError, add_account, mask, set_active

    settings = get_settings(ctx)
    secret = _read_secret(api_secret_file, api_secret_env, api_secret_stdin)
    with connected(ctx) as conn:
        try:
            account = add_account(
                conn, settings.secret_key, name=name, api_key=api_key, api_secret=secret, unique_api_key=True
            )
            if inactive:
                set_active(conn, account.id, False)
        except SecretKeyError as e:
            fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
        except psycopg2.errors.UniqueViolation:
            fail(ctx, f"an account named {name!r} already exists")
        except DuplicateApiKey as e:
            fail(ctx, f"refused: {e}")
        except ValueError as e:
            fail(ctx, e)
    click.echo(f"added account id={account.id} name={account.name} api_key={mask(account.api_key)}")


@accounts.command("update")
@click.argument("account_id", type=int)
@click.option("--name", default=None, help="A new name.")
@click.option("--api-key", default=None, help="A new API key (give its secret too, unless only it changed).")
@_secret_options
@click.pass_context
def accounts_update(
    ctx: click.Context,
    account_id: int,
    name: str | None,
    api_key: str | None,
    api_secret_file: str | None,
    api_secret_env: str | None,
    api_secret_stdin: bool,
) -> None:
    """Rename an account or replace (rotate) its API key and/or secret.

    New credentials clear a remembered invalid-credentials error; the account's stream restarts with them.
    """
    import psycopg2

    from kraite_mp.store.accounts import AccountRemoved, DuplicateApiKey, SecretKeyError, mask, update_account

    settings = get_settings(ctx)
    secret = None
    if api_secret_file or api_secret_env or api_secret_stdin:
        secret = _read_secret(api_secret_file, api_secret_env, api_secret_stdin)
    if name is None and api_key is None and secret is None:
        raise click.UsageError("nothing to change: give --name, --api-key and/or an --api-secret-* option")
    with connected(ctx) as conn:
        try:
            account = update_account(
                conn, settings.secret_key, account_id, name=name, api_key=api_key, api_secret=secret
            )
        except SecretKeyError as e:
            fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
        except psycopg2.errors.UniqueViolation:
            fail(ctx, f"an account named {name!r} already exists")
        except (AccountRemoved, DuplicateApiKey) as e:
            fail(ctx, f"refused: {e}")
        except ValueError as e:
            fail(ctx, e)
    if account is None:
        fail(ctx, f"no account with id {account_id}")
    changed = ", ".join(
        what
        for what, given in (("name", name), ("api key", api_key), ("api secret", secret))
        if given is not None
    )
    _announce(
        ctx,
        settings,
        f"updated account id={account.id} name={account.name} api_key={mask(account.api_key)} ({changed})",
    )


@accounts.command("remove")
@click.argument("account_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def accounts_remove(ctx: click.Context, account_id: int, yes: bool) -> None:
    """Remove an account for good: its stream stops, its secret and API key are erased, its name is freed.

    Its orders, audit rows, balances and positions stay. (To pause an account, use `accounts disable`.)
    """
    from kraite_mp.store.accounts import get_account, remove_account

    settings = get_settings(ctx)
    with connected(ctx) as conn:
        account = get_account(conn, account_id)
        if account is None:
            fail(ctx, f"no account with id {account_id}")
        if account.removed:
            click.echo(f"account {account_id} was already removed")
            return
        if not yes:
            click.confirm(f"remove account id={account.id} name={account.name} for good?", abort=True)
        remove_account(conn, account_id)
    _announce(ctx, settings, f"removed account {account_id} (its orders and audit rows stay)")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include removed accounts.")
@click.pass_context
def accounts_list(ctx: click.Context, as_json: bool, show_all: bool) -> None:
    """List accounts (secrets never shown, API keys masked)."""
    from kraite_mp.store.accounts import list_accounts, mask

    with connected(ctx) as conn:
        rows = list_accounts(conn, include_removed=show_all)
    data = [
        {
            "id": a.id,
            "name": a.name,
            "exchange": a.exchange,
            "api_key": mask(a.api_key) if a.api_key else "-",
            "active": a.is_active,
            "removed": a.removed,
            "credentials_error": a.credentials_error,
        }
        for a in rows
    ]
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"{'ID':>5}  {'NAME':<20} {'EXCHANGE':<8} {'API KEY':<12} {'ACTIVE':<6} CREDENTIALS")
    for d in data:
        click.echo(
            f"{d['id']:>5}  {d['name']:<20} {d['exchange']:<8} {d['api_key']:<12} "
            f"{'yes' if d['active'] else 'no':<6} {d['credentials_error'] or 'ok'}"
        )


def _set_active(ctx: click.Context, account_id: int, active: bool) -> None:
    from kraite_mp.store.accounts import AccountRemoved, set_active

    settings = get_settings(ctx)
    with connected(ctx) as conn:
        try:
            found = set_active(conn, account_id, active)
        except AccountRemoved as e:
            fail(ctx, f"refused: {e}")
    if not found:
        fail(ctx, f"no account with id {account_id}")
    _announce(ctx, settings, f"account {account_id} {'enabled' if active else 'disabled'}")


@accounts.command("disable")
@click.argument("account_id", type=int)
@click.pass_context
def accounts_disable(ctx: click.Context, account_id: int) -> None:
    """Disable an account: its stream stops within supervisor.accounts_refresh_s (or at SIGHUP)."""
    _set_active(ctx, account_id, False)


@accounts.command("enable")
@click.argument("account_id", type=int)
@click.pass_context
def accounts_enable(ctx: click.Context, account_id: int) -> None:
    """Enable an account and clear a remembered invalid-credentials error: a FATAL stream retries at once."""
    _set_active(ctx, account_id, True)


@cli.command("run")
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
    from kraite_mp.config import parse_shard
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
        reporters=Reporters([RedisStatus()]),
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


#: Signals that stop ``run`` while it waits for PostgreSQL (the arbiter installs its own afterwards).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _db_wait_max_s() -> float:
    return float(DB_WAIT_BASE_S * 2**DB_WAIT_CAP_EXPONENT)


def warn_if_redis_down(settings: Settings) -> bool:
    """One warning line when Redis does not answer at start (the streams spool until it does); True if up."""
    import logging

    import redis

    from kraite_mp.config import redact_url
    from kraite_mp.messages import redis_client

    client = redis_client(settings.redis_url)
    try:
        client.ping()
        return True
    except redis.RedisError as e:
        logging.getLogger("kraite_mp.supervisor").warning(
            "Redis unreachable at %s: %s; streams spool their frames locally and workers wait until it"
            " answers (`kraite-mp status` needs it too)",
            redact_url(settings.redis_url),
            describe_error(e),
        )
        return False
    finally:
        client.close()


@cli.command("sync-orders")
@click.option(
    "--account", "account_id", type=int, default=None, help="Only this account id (default: all owned)."
)
@click.option(
    "--every",
    "every_s",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Repeat every SECONDS until SIGTERM/SIGINT (default: one pass).",
)
@click.option(
    "--mode",
    type=click.Choice(RECONCILE_MODES),
    default=None,
    help="full: complete (weight 90+ per account); targeted: per-symbol check of the open orders the "
    "database knows (~1 per symbol); auto: targeted with a periodic full sweep. "
    "Default: full for one pass, auto with --every.",
)
@click.pass_context
def sync_orders_command(
    ctx: click.Context, account_id: int | None, every_s: float | None, mode: str | None
) -> None:
    """Reconcile orders with Binance over REST (the safety net for frames lost by the stream)."""
    from kraite_mp.reconcile.runner import reconcile_accounts
    from kraite_mp.store.accounts import get_account
    from kraite_mp.supervisor.ownership import owned_accounts

    settings = get_settings(ctx)
    if every_s is not None and every_s < MIN_EVERY_S:
        raise click.BadParameter(f"must be at least {MIN_EVERY_S}", param_hint="--every")
    mode = mode or ("auto" if every_s is not None else "full")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        conn = open_db(ctx, settings)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    worst = exitcodes.EXIT_OK
    try:
        while True:
            if account_id is not None:
                account = get_account(conn, account_id)
                if account is None:
                    fail(ctx, f"no account with id {account_id}")
                accounts = [account]
            else:
                accounts = owned_accounts(conn, settings)
            results = reconcile_accounts(
                conn,
                settings,
                accounts,
                mode=mode,
                stop=stop,
                on_result=lambda _i, r: click.echo(r.summary()),
            )
            if len(results) < len(accounts) and not stop.is_set():
                click.echo(f"skipped {len(accounts) - len(results)} account(s): Binance rate limit", err=True)
            if any(r.status != "ok" for r in results) or len(results) < len(accounts):
                worst = exitcodes.EXIT_ERROR
            if every_s is None or stop.wait(every_s):
                break
            worst = exitcodes.EXIT_OK
    finally:
        conn.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ctx.exit(worst)


@cli.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("dramatiq_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker_command(ctx: click.Context, dramatiq_args: tuple[str, ...]) -> None:
    """Run Dramatiq workers on the installed kraite_mp.jobs; arguments go to `dramatiq` unchanged.

    e.g. `kraite-mp worker --queues user-data-stream --processes 2 --threads 8`. The configuration is
    checked first: a bad one exits 78 with one line (not a traceback from every worker process).
    """
    settings = get_settings(ctx)
    for problem in preflight(settings):
        fail(ctx, f"configuration error: {problem}", exitcodes.EXIT_FATAL_CONFIG)
    root = ctx.find_root().ensure_object(dict)
    if root.get("config_path"):  # kraite_mp.jobs loads the settings itself, in every worker process
        os.environ["KRAITE_CONFIG"] = os.path.abspath(root["config_path"])
    if root.get("log_level"):
        os.environ["KRAITE_LOG_LEVEL"] = root["log_level"].upper()
    try:
        importlib.import_module("kraite_mp.jobs")  # what each worker process imports: fail here, once
    except ConfigError as e:
        fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback per worker process
        fail(ctx, f"cannot load kraite_mp.jobs: {describe_error(e)}", exitcodes.EXIT_FATAL_CONFIG)
    warn_if_redis_down(settings)
    if settings.metrics.listen:  # the workers of this host join `kraite-mp run`'s metrics (docs/METRICS.md)
        from kraite_mp.metrics import MULTIPROC_ENV

        directory = os.environ.setdefault(
            MULTIPROC_ENV, os.path.join(os.path.abspath(settings.run_dir), "metrics")
        )
        os.makedirs(directory, mode=0o700, exist_ok=True)
    import kraite_mp

    # dramatiq puts --path (default ".") first on sys.path: point it at the package `run` imports,
    # never at a checkout that happens to be the working directory
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(kraite_mp.__file__)))
    script = os.path.join(os.path.dirname(sys.executable), "dramatiq")
    command = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "dramatiq"]
    argv = [*command, "kraite_mp.jobs", *dramatiq_args, "--path", package_root]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="kraite-mp", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
