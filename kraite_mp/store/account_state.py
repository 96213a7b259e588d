"""``account_balances`` and ``account_positions``: one monotonic write path for the stream and REST.

Every row carries the exchange time of the observation it holds (``event_time_ms``); a write lands
only when its time is at least the stored one. An ACCOUNT_UPDATE processed late, or a REST answer
older than a streamed frame, changes nothing; a newer one always wins. The stream writes through
``apply_account_update``; reconciliation writes the REST snapshot through ``upsert_balances`` /
``upsert_positions`` (each row with its own time) and ``zero_absent_positions``: positionRisk lists
only the positions that exist, so a position that went to zero during a gap is set to zero here.
All of it runs inside the caller's transaction, which first takes the account's state lock
(``lock_account_state``): the stream's ACCOUNT_UPDATEs and a reconciliation's snapshot of one
account, processed by concurrent workers, then write one after the other instead of locking the same
balance and position rows in different orders (PostgreSQL's "deadlock detected", seen in CI).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from decimal import Decimal
from typing import Any

from kraite_mp.binance.user import AccountUpdate, Balance, Position

# monotonic by event time: an older observation processed late changes nothing
_BALANCE_UPSERT = (
    "INSERT INTO account_balances AS b (account_id, asset, wallet_balance, cross_wallet_balance, balance_change,"
    " event_time_ms) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, asset) DO UPDATE SET wallet_balance = EXCLUDED.wallet_balance,"
    " cross_wallet_balance = EXCLUDED.cross_wallet_balance, balance_change = EXCLUDED.balance_change,"
    " event_time_ms = EXCLUDED.event_time_ms, updated_at = now()"
    " WHERE EXCLUDED.event_time_ms >= b.event_time_ms"
)
# margin_type: REST (positionRisk v3) does not say it; the stored one is kept then
_POSITION_UPSERT = (
    "INSERT INTO account_positions AS p (account_id, symbol, position_side, amount, entry_price, breakeven_price,"
    " unrealized_pnl, margin_type, isolated_wallet, event_time_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, symbol, position_side) DO UPDATE SET amount = EXCLUDED.amount,"
    " entry_price = EXCLUDED.entry_price, breakeven_price = EXCLUDED.breakeven_price,"
    " unrealized_pnl = EXCLUDED.unrealized_pnl, margin_type = COALESCE(EXCLUDED.margin_type, p.margin_type),"
    " isolated_wallet = EXCLUDED.isolated_wallet, event_time_ms = EXCLUDED.event_time_ms, updated_at = now()"
    " WHERE EXCLUDED.event_time_ms >= p.event_time_ms"
)
# the positions of the account that a snapshot taken at %s no longer lists: closed meanwhile
_ZERO_ABSENT = (
    "UPDATE account_positions AS p SET amount = 0, entry_price = 0, breakeven_price = 0, unrealized_pnl = 0,"
    " isolated_wallet = 0, event_time_ms = %s, updated_at = now()"
    " WHERE p.account_id = %s AND p.event_time_ms <= %s AND p.amount IS DISTINCT FROM 0"
    " AND (p.symbol, p.position_side) NOT IN (SELECT s, ps FROM unnest(%s::text[], %s::text[]) AS k (s, ps))"
)


_OPEN_POSITIONS = (
    "SELECT symbol, position_side, amount FROM account_positions WHERE account_id = %s AND amount <> 0"
)


#: The first key of the account-state advisory locks (two 32-bit keys; the second is the account).
ACCOUNT_STATE_LOCK_CLASS = 0x6B6D7073  # "kmps"


def lock_account_state(cur: Any, account_id: int) -> None:
    """Wait for, then hold until the transaction ends, the account's balances-and-positions lock."""
    cur.execute(
        "SELECT pg_advisory_xact_lock(%s, (%s::bigint %% 2147483647)::int)",
        (ACCOUNT_STATE_LOCK_CLASS, account_id),
    )


def upsert_balances(cur: Any, account_id: int, balances: Iterable[tuple[Balance, int]]) -> int:
    """Write each (balance, event time ms) unless a newer one is stored; the rows written."""
    written = 0
    for b, event_time_ms in balances:
        cur.execute(
            _BALANCE_UPSERT,
            (account_id, b.asset, b.wallet_balance, b.cross_wallet_balance, b.balance_change, event_time_ms),
        )
        written += max(int(cur.rowcount), 0)
    return written


def upsert_positions(cur: Any, account_id: int, positions: Iterable[tuple[Position, int]]) -> int:
    """Write each (position, event time ms) unless a newer one is stored; the rows written."""
    written = 0
    for p, event_time_ms in positions:
        cur.execute(
            _POSITION_UPSERT,
            (
                account_id,
                p.symbol,
                p.position_side,
                p.amount,
                p.entry_price,
                p.breakeven_price,
                p.unrealized_pnl,
                p.margin_type,
                p.isolated_wallet,
                event_time_ms,
            ),
        )
        written += max(int(cur.rowcount), 0)
    return written


def zero_absent_positions(
    cur: Any, account_id: int, present: Collection[tuple[str, str]], event_time_ms: int
) -> int:
    """Set to zero every stored non-zero position of the account not in ``present`` ((symbol, side)
    pairs of a complete snapshot taken at ``event_time_ms``), unless a newer observation is stored;
    the rows changed."""
    pairs = sorted(present)
    cur.execute(
        _ZERO_ABSENT,
        (event_time_ms, account_id, event_time_ms, [s for s, _ in pairs], [ps for _, ps in pairs]),
    )
    return max(int(cur.rowcount), 0)


def apply_account_update(cur: Any, update: AccountUpdate) -> None:
    """An ACCOUNT_UPDATE's balances and positions, all as of its event time."""
    t = update.event_time_ms
    lock_account_state(cur, update.account_id)
    # rows in key order, as a reconciliation writes them
    balances = sorted(update.balances, key=lambda b: b.asset)
    positions = sorted(update.positions, key=lambda p: (p.symbol, p.position_side))
    upsert_positions(cur, update.account_id, ((p, t) for p in positions))
    upsert_balances(cur, update.account_id, ((b, t) for b in balances))


def open_positions(conn: Any, account_id: int) -> dict[tuple[str, str], Decimal]:
    """(symbol, position side) -> amount of every non-zero position stored for the account."""
    with conn.cursor() as cur:
        cur.execute(_OPEN_POSITIONS, (account_id,))
        rows = cur.fetchall()
    conn.commit()
    return {(r[0], r[1]): Decimal(r[2]) for r in rows}
