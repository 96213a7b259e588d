"""``api_data_stream``: the audit row of every streamed frame and every REST-fetched order.

One INSERT for both sources. The unique ``(frame_id, audit_day)`` is the idempotency barrier: a second
delivery of a frame (or an unchanged REST answer) inserts nothing, and ``write`` says so.

The table is partitioned by ``audit_day`` (one partition per UTC day, dropped whole by
``store.retention``), and PostgreSQL only enforces a unique index that contains the partition key. So
the day must be the same for every copy of a frame, whoever writes it and whenever: ``audit_day`` is a
pure function of what the copies share, read in this order (docs/RETENTION.md):

1. the time inside the frame id, when it has one. Every id the product mints has one: a streamed
   frame's content id ``<account>-e<E ms>-<digest>`` (its event time), the id of a frame without an
   event time ``<account>-r<receive µs>-<run>-<seq>`` (unique anyway), and a REST order's
   ``rest:<account>:<kind>:<id>:<updateTime ms>:<status>``. The day is then a function of the frame id
   alone: the same frame lands in the same partition, so the unique index there stops a redelivery
   exactly as the old table-wide one did (a concurrent delivery waits on that index, as before);
2. else the event time the frame carries (``event_time_ms``, read from the frame's text);
3. else ``received_at``, which a queued frame carries in its message and every redelivery repeats.

An id without a time of its own (a positions/balances snapshot ``rest:<account>:<kind>:<digest>``, a
hand-made id) is also looked up in every partition before it is inserted (``_INSERT_UNDATED``): such an
answer seen again on another day is still not audited twice. That lookup probes each partition's
unique index once, so it is kept off the hot path of streamed frames, whose ids are always dated.
The same rule, in SQL, gave the rows that existed before partitioning their day (migration 0005).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

#: Where an audited payload came from (the table's CHECK constraint allows these two).
Source = Literal["ws", "rest"]

#: Day 0 of the epoch times in frame ids and frames.
EPOCH_DAY = date(1970, 1, 1)
MS_PER_DAY = 86_400_000
#: A time (ms) at or past this is beyond 9999-12-31 (the last day Python's date has): not a usable day.
MAX_DAY_MS = 253_402_300_800_000

#: ``<account>-e<event time, ms>-<digest>`` and ``<account>-r<receive time, µs>-...`` (messages.FrameIds).
#: A time has at most 20 digits: a longer run is no time (and int() refuses very long digit strings).
_STREAM_ID = re.compile(r"[0-9]+-(e|r)([0-9]{1,20})-")
#: ``rest:<account>:<kind>:<order or algo id>:<update time, ms>:<status>`` (reconcile.sweep._frame_id).
_REST_ORDER_ID = re.compile(r"rest:[0-9]+:(?:regular|algo):[^:]*:([0-9]{1,20}):[^:]*")

_INSERT = (
    "INSERT INTO api_data_stream (frame_id, account_id, exchange, source, event_type, event_time_ms, payload,"
    " raw_text, received_at, outcome, error, audit_day)"
    " VALUES (%s, %s, 'binance', %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)"
    " ON CONFLICT (frame_id, audit_day) DO NOTHING RETURNING id"
)
#: An id without a time (the day may differ between copies): inserted only if it is in no partition yet.
#: The casts type the SELECT's columns, which a VALUES list takes from the table.
_INSERT_UNDATED = (
    "INSERT INTO api_data_stream (frame_id, account_id, exchange, source, event_type, event_time_ms, payload,"
    " raw_text, received_at, outcome, error, audit_day)"
    " SELECT %s::text, %s::bigint, 'binance', %s::text, %s::text, %s::bigint, %s::jsonb, %s::text,"
    " %s::timestamptz, %s::text, %s::text, %s::date"
    " WHERE NOT EXISTS (SELECT 1 FROM api_data_stream WHERE frame_id = %s)"
    " ON CONFLICT (frame_id, audit_day) DO NOTHING RETURNING id"
)


def _day_of_ms(ms: int) -> date | None:
    if 0 <= ms < MAX_DAY_MS:
        return EPOCH_DAY + timedelta(days=ms // MS_PER_DAY)
    return None


def frame_id_day(frame_id: str) -> date | None:
    """The UTC day of the time inside ``frame_id`` (rule 1 of the module docstring), None when it holds none."""
    m = _STREAM_ID.match(frame_id)
    if m is not None:
        value = int(m.group(2))
        return _day_of_ms(value if m.group(1) == "e" else value // 1000)
    m = _REST_ORDER_ID.fullmatch(frame_id)
    if m is not None:
        return _day_of_ms(int(m.group(1)))
    return None


def audit_day(frame_id: str, event_time_ms: int | None, received_at: datetime) -> date:
    """The partition key of an audit row: the same for every copy of one frame (the module docstring)."""
    day = frame_id_day(frame_id)
    if day is None and event_time_ms is not None:
        day = _day_of_ms(event_time_ms)
    if day is None:
        aware = received_at if received_at.tzinfo is not None else received_at.replace(tzinfo=UTC)
        day = aware.astimezone(UTC).date()
    return day


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
    day = audit_day(frame_id, event_time_ms, received_at)
    values = (
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
        day,
    )
    if frame_id_day(frame_id) is not None:
        cur.execute(_INSERT, values)
    else:
        cur.execute(_INSERT_UNDATED, (*values, frame_id))
    return cur.fetchone() is not None
