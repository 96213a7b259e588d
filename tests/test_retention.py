"""Retention of ``api_data_stream`` (kraite_mp.store.retention, migration 0005, ``kraite-mp db prune``).

Every test that moves partitions or "today" runs on a scratch database of its own (made and dropped
here), never on the session database other tests share. The unit tier at the top checks the rule that
gives a row its day (``audit.audit_day``); the migration test checks that its SQL twin agrees.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import psycopg2
import pytest
from click.testing import CliRunner
from fixtures.userdata_helpers import FIXTURES
from psycopg2 import sql

from kraite_mp import exitcodes, jobs
from kraite_mp.config import Settings
from kraite_mp.messages import FrameIds
from kraite_mp.ops.retention_cmd import prune_cmd
from kraite_mp.store import audit, retention
from kraite_mp.store import db as kdb
from kraite_mp.store.dispatch import AuditOutcome

DAY_MS = 86_400_000


def ms_of(day: date, hour: int = 12) -> int:
    return int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)


def noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


def session_frames() -> list[str]:
    with open(FIXTURES / "sim_session_frames.jsonl") as f:
        return [json.loads(line)["frame"] for line in f if line.strip()]


def frame_at(day: date, seq: int = 0) -> str:
    """A TRADE_LITE frame (audit only) whose event time is on ``day``."""
    return json.dumps(
        {"e": "TRADE_LITE", "E": ms_of(day) + seq, "T": ms_of(day) + seq, "s": "BTCUSDT", "t": seq}
    )


def write(
    cur: Any, frame_id: str, *, event_time_ms: int | None, received_at: datetime, source: str = "ws"
) -> bool:
    return audit.write(
        cur,
        frame_id=frame_id,
        account_id=2,
        source=source,  # type: ignore[arg-type]
        event_type="TRADE_LITE",
        event_time_ms=event_time_ms,
        payload_text='{"e":"TRADE_LITE"}',
        received_at=received_at,
        outcome="audited",
        error=None,
    )


def rows(conn: Any, day: date | None = None) -> list[tuple[Any, ...]]:
    """(partition, id, frame_id, audit_day) of every row (of ``day``), by id."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT tableoid::regclass::text, id, frame_id, audit_day FROM api_data_stream"
            " WHERE %(day)s::date IS NULL OR audit_day = %(day)s ORDER BY id",
            {"day": day},
        )
        found = cur.fetchall()
    conn.commit()
    return found


def day_partitions(conn: Any) -> list[str]:
    return [p.name for p in retention.partitions(conn) if not p.is_default]


@pytest.fixture()
def scratch(pg_admin_url: str) -> Iterator[tuple[str, Any]]:
    """A migrated database of this test's own: (url, connection)."""
    name = f"kraite_retention_{uuid.uuid4().hex[:10]}"
    url = kdb.create_database(pg_admin_url, name)
    conn = kdb.connect(url)
    try:
        kdb.migrate(conn)
        yield url, conn
    finally:
        conn.close()
        kdb.drop_database(pg_admin_url, name)


# -- the day of a row (unit) ----------------------------------------------------------------------


@pytest.mark.unit
def test_the_day_of_a_frame_is_the_time_inside_its_id() -> None:
    ids = FrameIds(7)
    frame = frame_at(date(2026, 12, 1))
    content_id = ids.for_frame(frame)
    assert content_id.startswith("7-e")
    later = datetime(2027, 3, 1, tzinfo=UTC)
    # whoever receives it and whenever it is redelivered: the event time decides
    assert audit.audit_day(content_id, None, later) == date(2026, 12, 1)
    assert audit.audit_day(FrameIds(7).for_frame(frame), 0, later) == date(2026, 12, 1)
    unique_id = ids.next(received_us=ms_of(date(2026, 11, 30), 23) * 1000)
    assert audit.audit_day(unique_id, None, later) == date(2026, 11, 30)
    rest_id = f"rest:7:regular:8000000001:{ms_of(date(2026, 10, 2))}:FILLED"
    assert audit.audit_day(rest_id, None, later) == date(2026, 10, 2)
    assert audit.frame_id_day(f"7-e{DAY_MS - 1:013d}-ab") == date(1970, 1, 1)  # the last ms of a day
    assert audit.frame_id_day(f"7-e{DAY_MS:013d}-ab") == date(1970, 1, 2)


