"""What a streamed frame does to the database: ``decide`` and ``apply_outcome``.

``decide`` is pure: the ``api_data_stream.outcome`` of a parsed frame (``AuditOutcome``) under the dispatch
allowlist, and the rows it changes (``Outcome``). ``apply_outcome`` makes those changes inside the audit's
transaction (``jobs.JobRunner``); the audit row itself is ``store.audit.write``'s.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kraite_mp.binance import user
from kraite_mp.binance.orders import OrderState
from kraite_mp.binance.user import AccountUpdate, FrameKind, UserEvent
from kraite_mp.store.account_state import apply_account_update
from kraite_mp.store.orders import Transition, apply_order_update


class AuditOutcome(StrEnum):
    """``api_data_stream.outcome`` of a streamed frame (and what the job returns)."""

    #: An order update was applied (or found stale: the stored state was newer).
    DISPATCHED = "dispatched"
    #: Its dispatch key is not in ``user_data_stream.binance.dispatched_executions``.
    SKIPPED = "skipped"
    #: The allowlist is empty: audit only.
    SHADOW = "shadow"
    #: An ACCOUNT_UPDATE written to balances and positions.
    APPLIED = "applied"
    #: An audit-only event: TRADE_LITE (its fill comes in ORDER_TRADE_UPDATE, never counted twice),
    #: MARGIN_CALL, listenKeyExpired, ...
    AUDITED = "audited"
    #: An event type we do not know.
    UNKNOWN = "unknown"
    MALFORMED = FrameKind.MALFORMED.value
    NOT_OBJECT = FrameKind.NOT_OBJECT.value
    OVERSIZED = FrameKind.OVERSIZED.value
    #: A known event missing what its handler needs (``error`` says what).
    INVALID = "invalid"
    #: PostgreSQL refused the data (or the handler failed); audited with the error.
    ERROR = "error"
    #: Already audited: a redelivery (returned, never stored).
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Outcome:
    """What the job decided for one frame: the audit outcome and the rows to change in its transaction."""

    outcome: AuditOutcome
    error: str | None = None
    order: OrderState | None = None
    account: AccountUpdate | None = None


def decide(event: UserEvent, allowlist: Collection[str]) -> Outcome:
    """The outcome of a parsed frame under the dispatch ``allowlist`` (empty: shadow mode); pure."""
    if event.kind is not FrameKind.EVENT:
        return Outcome(AuditOutcome(event.kind.value), event.error)
    if not event.known:
        return Outcome(AuditOutcome.UNKNOWN, f"unknown event type {event.event_type!r}")
    if event.event_type in (user.ORDER_TRADE_UPDATE, user.ALGO_UPDATE):
        if not allowlist:
            return Outcome(AuditOutcome.SHADOW)
        key = event.dispatch_key
        if key is None:
            return Outcome(AuditOutcome.INVALID, "no dispatch key (o.x / o.X missing)")
        if key not in allowlist:
            return Outcome(AuditOutcome.SKIPPED, f"{key} is not dispatched")
        if event.order is None:
            return Outcome(AuditOutcome.INVALID, event.error)
        return Outcome(AuditOutcome.DISPATCHED, order=event.order)
    if event.event_type == user.ACCOUNT_UPDATE:
        if not allowlist:
            return Outcome(AuditOutcome.SHADOW)
        if event.account is None:
            return Outcome(AuditOutcome.INVALID, event.error)
        return Outcome(AuditOutcome.APPLIED, account=event.account)
    # TRADE_LITE (its fill is counted from ORDER_TRADE_UPDATE), MARGIN_CALL, listenKeyExpired, ...
    return Outcome(AuditOutcome.AUDITED)


def apply_outcome(cur: Any, outcome: Outcome, frame_id: str) -> list[Transition]:
    """The row changes of ``outcome``, inside the audit's transaction; the status changes made."""
    transitions: list[Transition] = []
    if outcome.order is not None:
        transition = apply_order_update(cur, outcome.order, frame_id=frame_id)
        if transition is not None:
            transitions.append(transition)
    if outcome.account is not None:
        apply_account_update(cur, outcome.account)
    return transitions
