"""Which accounts this supervisor owns: the one replaceable place for sharding across hosts.

Today every supervisor owns all active Binance accounts ("all") or a static modulo shard
("I/N": account id % N == I). A future lease-based owner (several hosts, one PostgreSQL)
implements the same ``AccountOwnership`` protocol and is chosen in ``ownership_from_settings``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kraite_mp.config import parse_shard

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account


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
    shard = parse_shard(settings.supervisor.shard)
    return AllAccounts() if shard is None else ModuloShard(*shard)


def owned_accounts(conn: object, settings: Settings) -> list[Account]:
    """The active Binance accounts this supervisor must stream, by id."""
    from kraite_mp.store.accounts import list_accounts

    owner = ownership_from_settings(settings)
    return [a for a in list_accounts(conn, active_only=True, exchange="binance") if owner.owns(a)]