@pytest.mark.unit
def test_an_id_without_a_time_takes_the_event_time_then_received_at() -> None:
    received = datetime(2026, 12, 1, 23, 30, tzinfo=UTC)
    snapshot_id = "rest:7:positions:0123456789abcdef"
    assert audit.frame_id_day(snapshot_id) is None
    assert audit.audit_day(snapshot_id, ms_of(date(2026, 11, 5)), received) == date(2026, 11, 5)
    assert audit.audit_day(snapshot_id, None, received) == date(2026, 12, 1)
    # received_at in another zone counts by its UTC day; a naive one is taken as UTC
    plus_two = timezone(timedelta(hours=2))
    assert audit.audit_day("same-id", None, datetime(2026, 12, 2, 1, 30, tzinfo=plus_two)) == date(
        2026, 12, 1
    )
    assert audit.audit_day("same-id", None, datetime(2026, 12, 1, 23, 30)) == date(2026, 12, 1)
    # times no date can hold, and digit runs too long to be a time, are no time
    assert audit.frame_id_day("7-e99999999999999999-ab") is None
    assert audit.frame_id_day("7-e" + "1" * 25 + "-ab") is None
    assert audit.audit_day("7-e99999999999999999-ab", -5, received) == date(2026, 12, 1)
    assert audit.frame_id_day("rest:7:regular:1:None:NEW") is None
    # the status is any text without a colon (a newline too, in Python as in the migration's SQL)
    assert audit.frame_id_day("rest:7:regular:1:1700000000000:NEW\n") == date(2023, 11, 14)
    assert audit.frame_id_day("rest:7:regular:1:1700000000000:NEW:X") is None


# -- partitions ahead -----------------------------------------------------------------------------


@pytest.mark.integration
def test_migrate_makes_the_partitions_ahead_and_ensure_adds_the_missing_ones(
    scratch: tuple[str, Any],
) -> None:
    _, conn = scratch
    today = retention.db_today(conn)
    expected = [retention.partition_name(today + timedelta(days=n)) for n in range(-1, 8)]
    assert day_partitions(conn) == expected
    assert [p.name for p in retention.partitions(conn) if p.is_default] == [retention.DEFAULT_PARTITION]
    assert retention.ensure_partitions(conn) == []  # idempotent
    later = today + timedelta(days=3)
    assert retention.ensure_partitions(conn, later, dry_run=True) == [
        retention.partition_name(today + timedelta(days=n)) for n in (8, 9, 10)
    ]
    assert day_partitions(conn) == expected  # a dry run makes nothing
    assert retention.ensure_partitions(conn, later) == [
        retention.partition_name(today + timedelta(days=n)) for n in (8, 9, 10)
    ]
    by_name = {p.name: p for p in retention.partitions(conn)}
    last = by_name[retention.partition_name(today + timedelta(days=10))]
    assert (last.start, last.end) == (today + timedelta(days=10), today + timedelta(days=11))


@pytest.mark.integration
def test_the_partitioned_table_keeps_the_indexes_and_the_check(scratch: tuple[str, Any]) -> None:
    _, conn = scratch
    with conn.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'api_data_stream' ORDER BY indexname")
        indexes = [r[0] for r in cur.fetchall()]
        assert any("(account_id, received_at)" in d for d in indexes), indexes
        assert any("UNIQUE" in d and "(frame_id, audit_day)" in d for d in indexes), indexes
        assert any("(id, audit_day)" in d for d in indexes), indexes
        with pytest.raises(psycopg2.errors.CheckViolation):
            cur.execute(
                "INSERT INTO api_data_stream (frame_id, source, received_at, outcome, audit_day)"
                " VALUES ('x', 'ftp', now(), 'audited', current_date)"
            )
    conn.rollback()


