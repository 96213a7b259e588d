"""One account's reconciliation: ask Binance over REST, write the answers through the ordered update.

Frames lost while a stream reconnects (or after a listenKey expiry) are gone for good; only REST can
tell what happened meanwhile. ``reconcile_account`` asks Binance about the account's orders and writes
every answer through the same ordered, idempotent update as the stream
(``kraite_mp.store.orders.apply_order_update``), so a stale REST answer never overwrites a newer
streamed one. A full sweep also reads the account's positions and balances (positionRisk, balance) and
writes them through the stream's monotonic ACCOUNT_UPDATE write (``kraite_mp.store.account_state``), as
of the server time the request was sent: a position the answer no longer lists was closed meanwhile and
is set to zero, and a streamed row newer than the request is never overwritten. Every REST result is
audited once (source ``rest``, frame id ``rest:<account>:<kind>:<id>:<updateTime>:<status>`` for an
order, ``rest:<account>:positions|balances:<digest>`` for a snapshot, ``:error`` appended to an
unusable one: an unchanged answer is not audited again), and observers run after COMMIT, as for
streamed frames. In shadow mode (empty ``user_data_stream.binance.dispatched_executions``) results
are audited only.

Modes: ``full`` (every open order, plus the history of the active symbols since the last full
sweep), ``targeted`` (per-symbol checks of the orders the database holds open), ``gap`` (after a
reconnect whose gap is known; below), ``history`` (the gap's order history, in the background: below),
``auto`` (full when one is due or the stream may have missed frames, else targeted). Failures stay per
account and come back as a ``ReconcileResult`` (a 429/418 also ends the pass); what was fetched before a
failure is still written; only database errors propagate.

The gap sweep pays for what the gap can hide (``_fetch_gap``): 5 + 1 per listed symbol and kind, + 10 per
symbol whose history it reads from the gap start where the account call shows a change the stream did not
deliver. What it cannot show, orders placed and ended unfilled inside the gap, the ``history`` sweep reads
afterwards in the background (``supervisor.gap_sweep_history = "deferred"``: 10 per symbol a full sweep
would read, leaving half the budget to everything else) or the next full sweep does ("evidence").

Known gap (of every mode): orders placed *and* ended inside a gap are found only on an active symbol
(one with an order, regular or algo, the database saw in the window, or an open position, stored or
listed): on any other symbol (orders that left no position behind), and on an account the database
knows no order of yet, they are not. Two fills in the same millisecond, the connection lost between
their two frames, would also pass for delivered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from kraite_mp.binance.errors import BinanceError, InvalidCredentials, RateLimited, TransientError
from kraite_mp.binance.fields import FrameError
from kraite_mp.binance.orders import OrderState, algo_from_rest, order_from_rest
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.binance.user import balances_from_rest, positions_from_rest
from kraite_mp.observers import run_observers
from kraite_mp.reconcile.fetch import Snapshot, Sweep, fetch, update_time
from kraite_mp.reconcile.modes import MODES, choose_mode
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.store import account_state, audit, orders
from kraite_mp.store.accounts import Account, mark_credentials_invalid
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: The fields of a snapshot item that identify an observation (not markPrice, PnL: they move all the time).
_SNAPSHOT_IDENTITY: dict[str, tuple[str, ...]] = {
    "positions": (
        "symbol",
        "positionSide",
        "positionAmt",
        "entryPrice",
        "breakEvenPrice",
        "isolatedWallet",
        "updateTime",
    ),
    "balances": ("asset", "balance", "crossWalletBalance", "updateTime"),
}


# -- one account ------------------------------------------------------------------------------------


def _frame_id(account_id: int, kind: str, data: dict[str, Any]) -> str:
    if kind == "algo":
        oid, status = data.get("algoId"), data.get("algoStatus")
    else:
        oid, status = data.get("orderId"), data.get("status")
    updated = data.get("updateTime") or data.get("time") or data.get("createTime")
    return f"rest:{account_id}:{kind}:{oid}:{updated}:{status}"


def _json(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


def _write(conn: Any, settings: Settings, account: Account, sweep: Sweep, result: ReconcileResult) -> None:
    """Audit every answer and (unless shadow) apply it, in one transaction; then run observers."""
    transitions: list[orders.Transition] = []
    try:
        with conn.cursor() as cur:
            # rows are locked in (kind, id) order: two reconciliations of one account never deadlock
            for (kind, _), fetched in sorted(sweep.fetched.items(), key=lambda kv: kv[0]):
                result.checked += 1
                error = None
                state: OrderState | None = None
                try:
                    parse = algo_from_rest if kind == "algo" else order_from_rest
                    state = parse(account.id, fetched.data)
                except FrameError as e:
                    error = str(e)
                    result.invalid += 1
                    log.warning("account %s: unusable %s REST result: %s", account.id, kind, e)
                outcome = "error" if state is None else ("shadow" if result.shadow else "processed")
                frame_id = _frame_id(account.id, kind, fetched.data)
                if audit.write(
                    cur,
                    frame_id=frame_id,
                    account_id=account.id,
                    source="rest",
                    event_type="REST_ALGO_ORDER" if kind == "algo" else "REST_ORDER",
                    event_time_ms=update_time(fetched.data) or None,
                    payload_text=_json(fetched.data),
                    received_at=fetched.received_at,
                    outcome=outcome,
                    error=error,
                ):
                    result.audited += 1
                if state is None or result.shadow:
                    continue
                current = orders.current_for_update(cur, state)
                changed = current is None or orders.is_newer(current, state)
                transition = orders.apply_order_update(cur, state, frame_id=frame_id)
                if changed:
                    result.updated += 1
                if transition is not None:
                    transitions.append(transition)
            for snap in sweep.snapshots:
                _write_snapshot(cur, account.id, snap, result)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    transitions.sort(key=lambda t: (t.new.get("last_transaction_time_ms") or 0, t.new.get("id") or 0))
    result.transitions = len(transitions)
    result.transition_list = transitions
    if transitions:
        run_observers(settings, transitions)


def _snapshot_frame_id(account_id: int, snap: Snapshot) -> str:
    fields = _SNAPSHOT_IDENTITY[snap.kind]
    identity = sorted(_json([item.get(f) for f in fields]) for item in snap.data)
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
    return f"rest:{account_id}:{snap.kind}:{digest}"


def _write_snapshot(cur: Any, account_id: int, snap: Snapshot, result: ReconcileResult) -> None:
    """Audit one positions/balances answer and (unless shadow) apply it through the monotonic write.

    A snapshot is used whole or not at all: one unusable item and nothing of it is applied (it also
    says which positions are gone, which a partial one cannot)."""
    result.checked += 1
    error = None
    positions = balances = None
    try:
        if snap.kind == "positions":
            positions = positions_from_rest(snap.data, snap.asked_at_ms)
        else:
            balances = balances_from_rest(snap.data, snap.asked_at_ms)
    except FrameError as e:
        error = str(e)
        result.invalid += 1
        log.warning("account %s: unusable %s REST result: %s", account_id, snap.kind, e)
    outcome = "error" if error else ("shadow" if result.shadow else "processed")
    if audit.write(
        cur,
        frame_id=_snapshot_frame_id(account_id, snap) + (":error" if error else ""),
        account_id=account_id,
        source="rest",
        event_type="REST_POSITIONS" if snap.kind == "positions" else "REST_BALANCES",
        event_time_ms=snap.asked_at_ms or None,
        payload_text=_json(snap.data),
        received_at=snap.received_at,
        outcome=outcome,
        error=error,
    ):
        result.audited += 1
    if result.shadow:
        return
    # one writer of an account's state at a time (the stream's ACCOUNT_UPDATEs take the same lock), and
    # rows in key order, as the orders above
    account_state.lock_account_state(cur, account_id)
    if positions is not None:
        positions.sort(key=lambda pt: (pt[0].symbol, pt[0].position_side))
        result.positions += account_state.upsert_positions(cur, account_id, positions)
        present = {(p.symbol, p.position_side) for p, _ in positions}
        result.positions += account_state.zero_absent_positions(cur, account_id, present, snap.asked_at_ms)
    if balances is not None:
        balances.sort(key=lambda bt: bt[0].asset)
        result.balances += account_state.upsert_balances(cur, account_id, balances)


def reconcile_account(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    rest: BinanceRest | None = None,
    mode: str = "full",
    gap_start_ms: int | None = None,
    history: list[str] | None = None,
) -> ReconcileResult:
    """Reconcile one account's orders with the exchange; see the module docstring for the modes.
    ``history``: mode ``history``'s symbols when the caller has them already (else ``history_symbols``).

    Never raises for exchange or network trouble (the result's ``status``/``error`` say what went
    wrong); database errors propagate after a rollback.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("gap", "history") and gap_start_ms is None:
        raise ValueError(f"mode {mode!r} needs gap_start_ms")
    return reconcile_with(
        conn, settings, account, rest=rest, mode=mode, gap_start_ms=gap_start_ms, history=history
    )


