"""Which children this supervisor runs: one user-data child per account it owns, and mark-price.

Today every supervisor owns all active Binance accounts ("all") or a static modulo shard
("I/N": account id % N == I). A future lease-based owner (several hosts, one PostgreSQL)
implements the same ``AccountOwnership`` protocol and is chosen in ``ownership_from_settings``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kraite_mp.config.load import parse_shard
from kraite_mp.supervisor import runfiles
from kraite_mp.supervisor.process import AfterStop, Child, ChildState, change_state
from kraite_mp.supervisor.runfiles import ROLE_MARK_PRICE, ROLE_METRICS, ROLE_USER_DATA

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account
    from kraite_mp.supervisor.fleet import FleetOwnership


class AccountsUnavailable(RuntimeError):
    """The accounts could not be read (PostgreSQL down, bad data); the message names no secret."""


class AccountOwnership(Protocol):
    def owns(self, account: Account) -> bool: ...

    def describe(self) -> str: ...


class AllAccounts:
    def owns(self, account: Account) -> bool:
        return True

    def describe(self) -> str:
        return "all"


class ModuloShard:
    def __init__(self, index: int, count: int) -> None:
        self.index, self.count = index, count

    def owns(self, account: Account) -> bool:
        return account.id % self.count == self.index

    def describe(self) -> str:
        return f"{self.index}/{self.count}"


def ownership_from_settings(settings: Settings) -> AccountOwnership:
    """The static owner: every account, or the shard (with "fleet" every account is a candidate)."""
    if settings.supervisor.ownership == "fleet":
        return AllAccounts()
    shard = parse_shard(settings.supervisor.shard)
    return AllAccounts() if shard is None else ModuloShard(*shard)


def fleet_from_settings(settings: Settings) -> FleetOwnership | None:
    """The fleet side of a supervisor with ``supervisor.ownership = "fleet"``, else None."""
    if settings.supervisor.ownership != "fleet":
        return None
    from kraite_mp.supervisor.fleet import FleetOwnership, host_id_of

    return FleetOwnership(settings, host_id_of(settings))


def owned_accounts(conn: object, settings: Settings) -> list[Account]:
    """The active Binance accounts this supervisor must stream, by id."""
    from kraite_mp.store.accounts import list_accounts

    owner = ownership_from_settings(settings)
    return [a for a in list_accounts(conn, active_only=True, exchange="binance") if owner.owns(a)]


def read_owned_accounts(settings: Settings) -> list[Account]:
    """Connect, read the owned accounts, close (no connection may cross a fork); or AccountsUnavailable."""
    import psycopg2

    from kraite_mp.store.db import DatabaseUnavailable, connect

    try:
        conn = connect(settings.database_url, application_name="kraite-mp supervisor")
    except DatabaseUnavailable as e:
        raise AccountsUnavailable(str(e)) from None
    try:
        return owned_accounts(conn, settings)
    except (psycopg2.Error, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AccountsUnavailable(f"{type(e).__name__}: {first}") from None
    finally:
        conn.close()


StopChild = Callable[[Child, AfterStop, str], None]


def converge_accounts(
    children: dict[str, Child], accounts: list[Account], now: float, stop_child: StopChild
) -> tuple[int, int, int]:
    """Make the user-data ``children`` follow ``accounts``: (added, removed, changed)."""
    wanted = {runfiles.child_key(ROLE_USER_DATA, a.id): a for a in accounts}
    added = removed = changed = 0
    for key, child in list(children.items()):
        if child.role != ROLE_USER_DATA:
            continue
        account = wanted.get(key)
        if account is None:
            if child.after_stop is not AfterStop.REMOVE:
                removed += 1
                stop_child(child, AfterStop.REMOVE, "account removed or deactivated")
        elif child.account is None or account.fingerprint != child.account.fingerprint:
            changed += 1
            child.account = account
            child.attempt = 0
            if child.pid is not None:
                stop_child(child, AfterStop.RESTART, "account changed")
            else:  # also ends a FATAL wait: new credentials deserve a try now
                change_state(child, ChildState.PENDING, now)
        elif child.after_stop is AfterStop.REMOVE:  # came back while stopping
            child.after_stop = AfterStop.RESTART
    for key, account in wanted.items():
        if key not in children:
            added += 1
            children[key] = Child(key=key, role=ROLE_USER_DATA, account=account, due_at=now)
    return added, removed, changed


def converge_mark_price(
    children: dict[str, Child],
    settings: Settings,
    now: float,
    stop_child: StopChild,
    *,
    run: bool | None = None,
) -> None:
    """One mark-price child while ``run`` (default ``supervisor.mark_price``; in a fleet: this supervisor
    leads), none otherwise."""
    run = settings.supervisor.mark_price if run is None else run
    child = children.get(ROLE_MARK_PRICE)
    if run and child is None:
        children[ROLE_MARK_PRICE] = Child(key=ROLE_MARK_PRICE, role=ROLE_MARK_PRICE, due_at=now)
    elif run and child is not None and child.after_stop is AfterStop.REMOVE:
        child.after_stop = AfterStop.RESTART  # re-enabled while it was stopping
    elif not run and child is not None and child.after_stop is not AfterStop.REMOVE:
        stop_child(child, AfterStop.REMOVE, "mark-price not led here")


def prepare_metrics(settings: Settings) -> None:
    """With ``metrics.listen``: every process of this host writes its series under ``<run_dir>/metrics``
    (``PROMETHEUS_MULTIPROC_DIR``, inherited by the children; set before prometheus_client is imported)."""
    import os

    from kraite_mp import metrics

    if not settings.metrics.listen:
        return
    directory = os.environ.setdefault(metrics.MULTIPROC_ENV, os.path.join(settings.run_dir, "metrics"))
    metrics.prepare_dir(directory)


def converge_metrics(
    children: dict[str, Child], settings: Settings, now: float, stop_child: StopChild
) -> None:
    """One metrics child while ``metrics.listen`` is set (and the metrics directory is in place)."""
    from kraite_mp import metrics

    child = children.get(ROLE_METRICS)
    run = bool(settings.metrics.listen) and metrics.multiprocess_dir() is not None
    if run and child is None:
        children[ROLE_METRICS] = Child(key=ROLE_METRICS, role=ROLE_METRICS, due_at=now)
    elif run and child is not None and child.after_stop is AfterStop.REMOVE:
        child.after_stop = AfterStop.RESTART
    elif not run and child is not None and child.after_stop is not AfterStop.REMOVE:
        stop_child(child, AfterStop.REMOVE, "metrics.listen disabled")