# -- exactly once across days ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_redelivered_frame_on_another_days_run_is_still_a_duplicate(
    scratch: tuple[str, Any], settings: Settings
) -> None:
    url, conn = scratch
    runner = jobs.JobRunner(replace(settings, database_url=url))
    today = retention.db_today(conn)
    frame = frame_at(today)
    frame_id = FrameIds(2).for_frame(frame)
    first = runner.process_user_data_event(2, frame, frame_id, ms_of(today))
    assert first == AuditOutcome.AUDITED
    # the same frame from the other connection of a rollover, a spool replay days later, another host
    for days_later in (1, 3, 6):
        again = runner.process_user_data_event(2, frame, frame_id, ms_of(today + timedelta(days=days_later)))
        assert again == AuditOutcome.DUPLICATE
    # a frame without an event time (unique id) and a hand-made id without any time: the same
    no_time = FrameIds(2).next()
    assert runner.process_user_data_event(2, "not json", no_time, ms_of(today)) == AuditOutcome.MALFORMED
    assert runner.process_user_data_event(2, "not json", no_time, ms_of(today) + 5 * DAY_MS) == "duplicate"
    assert runner.process_user_data_event(2, '{"e":"X"}', "hand-made", ms_of(today)) == AuditOutcome.UNKNOWN
    assert runner.process_user_data_event(2, '{"e":"X"}', "hand-made", ms_of(today) + DAY_MS) == "duplicate"
    runner._drop_connection()
    assert [r[2] for r in rows(conn)] == [frame_id, no_time, "hand-made"]


@pytest.mark.integration
def test_an_unchanged_rest_answer_on_another_day_is_not_audited_again(scratch: tuple[str, Any]) -> None:
    _, conn = scratch
    today = retention.db_today(conn)
    snapshot_id = "rest:2:positions:0123456789abcdef0123456789abcdef"  # no time in it: looked up everywhere
    order_id = f"rest:2:regular:8000000001:{ms_of(today)}:FILLED"
    with conn.cursor() as cur:
        for days_later in (0, 1, 2):
            when = noon(today + timedelta(days=days_later))
            new = days_later == 0
            assert (
                write(
                    cur,
                    snapshot_id,
                    event_time_ms=int(when.timestamp() * 1000),
                    received_at=when,
                    source="rest",
                )
                is new
            )
            assert write(cur, order_id, event_time_ms=ms_of(today), received_at=when, source="rest") is new
    conn.commit()
    assert [(r[2], r[3]) for r in rows(conn)] == [(snapshot_id, today), (order_id, today)]


@pytest.mark.integration
def test_concurrent_deliveries_of_one_frame_wait_on_the_unique_index(scratch: tuple[str, Any]) -> None:
    url, conn = scratch
    today = retention.db_today(conn)
    frame_id = FrameIds(2).for_frame(frame_at(today))
    other = kdb.connect(url)
    try:
        with conn.cursor() as cur:
            assert write(cur, frame_id, event_time_ms=ms_of(today), received_at=noon(today))
        result: list[bool] = []

        def second_delivery() -> None:  # another worker, another day's received_at
            with other.cursor() as cur2:
                result.append(
                    write(cur2, frame_id, event_time_ms=None, received_at=noon(today) + timedelta(days=2))
                )
            other.commit()

        thread = threading.Thread(target=second_delivery)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second delivery must wait for the first one's transaction"
        conn.commit()
        thread.join(10.0)
        assert result == [False]
    finally:
        other.close()
    assert len(rows(conn)) == 1


