"""Retention of ``api_data_stream``: one partition per UTC day, made ahead and dropped whole when old.

The table is range-partitioned by ``audit_day`` (migration 0005), the UTC day that
``store.audit.audit_day`` derives from what every copy of a frame shares: the time inside its frame id
(event time E for a streamed frame, update time for a REST order), else the event time in the frame,
else the ``received_at`` its message carries. Not the insert time: a unique index of a partitioned
table must contain the partition key, so ``UNIQUE (frame_id, audit_day)`` is the idempotency barrier
only if a redelivery, on whatever worker and day, computes the day the first delivery did. It does:
for every id the product mints the day is a function of the frame id alone. Why the barrier still
holds across pruning, and what an operator runs: docs/RETENTION.md.

- ``ensure_partitions``: the day partitions of yesterday .. today + ``ahead_days`` (migration 0005
  makes the first ones). A DEFAULT partition takes rows of any other day, so an insert never fails; since
  PostgreSQL refuses to make a day partition while the DEFAULT holds rows of that day, such rows are
  moved into the new partition in the same transaction (they keep their ids and times).
- ``prune``: with ``cutoff = today - retention_days``, drops every day partition whose whole range
  lies before ``cutoff`` and deletes the DEFAULT's rows of days before it. A row written on or after
  ``cutoff`` (a frame that arrived late, or was replayed, for an old day) is kept either way: it is
  moved to the DEFAULT partition before its day's partition is dropped, and the DEFAULT keeps it until
  it was written before ``cutoff``. So every audit row lives at least ``retention_days`` days after
  both its day and its insert, and stops every redelivery of its frame that long.

"Today" is the database's (``now()`` in UTC): one clock for every host. Each step is a short
transaction of its own with a ``lock_timeout``: a partition whose locks are busy is left for the next
run (``PruneReport.busy``). Partition names go through ``psycopg2.sql.Identifier``, values through
parameters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql

log = logging.getLogger(__name__)

#: The partitioned table, its DEFAULT partition, and the name of a day partition (+ ``YYYYMMDD``).
TABLE = "api_data_stream"
DEFAULT_PARTITION = "api_data_stream_default"
PARTITION_PREFIX = "api_data_stream_p"
#: Day partitions made ahead of today (migration 0005 makes the same).
AHEAD_DAYS = 7
#: ``prune`` refuses fewer kept days (today and yesterday are never dropped); config.load checks the same.
MIN_RETENTION_DAYS = 2
#: How long a step waits for a table lock before it leaves its work for the next run (ms). While it
#: waits for the ACCESS EXCLUSIVE lock (a long query holds the table), new inserts queue behind it.
LOCK_TIMEOUT_MS = 2000
#: Serialises concurrent ``ensure_partitions``/``prune`` runs (hosts, the CLI): arbitrary constant.
RETENTION_LOCK_ID = 0x6B7261697465 + 5

#: Every column, in an order the moves below use for both sides (never ``SELECT *``).
COLUMNS = (
    "id",
    "frame_id",
    "account_id",
    "exchange",
    "source",
    "event_type",
    "event_time_ms",
    "payload",
    "raw_text",
    "received_at",
    "processed_at",
    "outcome",
    "error",
    "audit_day",
)

_BOUND_RE = re.compile(r"^FOR VALUES FROM \('(\d{4}-\d{2}-\d{2})'\) TO \('(\d{4}-\d{2}-\d{2})'\)$")
#: Lock errors that mean "busy now, try at the next run" (not a failure of the data).
_BUSY_ERRORS = (psycopg2.errors.LockNotAvailable, psycopg2.errors.DeadlockDetected)


class PartitionsBusy(RuntimeError):
    """The table's lock was not granted within ``LOCK_TIMEOUT_MS``: nothing changed, run again later."""


@dataclass(frozen=True)
class Partition:
    """One partition of ``api_data_stream``: a day range ``[start, end)``, or the DEFAULT (no range)."""

    name: str
    start: date | None = None
    end: date | None = None

    @property
    def is_default(self) -> bool:
        return self.start is None


@dataclass
class PruneReport:
    """What ``prune`` did (or, with ``dry_run``, would do)."""

    #: Day partitions dropped, oldest first.
    dropped: list[str] = field(default_factory=list)
    #: Rows written on or after the cutoff, moved from the dropped partitions to the DEFAULT.
    moved_late_rows: int = 0
    #: Rows of days before the cutoff deleted from the DEFAULT partition.
    default_rows_deleted: int = 0
    #: Partitions left for the next run: their locks were busy.
    busy: list[str] = field(default_factory=list)
    #: The first day kept.
    cutoff: date | None = None


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def _col_list() -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, COLUMNS))


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


@contextmanager
def _transaction(conn: Any) -> Iterator[Any]:
    """A cursor in a transaction of its own (the connection's work so far must be committed)."""
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = %s", (f"{LOCK_TIMEOUT_MS}ms",))
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def db_today(conn: Any) -> date:
    """Today (UTC) by the database's clock."""
    with _transaction(conn) as cur:
        cur.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        today: date = cur.fetchone()[0]
    return today


