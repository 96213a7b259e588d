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
from kraite_mp.config import ConfigError, Settings
from kraite_mp.config.load import env_typos, load_settings
from kraite_mp.logs import describe_error, setup_logging

#: ``sync-orders --every`` never sleeps less than this between passes.
MIN_EVERY_S = 1.0

#: ``sync-orders --mode`` choices: ``kraite_mp.reconcile.modes.OPERATOR_MODES``, spelled out so that every
#: command does not import the REST and Redis stack just to build its option list (a test keeps them equal).
RECONCILE_MODES = ("full", "targeted", "auto")

#: What ``--log-level`` accepts (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Subcommands that live in their own modules: name -> "module:attribute".
LAZY_COMMANDS: dict[str, str] = {
    "simulate": "kraite_mp.simulator.cli:simulate",
    "status": "kraite_mp.ops.status:status_command",
    "fleet": "kraite_mp.ops.fleet_cmd:fleet_command",
    "demo": "kraite_mp.ops.demo:demo_command",
    "dead-letters": "kraite_mp.ops.deadletters:dead_letters",
    "init": "kraite_mp.ops.init_cmd:init_cmd",
    "run": "kraite_mp.ops.run_cmd:run_command",
    "accounts": "kraite_mp.ops.accounts_cmd:accounts",
    "rotate-secret-key": "kraite_mp.ops.accounts_cmd:rotate_secret_key",
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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $KRAITE_CONFIG, else the first of ./etc/kraite-mp.toml,"
    " $KRAITE_MP_HOME/etc/kraite-mp.toml, /etc/kraite-mp/kraite-mp.toml that exists).",
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
    """What `run` and the workers would refuse beyond ``config.load.validate``: the secret key, the observers."""
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
        # S310 (urlopen of a configured URL) is safe here: validation admits only http(s) rest_urls
        with urlopen(url, timeout=settings.binance.rest_timeout_s) as response:  # noqa: S310
            server_time = json.loads(response.read())["serverTime"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"Binance REST unreachable at {settings.binance.rest_url}: {describe_error(e)}"]
    if not isinstance(server_time, int):
        return [f"binance.rest_url {settings.binance.rest_url}: /fapi/v1/time answered no serverTime"]
    return []


def warn_if_redis_down(settings: Settings) -> bool:
    """One warning line when Redis does not answer at start (the streams spool until it does); True if up."""
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


@cli.command("gen-secret-key")
def gen_secret_key() -> None:
    """Print a new Fernet key for KRAITE_SECRET_KEY."""
    from kraite_mp.store.accounts import generate_secret_key

    click.echo(generate_secret_key())


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