# -- pruning --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_prune_drops_only_the_old_partitions_and_keeps_recent_rows(scratch: tuple[str, Any]) -> None:
    _, conn = scratch
    base = date(2031, 3, 10)  # a "today" of the test's own, far from the real one
    retention.prune(conn, 2, base - timedelta(days=30))  # the partitions the migration made (real days)
    retention.ensure_partitions(conn, base - timedelta(days=9))
    retention.ensure_partitions(conn, base)
    days = [base - timedelta(days=n) for n in range(10, -8, -1)]  # base-10 .. base+7
    assert day_partitions(conn) == [retention.partition_name(d) for d in days]
    ids = FrameIds(2)
    with conn.cursor() as cur:
        for day in days:
            for seq in range(3):
                assert write(
                    cur,
                    ids.for_frame(frame_at(day, seq)),
                    event_time_ms=ms_of(day) + seq,
                    received_at=noon(day),
                )
    conn.commit()

    with pytest.raises(ValueError, match="retention_days must be >= 2"):
        retention.prune(conn, 1, base)
    assert retention.prune(conn, 3, base, dry_run=True) == [retention.partition_name(d) for d in days[:7]]
    assert len(rows(conn)) == 3 * len(days)  # a dry run drops nothing
    report = retention.prune_report(conn, 3, base)
    # kept: base-3 .. base+7 (three whole days before today, today, the days ahead)
    assert report.dropped == [retention.partition_name(d) for d in days[:7]]
    assert report.cutoff == base - timedelta(days=3)
    assert (report.moved_late_rows, report.default_rows_deleted, report.busy) == (0, 0, [])
    kept = {r[3] for r in rows(conn)}
    assert kept == set(days[7:])
    assert len(rows(conn)) == 3 * len(days[7:])
    assert retention.prune(conn, 3, base) == []  # nothing more to drop
    # the shortest retention still keeps today and yesterday
    assert retention.prune(conn, 2, base) == [retention.partition_name(base - timedelta(days=3))]
    assert {r[3] for r in rows(conn)} == set(days[8:])
    assert retention.partition_name(base - timedelta(days=1)) in day_partitions(conn)


@pytest.mark.integration
def test_a_late_frame_for_a_pruned_day_is_audited_once_in_the_default_partition(
    scratch: tuple[str, Any],
) -> None:
    _, conn = scratch
    today = retention.db_today(conn)
    old_day = today - timedelta(days=40)  # no partition: dropped long ago (or never made)
    frame_id = FrameIds(2).for_frame(frame_at(old_day))
    with conn.cursor() as cur:
        assert write(cur, frame_id, event_time_ms=ms_of(old_day), received_at=noon(today))
        assert not write(
            cur, frame_id, event_time_ms=ms_of(old_day), received_at=noon(today) + timedelta(hours=5)
        )
    conn.commit()
    assert [(r[0], r[3]) for r in rows(conn)] == [(retention.DEFAULT_PARTITION, old_day)]
    # written today: the DEFAULT keeps it for retention_days after that, although its day is older
    report = retention.prune_report(conn, 30)
    assert report.default_rows_deleted == 0
    with conn.cursor() as cur:
        assert not write(cur, frame_id, event_time_ms=None, received_at=noon(today) + timedelta(days=1))
    conn.commit()
    # 30 days on, both its day and its insert are older than the cutoff: deleted
    report = retention.prune_report(conn, 30, today + timedelta(days=31))
    assert report.default_rows_deleted == 1
    assert rows(conn) == []


@pytest.mark.integration
def test_prune_keeps_a_row_written_late_into_an_old_partition(scratch: tuple[str, Any]) -> None:
    _, conn = scratch
    base = date(2031, 3, 10)
    retention.ensure_partitions(conn, base - timedelta(days=9))
    old_day = base - timedelta(days=9)
    on_time = FrameIds(2).for_frame(frame_at(old_day, 1))
    late = FrameIds(2).for_frame(frame_at(old_day, 2))
    with conn.cursor() as cur:
        assert write(cur, on_time, event_time_ms=None, received_at=noon(old_day))
        assert write(cur, late, event_time_ms=None, received_at=noon(base))
        # as the database clock would have it: the first written on its day, the second just now
        cur.execute(
            "UPDATE api_data_stream SET processed_at = %s WHERE frame_id = %s", (noon(old_day), on_time)
        )
        cur.execute("UPDATE api_data_stream SET processed_at = %s WHERE frame_id = %s", (noon(base), late))
        cur.execute("SELECT id FROM api_data_stream WHERE frame_id = %s", (late,))
        late_row_id = cur.fetchone()[0]
    conn.commit()
    report = retention.prune_report(conn, 3, base)
    assert retention.partition_name(old_day) in report.dropped
    assert report.moved_late_rows == 1
    assert rows(conn) == [(retention.DEFAULT_PARTITION, late_row_id, late, old_day)]
    with conn.cursor() as cur:  # its redelivery is still stopped
        assert not write(cur, late, event_time_ms=None, received_at=noon(base) + timedelta(days=2))
    conn.commit()
    assert retention.prune_report(conn, 3, base + timedelta(days=2)).default_rows_deleted == 0
    assert retention.prune_report(conn, 3, base + timedelta(days=4)).default_rows_deleted == 1