def _partitions(cur: Any) -> list[Partition]:
    cur.execute("SET LOCAL datestyle = 'ISO, YMD'")  # the bound text below is parsed
    cur.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass ORDER BY c.relname",
        (TABLE,),
    )
    found = []
    for name, bound in cur.fetchall():
        if bound == "DEFAULT":
            found.append(Partition(name))
            continue
        m = _BOUND_RE.match(bound or "")
        if m is None:  # made by hand (MINVALUE, several days, ...): never ours to drop
            log.warning("partition %s of %s has an unexpected bound %r: ignored", name, TABLE, bound)
            continue
        found.append(Partition(name, date.fromisoformat(m.group(1)), date.fromisoformat(m.group(2))))
    return found


def partitions(conn: Any) -> list[Partition]:
    """Every partition of ``api_data_stream`` (the DEFAULT one with no range), by name."""
    with _transaction(conn) as cur:
        return _partitions(cur)


def _missing_days(found: list[Partition], wanted: list[date]) -> list[date]:
    ranges = [(p.start, p.end) for p in found if p.start is not None and p.end is not None]
    return [d for d in wanted if not any(start <= d < end for start, end in ranges)]


def ensure_partitions(
    conn: Any, today: date | None = None, ahead_days: int = AHEAD_DAYS, *, dry_run: bool = False
) -> list[str]:
    """Make the missing day partitions of yesterday .. today + ``ahead_days``; their names.

    Rows of such a day that the DEFAULT partition holds move into the new partition. Nothing is locked
    when nothing is missing; else one transaction holds the table's ACCESS EXCLUSIVE lock for as long
    as making the partitions (and moving the DEFAULT's rows of those days) takes: milliseconds.
    """
    if today is None:
        today = db_today(conn)
    wanted = [today + timedelta(days=n) for n in range(-1, ahead_days + 1)]
    missing = _missing_days(partitions(conn), wanted)
    if dry_run or not missing:
        return [partition_name(d) for d in missing]
    try:
        created, moved = _create(conn, wanted)
    except _BUSY_ERRORS as e:
        raise PartitionsBusy(
            f"{TABLE} is busy ({type(e).__name__} within {LOCK_TIMEOUT_MS} ms): no partition made, run again"
        ) from None
    for day in created:
        log.info("created partition %s", partition_name(day))
    if moved:
        log.info("moved %d row(s) from %s into the new partitions", moved, DEFAULT_PARTITION)
    return [partition_name(d) for d in created]


def _create(conn: Any, wanted: list[date]) -> tuple[list[date], int]:
    """Make the partitions of ``wanted`` days that are missing: those days, and how many rows came out of
    the DEFAULT partition into them."""
    with _transaction(conn) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK_ID,))
        # the lock every insert takes first (ROW EXCLUSIVE on the parent), so nobody waits in a cycle
        cur.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(TABLE)))
        found = _partitions(cur)
        missing = _missing_days(found, wanted)  # another run may have made some meanwhile
        moved = 0
        if missing and any(p.is_default for p in found):
            moved = _move_out_of_default(cur, [p for p in found if p.is_default][0].name, missing)
        for day in missing:
            cur.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM (%s) TO (%s)").format(
                    sql.Identifier(partition_name(day)), sql.Identifier(TABLE)
                ),
                (day, day + timedelta(days=1)),
            )
        if moved:
            cur.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM kraite_moved_rows").format(
                    sql.Identifier(TABLE), _col_list(), _col_list()
                )
            )
            cur.execute("DROP TABLE kraite_moved_rows")
    return missing, moved


def _move_out_of_default(cur: Any, default: str, days: list[date]) -> int:
    """Take the DEFAULT's rows of ``days`` out into the temporary table ``kraite_moved_rows``; how many."""
    cur.execute(
        sql.SQL("CREATE TEMP TABLE kraite_moved_rows (LIKE {}) ON COMMIT DROP").format(sql.Identifier(TABLE))
    )
    cur.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE audit_day = ANY(%s) RETURNING {}) INSERT INTO kraite_moved_rows ({})"
            " SELECT {} FROM moved"
        ).format(sql.Identifier(default), _col_list(), _col_list(), _col_list()),
        (days,),
    )
    moved: int = cur.rowcount
    if not moved:
        cur.execute("DROP TABLE kraite_moved_rows")
    return moved