def reconcile_with(
    conn: Any,
    settings: Settings,
    account: Account,
    *,
    rest: BinanceRest | None,
    mode: str,
    gap_start_ms: int | None = None,
    history: list[str] | None = None,
) -> ReconcileResult:
    started_ms = int(time.time() * 1000)
    result = ReconcileResult(account.id, account.name)
    result.mode = choose_mode(settings, account.id, started_ms) if mode == "auto" else mode
    result.shadow = not settings.user_data_stream.binance.dispatched_executions
    own_client = rest is None
    client = rest if rest is not None else BinanceRest.for_account(settings, account)
    requests_before, weight_before = client.requests_sent, client.weight_spent
    sweep = Sweep(client, result)
    try:
        try:
            fetch(conn, settings, account, sweep, gap_start_ms, history)
        except InvalidCredentials as e:
            result.status, result.error = ReconcileStatus.INVALID_CREDENTIALS, str(e)
            log.error("account %s (%s): %s: marked invalid, skipped", account.id, account.name, e)
            mark_credentials_invalid(conn, account.id, str(e))
            return result
        except RateLimited as e:
            result.status, result.error = ReconcileStatus.RATE_LIMITED, str(e)
            result.retry_after_s = e.retry_after_s
            log.warning("account %s: %s: no more calls for it this cycle", account.id, e)
        except TransientError as e:
            result.status, result.error = ReconcileStatus.TRANSIENT, str(e)
            log.warning("account %s: %s: retried next cycle", account.id, e)
        except BinanceError as e:
            result.status, result.error = ReconcileStatus.ERROR, str(e)
            log.error("account %s: %s", account.id, e)
        if sweep.fetched or sweep.snapshots:
            _write(conn, settings, account, sweep, result)
        if result.status is ReconcileStatus.OK and result.mode == "full":
            runfiles.remember_full_sweep(settings.run_dir, account.id, started_ms)
        return result
    finally:
        result.requests = client.requests_sent - requests_before
        result.weight = client.weight_spent - weight_before
        if own_client:
            client.close()