@pytest.mark.integration
def test_rows_waiting_in_the_default_move_into_their_days_partition(scratch: tuple[str, Any]) -> None:
    _, conn = scratch
    today = retention.db_today(conn)
    future = today + timedelta(days=20)  # an event time ahead of every partition (a clock, a hand-made frame)
    ids = FrameIds(2)
    frame_ids = [ids.for_frame(frame_at(future, seq)) for seq in range(3)]
    other_day = ids.for_frame(frame_at(future + timedelta(days=5)))
    with conn.cursor() as cur:
        for frame_id in [*frame_ids, other_day]:
            assert write(cur, frame_id, event_time_ms=None, received_at=noon(today))
    conn.commit()
    before = rows(conn)
    assert {r[0] for r in before} == {retention.DEFAULT_PARTITION}
    # PostgreSQL refuses this partition while the DEFAULT holds rows of its day: they are moved into it
    created = retention.ensure_partitions(conn, future)
    assert retention.partition_name(future) in created
    after = rows(conn)
    assert [(r[1], r[2], r[3]) for r in after] == [(r[1], r[2], r[3]) for r in before]  # same ids, same rows
    assert [r[0] for r in after] == [retention.partition_name(future)] * 3 + [
        retention.partition_name(future + timedelta(days=5))
    ]
    with conn.cursor() as cur:
        for frame_id in frame_ids:
            assert not write(cur, frame_id, event_time_ms=None, received_at=noon(future))
        assert write(cur, ids.for_frame(frame_at(future, 9)), event_time_ms=None, received_at=noon(future))
    conn.commit()
    assert len(rows(conn)) == 5