def prune_report(
    conn: Any, retention_days: int, today: date | None = None, *, dry_run: bool = False
) -> PruneReport:
    """Drop the day partitions older than ``retention_days`` and the DEFAULT's rows as old (see the module
    docstring for the exact rule); what was done. ``dry_run`` changes nothing and counts what would go."""
    if retention_days < MIN_RETENTION_DAYS:
        raise ValueError(f"retention_days must be >= {MIN_RETENTION_DAYS}, got {retention_days}")
    if today is None:
        today = db_today(conn)
    cutoff = today - timedelta(days=retention_days)
    cutoff_ts = _midnight(cutoff)
    report = PruneReport(cutoff=cutoff)
    found = partitions(conn)
    # by range, never by name: a partition goes only when all of its days are before the cutoff (which
    # is two days ago at the latest: today and yesterday always stay)
    old = sorted(
        (p for p in found if p.end is not None and p.end <= cutoff and p.end < today),
        key=lambda p: p.end or cutoff,
    )
    for part in old:
        try:
            late = _drop_partition(conn, part, cutoff_ts, dry_run=dry_run)
        except _BUSY_ERRORS as e:
            log.warning("partition %s is busy (%s): left for the next run", part.name, type(e).__name__)
            report.busy.append(part.name)
            continue
        except psycopg2.errors.UndefinedTable:
            continue  # a concurrent run (another host, the CLI) dropped it first
        report.dropped.append(part.name)
        report.moved_late_rows += late
    default = next((p for p in found if p.is_default), None)
    if default is not None:
        try:
            report.default_rows_deleted = _prune_default(
                conn, default.name, cutoff, cutoff_ts, dry_run=dry_run
            )
        except _BUSY_ERRORS as e:
            log.warning("partition %s is busy (%s): left for the next run", default.name, type(e).__name__)
            report.busy.append(default.name)
    return report


def prune(conn: Any, retention_days: int, today: date | None = None, *, dry_run: bool = False) -> list[str]:
    """``prune_report`` that returns the names of the partitions dropped."""
    return prune_report(conn, retention_days, today, dry_run=dry_run).dropped


def _drop_partition(conn: Any, part: Partition, cutoff_ts: datetime, *, dry_run: bool) -> int:
    """Drop one old day partition, keeping its rows written since ``cutoff_ts`` (moved to the DEFAULT)."""
    name = sql.Identifier(part.name)
    late_rows = sql.SQL("FROM {} WHERE processed_at >= %s").format(name)
    with _transaction(conn) as cur:
        if dry_run:
            cur.execute(sql.SQL("SELECT count(*) ") + late_rows, (cutoff_ts,))
            late: int = cur.fetchone()[0]
            return late
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK_ID,))
        # no new row for this old day while its rows are looked at (other days are not held up); the
        # DROP then takes the parent's ACCESS EXCLUSIVE lock for a moment
        cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(name))
        cur.execute(
            sql.SQL("CREATE TEMP TABLE kraite_late_rows (LIKE {}) ON COMMIT DROP").format(
                sql.Identifier(TABLE)
            )
        )
        cur.execute(
            sql.SQL(
                "WITH moved AS (DELETE {} RETURNING {}) INSERT INTO kraite_late_rows ({}) SELECT {} FROM moved"
            ).format(late_rows, _col_list(), _col_list(), _col_list()),
            (cutoff_ts,),
        )
        late = cur.rowcount
        cur.execute(sql.SQL("DROP TABLE {}").format(name))
        if late:
            # no partition holds their day any more: they land in the DEFAULT, which keeps them
            cur.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM kraite_late_rows").format(
                    sql.Identifier(TABLE), _col_list(), _col_list()
                )
            )
        cur.execute("DROP TABLE kraite_late_rows")
    log.info("dropped partition %s (%d late row(s) kept in %s)", part.name, late, DEFAULT_PARTITION)
    return late


def _prune_default(conn: Any, default: str, cutoff: date, cutoff_ts: datetime, *, dry_run: bool) -> int:
    """Delete the DEFAULT partition's rows whose day and insert both came before the cutoff; how many."""
    where = sql.SQL("FROM {} WHERE audit_day < %s AND processed_at < %s").format(sql.Identifier(default))
    with _transaction(conn) as cur:
        if dry_run:
            cur.execute(sql.SQL("SELECT count(*) ") + where, (cutoff, cutoff_ts))
            count: int = cur.fetchone()[0]
            return count
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK_ID,))
        cur.execute(sql.SQL("DELETE ") + where, (cutoff, cutoff_ts))
        count = cur.rowcount
    if count:
        log.info("deleted %d row(s) of days before %s from %s", count, cutoff, default)
    return count


@dataclass
class MaintenanceReport:
    """One ``maintain`` run: partitions made ahead, then pruned."""

    created: list[str]
    pruned: PruneReport


def maintain(
    conn: Any, retention_days: int, today: date | None = None, ahead_days: int = AHEAD_DAYS
) -> MaintenanceReport:
    """The periodic step (hourly is plenty): ``ensure_partitions`` then ``prune``."""
    if today is None:
        today = db_today(conn)
    try:
        created = ensure_partitions(conn, today, ahead_days)
    except PartitionsBusy as e:  # the next run makes them: AHEAD_DAYS are made in advance
        log.warning("%s", e)
        created = []
    return MaintenanceReport(created, prune_report(conn, retention_days, today))
