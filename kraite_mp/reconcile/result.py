"""What one reconciliation of one account did (``ReconcileResult``) and how it ended (``ReconcileStatus``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kraite_mp.store import orders


class ReconcileStatus(StrEnum):
    """How one reconciliation of one account ended (the values are what ``summary()`` prints)."""

    #: Every call answered (some orders may still be unknown to the exchange: ``not_found``).
    OK = "ok"
    #: The exchange rejected the key or signature; the account is marked (``mark_credentials_invalid``).
    INVALID_CREDENTIALS = "invalid_credentials"
    #: 429/418: no more calls until ``retry_after_s``.
    RATE_LIMITED = "rate_limited"
    #: Network trouble or a 5xx: try again later.
    TRANSIENT = "transient"
    #: Any other exchange error, an unreadable secret, or a database error that dropped this account's results.
    ERROR = "error"


@dataclass
class ReconcileResult:
    """What one reconciliation of one account did."""

    account_id: int
    account_name: str
    mode: str = "full"  #: the sweep that ran ("auto" resolved)
    status: ReconcileStatus = ReconcileStatus.OK
    shadow: bool = False  #: audited only (empty dispatched_executions)
    checked: int = 0  #: REST answers looked at
    updated: int = 0  #: orders the answers made newer
    transitions: int = 0  #: status changes recorded
    not_found: int = 0  #: orders the exchange no longer knows (-2013)
    audited: int = 0  #: audit rows written (unchanged answers are not audited again)
    invalid: int = 0  #: answers that could not be parsed
    positions: int = 0  #: position rows the snapshot made newer (closed ones set to zero included)
    balances: int = 0  #: balance rows the snapshot made newer
    requests: int = 0  #: REST requests sent
    weight: int = 0  #: request weight they cost
    error: str | None = None  #: what went wrong, when status is not ok
    retry_after_s: float | None = None  #: after a 429/418: seconds until Binance may be called again
    #: gap sweep: the symbols whose order history was read (evidence of a change the stream did not deliver)
    history_symbols: list[str] = field(default_factory=list)
    #: gap sweep: the history of the symbols a full sweep reads is left to a background ``history`` sweep
    history_deferred: bool = False
    transition_list: list[orders.Transition] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        text = (
            f"account={self.account_id} name={self.account_name} mode={self.mode} status={self.status}"
            f" checked={self.checked} updated={self.updated} transitions={self.transitions}"
            f" not_found={self.not_found} positions={self.positions} balances={self.balances}"
            f" requests={self.requests} weight={self.weight}"
        )
        if self.shadow:
            text += " shadow=yes"
        if self.history_deferred:
            text += " history=deferred"
        if self.error:
            text += f" error={self.error!r}"
        return text