@pytest.mark.integration
def test_a_busy_table_is_left_for_the_next_run(
    scratch: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, conn = scratch
    monkeypatch.setattr(retention, "LOCK_TIMEOUT_MS", 200)
    base = date(2031, 3, 10)
    retention.prune(conn, 2, base - timedelta(days=30))
    retention.ensure_partitions(conn, base - timedelta(days=9))
    old = retention.partition_name(base - timedelta(days=9))
    with conn.cursor() as cur:
        assert write(
            cur,
            FrameIds(2).for_frame(frame_at(base - timedelta(days=9))),
            event_time_ms=None,
            received_at=noon(base),
        )
    conn.commit()
    reader = kdb.connect(url)
    try:
        with reader.cursor() as cur:  # a long report reads the table: no DROP, no new partition meanwhile
            cur.execute("SELECT count(*) FROM api_data_stream")
        report = retention.prune_report(conn, 3, base)
        assert old in report.busy and old not in report.dropped
        with pytest.raises(retention.PartitionsBusy, match="api_data_stream is busy"):
            retention.ensure_partitions(conn, base + timedelta(days=5))
        assert retention.maintain(conn, 3, base + timedelta(days=5)).created == []
    finally:
        reader.close()
    assert old in day_partitions(conn)
    assert len(rows(conn)) == 1  # nothing was lost in the rolled back attempt
    report = retention.prune_report(conn, 3, base)
    assert old in report.dropped and report.busy == []
    assert rows(conn) == []


@pytest.mark.integration
def test_a_partition_another_run_dropped_first_is_skipped(
    scratch: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, conn = scratch
    listed = retention.partitions(conn)
    ghost = retention.Partition("api_data_stream_p20000101", date(2000, 1, 1), date(2000, 1, 2))
    monkeypatch.setattr(retention, "partitions", lambda c: [ghost, *listed])  # listed, then gone
    report = retention.prune_report(conn, 30)
    assert (report.dropped, report.busy) == ([], [])


# -- the migration --------------------------------------------------------------------------------


#: Legacy rows (frame_id, event_time_ms, received_at as SQL) that cover every branch of the day rule.
LEGACY_IDS = (
    ("2-e{e_ms:013d}-0123456789abcdef01234567", "{e_ms}", "now()"),
    ("2-e{old_ms:013d}-0123456789abcdef01234567", "{old_ms}", "now()"),  # 400 days ago
    ("2-r{r_us:016d}-deadbeef-0000000001", "NULL", "now()"),
    ("rest:2:regular:8000000001:{e_ms}:FILLED", "{e_ms}", "now()"),
    ("rest:2:algo:77:{old_ms}:FINISHED", "{old_ms}", "now()"),
    ("rest:2:positions:0123456789abcdef", "{e_ms}", "now()"),
    ("rest:2:balances:0123456789abcdef", "NULL", "now() - interval '3 days'"),
    ("hand-made", "-5", "'2026-06-30 23:59:59.999+00'"),
    ("2-e99999999999999999-ab", "NULL", "'2026-07-01 00:00:00-02'"),
    ("2-e" + "1" * 25 + "-ab", "{e_ms}", "now()"),
    ("rest:2:regular:1:None:NEW", "NULL", "'1999-12-31 23:00:00-03'"),
    ("rest:2:regular:2:{e_ms}:NEW\n", "NULL", "now()"),
    ("rest:2:regular:3:{e_ms}:NEW:X", "NULL", "'2026-01-01 00:00:00+00'"),
    ("\n2-e{e_ms:013d}-ab", "NULL", "'2026-01-02 00:00:00+00'"),
    ("2-e{future_ms:013d}-ab", "NULL", "now()"),  # 30 days ahead: beyond the partitions made
)


#: Every column of the table before 0005, by id.
LEGACY_SELECT = (
    "SELECT id, frame_id, account_id, exchange, source, event_type, event_time_ms, payload::text, raw_text,"
    " received_at, processed_at, outcome, error FROM api_data_stream ORDER BY id"
)


@pytest.mark.integration
def test_the_migration_keeps_every_row_its_id_and_the_barrier(pg_admin_url: str) -> None:
    name = f"kraite_retention_{uuid.uuid4().hex[:10]}"
    url = kdb.create_database(pg_admin_url, name)
    conn = kdb.connect(url)
    try:
        with conn.cursor() as cur:  # the schema as deployed before partitioning (0004)
            cur.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, text in kdb.migrations():
                if version < "0005":
                    cur.execute(text)
                    cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            cur.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
            today: date = cur.fetchone()[0]
            values = {
                "e_ms": ms_of(today),
                "old_ms": ms_of(today - timedelta(days=400)),
                "r_us": ms_of(today - timedelta(days=1), 23) * 1000,
                "future_ms": ms_of(today + timedelta(days=30)),
            }
            for frame_id, event_time, received in LEGACY_IDS:
                cur.execute(
                    sql.SQL(
                        "INSERT INTO api_data_stream (frame_id, account_id, source, event_type, event_time_ms,"
                        " payload, received_at, outcome) VALUES (%s, 2, 'ws', 'X', {}, '{{\"a\": 1}}', {}, 'audited')"
                    ).format(sql.SQL(event_time.format(**values)), sql.SQL(received)),
                    (frame_id.format(**values),),
                )
            cur.execute("DELETE FROM api_data_stream WHERE frame_id = 'hand-made'")  # a gap in the ids
            cur.execute(
                "INSERT INTO api_data_stream (frame_id, account_id, source, event_type, event_time_ms, raw_text,"
                " received_at, outcome, error) VALUES ('hand-made', 3, 'rest', NULL, -5, 'not json',"
                " '2026-06-30 23:59:59.999+00', 'malformed', 'boom')"
            )
            cur.execute("SELECT setval('api_data_stream_id_seq', 1000)")
            cur.execute(LEGACY_SELECT)
            before = cur.fetchall()
        conn.commit()
        assert len(before) == len(LEGACY_IDS)

        assert kdb.migrate(conn) == ["0005_api_data_stream_partitions"]
        with conn.cursor() as cur:
            cur.execute(LEGACY_SELECT)
            assert cur.fetchall() == before
            # the SQL of the migration and audit.audit_day agree on every row
            cur.execute(
                "SELECT frame_id, event_time_ms, received_at, audit_day, tableoid::regclass::text FROM api_data_stream"
            )
            placed = cur.fetchall()
        conn.commit()
        for frame_id, event_time, received, day, _ in placed:
            assert day == audit.audit_day(frame_id, event_time, received), frame_id
        where = {r[0]: r[4] for r in placed}
        assert where["2-e{e_ms:013d}-0123456789abcdef01234567".format(**values)] == retention.partition_name(
            today
        )
        old = retention.partition_name(today - timedelta(days=400))
        assert where["2-e{old_ms:013d}-0123456789abcdef01234567".format(**values)] == old  # its day got one
        assert where["hand-made"] == retention.partition_name(date(2026, 6, 30))  # by received_at (UTC)
        assert where["2-e99999999999999999-ab"] == retention.partition_name(date(2026, 7, 1))
        assert where["rest:2:regular:1:None:NEW"] == retention.DEFAULT_PARTITION  # 2000-01-01: over ten years
        assert where["2-e{future_ms:013d}-ab".format(**values)] == retention.DEFAULT_PARTITION
        parts = day_partitions(conn)
        assert old in parts
        assert all(retention.partition_name(today + timedelta(days=n)) in parts for n in range(-1, 8))

        with conn.cursor() as cur:
            # the barrier holds for a frame audited before the migration
            frame_id = "2-e{e_ms:013d}-0123456789abcdef01234567".format(**values)
            assert not write(
                cur, frame_id, event_time_ms=values["e_ms"], received_at=noon(today) + timedelta(days=1)
            )
            assert not write(
                cur, "rest:2:positions:0123456789abcdef", event_time_ms=None, received_at=noon(today)
            )
            # the sequence goes on where it was (the conflicting insert above drew 1001, as it always did)
            assert write(
                cur, "2-e{e_ms:013d}-new".format(**values), event_time_ms=None, received_at=noon(today)
            )
            cur.execute("SELECT id FROM api_data_stream WHERE frame_id LIKE '%-new'")
            assert cur.fetchone()[0] == 1002
            cur.execute(
                "SELECT pg_get_serial_sequence('api_data_stream', 'id'), (SELECT count(*) FROM pg_class WHERE relname = 'api_data_stream_unpartitioned')"
            )
            assert cur.fetchone() == ("public.api_data_stream_id_seq", 0)
        conn.commit()
        # the future row moves into its partition when that day comes near
        future = today + timedelta(days=30)
        assert retention.partition_name(future) in retention.ensure_partitions(conn, future)
        assert rows(conn, future)[0][0] == retention.partition_name(future)
        with conn.cursor() as cur:  # as the tests' fixture empties it
            cur.execute("TRUNCATE api_data_stream RESTART IDENTITY CASCADE")
        conn.commit()
        with conn.cursor() as cur:
            assert write(cur, "after-truncate", event_time_ms=None, received_at=noon(today))
            cur.execute("SELECT id FROM api_data_stream")
            assert cur.fetchone()[0] == 1
        conn.commit()
    finally:
        conn.close()
        kdb.drop_database(pg_admin_url, name)


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_prune_command_prints_a_line_per_partition_and_a_summary(
    scratch: tuple[str, Any], settings: Settings
) -> None:
    url, conn = scratch
    today = retention.db_today(conn)
    old_day = today - timedelta(days=10)
    with conn.cursor() as cur:  # a partition of an old day, as an earlier run would have left it
        cur.execute(
            "CREATE TABLE api_data_stream_p_old PARTITION OF api_data_stream FOR VALUES FROM (%s) TO (%s)",
            (old_day, old_day + timedelta(days=1)),
        )
        cur.execute(
            sql.SQL("DROP TABLE {}").format(
                sql.Identifier(retention.partition_name(today + timedelta(days=7)))
            )
        )
    conn.commit()
    assert write(
        conn.cursor(), FrameIds(2).for_frame(frame_at(old_day)), event_time_ms=None, received_at=noon(old_day)
    )
    conn.commit()
    s = replace(settings, database_url=url)
    s.audit = replace(s.audit, retention_days=5)
    runner = CliRunner()

    dry = runner.invoke(prune_cmd, ["--dry-run"], obj={"settings": s})
    assert dry.exit_code == 0, dry.output
    ahead = retention.partition_name(today + timedelta(days=7))
    assert f"would create {ahead}\n" in dry.output
    assert "would drop api_data_stream_p_old\n" in dry.output
    assert dry.output.splitlines()[-1].startswith("dry run: retention 5 days")
    assert "api_data_stream_p_old" in day_partitions(conn)

    done = runner.invoke(prune_cmd, [], obj={"settings": s})
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        f"create {ahead}",
        "drop api_data_stream_p_old",
        f"retention 5 days (keeping {today - timedelta(days=5)} onwards): 1 partition(s) created, 1 dropped,"
        " 1 late row(s) kept in the default partition, 0 row(s) deleted from it",
    ]
    assert "api_data_stream_p_old" not in day_partitions(conn)
    assert ahead in day_partitions(conn)
    # the old day's row was written just now (processed_at): it stays, in the DEFAULT partition
    assert [(r[0], r[3]) for r in rows(conn)] == [(retention.DEFAULT_PARTITION, old_day)]


@pytest.mark.integration
def test_prune_command_on_a_bad_database_says_so_in_one_line(settings: Settings, database_url: str) -> None:
    runner = CliRunner()  # click >= 8.2: stderr apart from stdout
    name = f"kraite_missing_{uuid.uuid4().hex[:8]}"
    missing = kdb.with_database(database_url, name)
    result = runner.invoke(prune_cmd, [], obj={"settings": replace(settings, database_url=missing)})
    assert result.exit_code == exitcodes.EXIT_FATAL_CONFIG
    assert result.stderr.strip().splitlines() == [
        f'kraite-mp: configuration error: PostgreSQL refused database_url: database "{name}" does not exist'
    ]
    assert "Traceback" not in result.output + result.stderr
    down = runner.invoke(
        prune_cmd, [], obj={"settings": replace(settings, database_url="postgresql://postgres@127.0.0.1:9/x")}
    )
    assert down.exit_code == exitcodes.EXIT_TEMPFAIL
    assert len(down.stderr.strip().splitlines()) == 1
    assert down.stderr.startswith("kraite-mp: PostgreSQL unavailable")


@pytest.mark.e2e
def test_kraite_mp_db_prune_is_a_command(kraite_env: dict[str, str]) -> None:
    """`kraite-mp db prune` as an operator runs it (the session's migrated database; --dry-run changes nothing)."""
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "kraite_mp", "db", "--help"],
        env=kraite_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "prune" in listed.stdout and "migrate" in listed.stdout, listed.stdout
    dry = subprocess.run(
        [sys.executable, "-m", "kraite_mp", "db", "prune", "--dry-run"],
        env=kraite_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1].startswith("dry run: retention 30 days (keeping "), dry.stdout
    assert "Traceback" not in dry.stdout + dry.stderr


