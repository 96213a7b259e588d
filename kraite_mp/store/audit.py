"""``api_data_stream``: the audit row of every streamed frame and every REST-fetched order.

One INSERT for both sources. The unique ``frame_id`` is the idempotency barrier: a second delivery
of a frame (or an unchanged REST answer) inserts nothing, and ``write`` says so.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

#: Where an audited payload came from (the table's CHECK constraint allows these two).
Source = Literal["ws", "rest"]

_INSERT = (
    "INSERT INTO api_data_stream (frame_id, account_id, exchange, source, event_type, event_time_ms, payload,"
    " raw_text, received_at, outcome, error) VALUES (%s, %s, 'binance', %s, %s, %s, %s::jsonb, %s, %s, %s, %s)"
    " ON CONFLICT (frame_id) DO NOTHING RETURNING id"
)


def write(
    cur: Any,
    *,
    frame_id: str,
    account_id: int,
    source: Source,
    event_type: str | None,
    event_time_ms: int | None,
    payload_text: str | None,
    received_at: datetime,
    outcome: str,
    error: str | None,
    raw_text: str | None = None,
) -> bool:
    """Insert one audit row inside the caller's transaction; False when ``frame_id`` is already there.

    ``payload_text`` is JSON text (stored as jsonb); ``raw_text`` keeps what is not valid JSON.
    """
    cur.execute(
        _INSERT,
        (
            frame_id,
            account_id,
            source,
            event_type,
            event_time_ms,
            payload_text,
            raw_text,
            received_at,
            outcome,
            error,
        ),
    )
    return cur.fetchone() is not None
