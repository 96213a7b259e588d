"""The ``kraite-mp`` command line (click). Heavy subcommands are imported only when used."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from kraite_mp import exitcodes
from kraite_mp.config import ConfigError, Settings, load_settings
from kraite_mp.logs import setup_logging
from kraite_mp.reconcile.sweep import MODES as RECONCILE_MODES

#: ``sync-orders --every`` never sleeps less than this between passes.
MIN_EVERY_S = 1.0

#: Subcommands that live in their own modules: name -> "module:attribute".
LAZY_COMMANDS: dict[str, str] = {
    "simulate": "kraite_mp.simulator.cli:simulate",
    "status": "kraite_mp.ops.status:status_command",
    "demo": "kraite_mp.ops.demo:demo_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        return super().get_command(ctx, cmd_name)


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
        setup_logging(settings.log_level)
        obj["settings"] = settings
    return obj["settings"]  # type: ignore[no-any-return]


def fail(ctx: click.Context, message: object, code: int = 1) -> NoReturn:
    """Print ``kraite-mp: message`` on stderr and exit with ``code``."""
    click.echo(f"kraite-mp: {message}", err=True)
    ctx.exit(code)


def open_db(ctx: click.Context, settings: Settings) -> Any:
    from kraite_mp.store.db import DatabaseUnavailable, connect

    try:
        return connect(settings.database_url, application_name="kraite-mp cli")
    except DatabaseUnavailable as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)


@contextmanager
def connected(ctx: click.Context) -> Iterator[Any]:
    """A database connection for one command, closed when the block ends."""
    conn = open_db(ctx, get_settings(ctx))
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
    help="TOML config file (default etc/kraite-mp.toml if present, or $KRAITE_CONFIG).",
)
@click.option("--log-level", default=None, help="Override log_level (DEBUG, INFO, ...).")
@click.version_option(package_name="kraite-mp")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """kraite-mp: Binance USD-M user-data and mark-price push daemon."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["log_level"] = log_level


@cli.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print it with secrets redacted."""
    settings = get_settings(ctx)
    click.echo(json.dumps(settings.redacted(), indent=2))


@cli.command("gen-secret-key")
def gen_secret_key() -> None:
    """Print a new Fernet key for KRAITE_SECRET_KEY."""
    from kraite_mp.store.accounts import generate_secret_key

    click.echo(generate_secret_key())


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations (idempotent)."""
    from kraite_mp.store.db import migrate

    with connected(ctx) as conn:
        applied = migrate(conn)
    click.echo(
        f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date"
    )


@cli.group()
def accounts() -> None:
    """Manage exchange accounts (no SQL needed)."""


def _read_secret(secret_file: str | None, secret_env: str | None, secret_stdin: bool) -> str:
    chosen = [x for x in (secret_file, secret_env, secret_stdin or None) if x]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --api-secret-file, --api-secret-env, --api-secret-stdin")
    if secret_file:
        with open(secret_file) as f:
            return f.read().strip()
    if secret_env:
        value = os.environ.get(secret_env, "")
        if not value:
            raise click.UsageError(f"environment variable {secret_env} is empty or not set")
        return value.strip()
    return sys.stdin.readline().strip()


@accounts.command("add")
@click.option("--name", required=True)
@click.option("--api-key", required=True, help="The API key (not secret).")
@click.option(
    "--api-secret-file", type=click.Path(exists=True, dir_okay=False), help="File holding the API secret."
)
@click.option(
    "--api-secret-env", metavar="VAR", help="Name of an environment variable holding the API secret."
)
@click.option("--api-secret-stdin", is_flag=True, help="Read the API secret from the first line of stdin.")
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

    from kraite_mp.store.accounts import SecretKeyError, add_account, mask, set_active

    settings = get_settings(ctx)
    secret = _read_secret(api_secret_file, api_secret_env, api_secret_stdin)
    with connected(ctx) as conn:
        try:
            account = add_account(conn, settings.secret_key, name=name, api_key=api_key, api_secret=secret)
            if inactive:
                set_active(conn, account.id, False)
        except SecretKeyError as e:
            fail(ctx, e, exitcodes.EXIT_FATAL_CONFIG)
        except psycopg2.errors.UniqueViolation:
            fail(ctx, f"an account named {name!r} already exists")
        except ValueError as e:
            fail(ctx, e)
    click.echo(f"added account id={account.id} name={account.name} api_key={mask(account.api_key)}")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def accounts_list(ctx: click.Context, as_json: bool) -> None:
    """List accounts (secrets never shown, API keys masked)."""
    from kraite_mp.store.accounts import list_accounts, mask

    with connected(ctx) as conn:
        rows = list_accounts(conn)
    data = [
        {
            "id": a.id,
            "name": a.name,
            "exchange": a.exchange,
            "api_key": mask(a.api_key),
            "active": a.is_active,
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
    from kraite_mp.store.accounts import set_active

    with connected(ctx) as conn:
        found = set_active(conn, account_id, active)
    if not found:
        fail(ctx, f"no account with id {account_id}")
    click.echo(f"account {account_id} {'enabled' if active else 'disabled'}")


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
    """Enable an account (and clear a remembered invalid-credentials error)."""
    _set_active(ctx, account_id, True)


@cli.command("run")
@click.pass_context
def run_command(ctx: click.Context) -> None:
    """Run the supervisor: one user-data child per owned account, one mark-price child, periodic sync.

    SIGTERM/SIGINT stop gracefully; SIGHUP reloads the configuration and the account list.
    """
    from kraite_mp.config import parse_shard
    from kraite_mp.store.accounts import SecretKeyError, encrypt_secret
    from kraite_mp.store.db import DatabaseUnavailable, connect
    from kraite_mp.supervisor.arbiter import Arbiter
    from kraite_mp.supervisor.publish import RedisStatus, Reporters
    from kraite_mp.supervisor.runfiles import AlreadyRunning, heartbeat_dir

    settings = get_settings(ctx)
    try:
        encrypt_secret(settings.secret_key, "probe")  # checks the key's shape; no real secret is touched
        parse_shard(settings.supervisor.shard)
    except SecretKeyError as e:
        fail(ctx, f"configuration error: {e}", exitcodes.EXIT_FATAL_CONFIG)
    except ValueError as e:
        fail(ctx, f"configuration error: supervisor.shard: {e}", exitcodes.EXIT_FATAL_CONFIG)
    try:
        connect(settings.database_url, application_name="kraite-mp supervisor").close()
    except DatabaseUnavailable as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
    try:
        os.makedirs(heartbeat_dir(settings.run_dir), exist_ok=True)
    except OSError as e:
        fail(ctx, f"cannot create {heartbeat_dir(settings.run_dir)}: {e}", exitcodes.EXIT_FATAL_CONFIG)
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
    help="full: complete (weight 80+ per account); targeted: per-symbol check of the open orders the "
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
    conn = open_db(ctx, settings)
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


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="kraite-mp", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