# -- the size of a day ----------------------------------------------------------------------------


@pytest.mark.integration
def test_the_documented_size_of_an_audit_row_holds(scratch: tuple[str, Any]) -> None:
    """docs/RETENTION.md: 819 B per streamed frame (10,000 rows), heap + TOAST + the three indexes."""
    _, conn = scratch
    today = retention.db_today(conn)
    frames = session_frames()
    ids = FrameIds(2)
    count = 2000
    with conn.cursor() as cur:
        for n in range(count):
            payload = json.loads(frames[n % len(frames)])
            payload["E"] = ms_of(today, 0) + n * 1000  # one a second, all of one day
            text = json.dumps(payload, separators=(",", ":"))
            audit.write(
                cur,
                frame_id=ids.for_frame(text),
                account_id=2,
                source="ws",
                event_type=payload["e"],
                event_time_ms=payload["E"],
                payload_text=text,
                received_at=noon(today),
                outcome="dispatched",
                error=None,
            )
        conn.commit()
        cur.execute(
            "SELECT count(*), pg_total_relation_size(%s) FROM api_data_stream",
            (retention.partition_name(today),),
        )
        rows_in, total = cur.fetchone()
    conn.commit()
    assert rows_in == count
    per_row = total / count
    assert 300 < per_row < 1600, per_row
