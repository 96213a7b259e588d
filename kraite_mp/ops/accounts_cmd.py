"""``kraite-mp accounts ...`` and ``kraite-mp rotate-secret-key``: the exchange accounts and their encrypted
secrets, without SQL; each change tells this host's supervisor (SIGHUP) so that it acts at once."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

from kraite_mp import exitcodes
from kraite_mp.config import Settings
from kraite_mp.ops.cli import connected, fail, get_settings


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


@click.command("rotate-secret-key")
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


@click.group("accounts")
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
