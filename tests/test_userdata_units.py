"""Pure units of the user-data path: the durable spool, frame ids, records (frame parsing: test_binance_user.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kraite_mp.config.load import load_settings
from kraite_mp.messages import FrameIds, frame_record, reconcile_record, record_message
from kraite_mp.streams.spool import Spool
from kraite_mp.streams.spool_files import CURSOR_PERSIST_S, segment_name
from kraite_mp.streams.userdata import stream_url

pytestmark = pytest.mark.unit


def drain(spool: Spool) -> list[bytes]:
    out = []
    while True:
        records = spool.read(1000, timeout=0)
        if not records:
            return out
        spool.commit(records[-1], len(records))
        out += [r.data for r in records]


def test_spool_keeps_order_and_counts_backlog(tmp_path: Path) -> None:
    with Spool(str(tmp_path)).open() as spool:
        for i in range(100):
            spool.append(f"r{i}".encode())
        assert spool.backlog == 100
        first = spool.read(10, timeout=0)
        assert [r.data for r in first] == [f"r{i}".encode() for i in range(10)]
        spool.commit(first[-1], len(first))
        assert spool.backlog == 90
        assert drain(spool) == [f"r{i}".encode() for i in range(10, 100)]
        assert spool.backlog == 0


def test_spool_survives_restart_without_the_sent_records(tmp_path: Path) -> None:
    with Spool(str(tmp_path)).open() as spool:
        for i in range(10):
            spool.append(f"a{i}".encode())
        records = spool.read(4, timeout=0)
        spool.commit(records[-1], 4)
        spool.read(3, timeout=0)  # read but never committed (the process died mid-send): sent again
    with Spool(str(tmp_path)).open() as spool:
        assert spool.backlog == 6
        spool.append(b"b0")
        assert drain(spool) == [f"a{i}".encode() for i in range(4, 10)] + [b"b0"]
    with Spool(str(tmp_path)).open() as spool:
        assert spool.backlog == 0 and drain(spool) == []


def test_sent_cursor_is_written_at_most_once_per_interval_and_on_close(tmp_path: Path) -> None:
    """Records flowing: the first commit writes the cursor file, the next ones within ``CURSOR_PERSIST_S``
    only move it in memory; a process killed then re-sends just those (never loses one); once due, or at
    ``persist_cursor``/``close``, the file holds the last commit and a new run re-sends nothing."""

    def on_disk() -> int:
        with Spool(str(tmp_path)).open() as again:  # what a restarted child would send first
            return again.backlog

    with Spool(str(tmp_path)).open() as spool:
        for i in range(10):
            spool.append(f"a{i}".encode())
        for _ in range(5):  # five sends, each of one record, in quick succession
            (rec,) = spool.read(1, timeout=0)
            spool.commit(rec, 1)
        assert spool.backlog == 5 and spool.cursor_pending
        assert 0 < spool.cursor_due_in() <= CURSOR_PERSIST_S
        assert on_disk() == 9  # a crash now re-sends the 4 commits after the first write, loses nothing
        spool.persist_cursor(due_only=True)  # not due yet: still one write for the five commits
        assert on_disk() == 9 and spool.cursor_pending
        spool.persist_cursor()
        assert on_disk() == 5 and not spool.cursor_pending
        (rec,) = spool.read(1, timeout=0)
        spool.commit(rec, 1)  # the last write was just now: deferred
        assert on_disk() == 5
        spool.files._cursor_written_at -= CURSOR_PERSIST_S  # the interval has passed
        (rec,) = spool.read(1, timeout=0)
        spool.commit(rec, 1)  # due: written at once
        assert on_disk() == 3 and not spool.cursor_pending
        (rec,) = spool.read(1, timeout=0)
        spool.commit(rec, 1)
        assert on_disk() == 3
    assert on_disk() == 2  # close wrote the last commit


def test_runs_that_spool_nothing_leave_no_empty_segment_each(tmp_path: Path) -> None:
    """An account FATAL at every retry opens and closes its spool each time (288 times a day): the
    empty last segment is reused, not one more left per run; a run that spooled something gets a new one."""

    def segment_files() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".seg"))

    for acked in (False, True):
        for _ in range(5):
            with Spool(str(tmp_path), ack_required=acked).open():
                pass
        assert len(segment_files()) == 1, segment_files()
    with Spool(str(tmp_path), ack_required=True).open() as spool:
        spool.append(b"kept")
    with Spool(str(tmp_path), ack_required=True).open() as spool:
        assert len(segment_files()) == 2 and spool.backlog == 1
        assert drain(spool) == [b"kept"]


def test_spool_drops_a_torn_last_record_of_a_dead_writer(tmp_path: Path) -> None:
    with Spool(str(tmp_path)).open() as spool:
        spool.append(b"whole")
    seg = sorted(p for p in os.listdir(tmp_path) if p.endswith(".seg"))[-1]
    with open(tmp_path / seg, "ab") as f:
        f.write(b'{"half a rec')  # the writer was killed in the middle of a write
    with Spool(str(tmp_path)).open() as spool:
        spool.append(b"after")
        assert drain(spool) == [b"whole", b"after"]
        assert spool.dropped == 1


def test_spool_rotates_and_removes_drained_segments(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=100).open() as spool:
        for i in range(50):
            spool.append(b"x" * 30 + str(i).encode())
        assert len([p for p in os.listdir(tmp_path) if p.endswith(".seg")]) > 10
        got = drain(spool)
        assert len(got) == 50 and got[-1].endswith(b"49")
        # only the active segment is left once everything is sent
        assert [p for p in os.listdir(tmp_path) if p.endswith(".seg")] == [segment_name(spool._active)]
        assert spool.disk_bytes() < 200


def test_spool_big_record_and_concurrent_reader(tmp_path: Path) -> None:
    big = b"y" * (3 * 1024 * 1024)
    got: list[bytes] = []
    with Spool(str(tmp_path)).open() as spool:

        def reader() -> None:
            while len(got) < 2001:
                records = spool.read(100, timeout=5)
                if not records:
                    return
                spool.commit(records[-1], len(records))
                got.extend(r.data for r in records)

        t = threading.Thread(target=reader)
        t.start()
        for i in range(1000):
            spool.append(str(i).encode())
        spool.append(big)
        for i in range(1000, 2000):
            spool.append(str(i).encode())
        t.join(30)
    assert got[:1000] == [str(i).encode() for i in range(1000)]
    assert got[1000] == big
    assert got[1001:] == [str(i).encode() for i in range(1000, 2000)]


def test_spool_read_waits_for_the_writer(tmp_path: Path) -> None:
    with Spool(str(tmp_path)).open() as spool:
        assert spool.read(10, timeout=0.05) == []
        timer = threading.Timer(0.1, spool.append, args=(b"late",))
        timer.start()
        records = spool.read(10, timeout=10)
        timer.join()
        assert [r.data for r in records] == [b"late"]


def test_frame_ids_unique_and_time_ordered() -> None:
    ids = FrameIds(7)
    made = [ids.next() for _ in range(1000)]
    assert len(set(made)) == 1000 and made == sorted(made)
    assert all(i.startswith("7-") for i in made)
    assert FrameIds(7).next(123) != FrameIds(7).next(123)  # two runs never collide


def test_records_round_trip_and_url(tmp_path: Path) -> None:
    msg = record_message(frame_record("user-data-stream", 3, '{"e":"X"}', "3-1", 1.5e12))
    assert (msg.queue_name, msg.actor_name, msg.args) == ("user-data-stream", "process_user_data_event", ())
    assert msg.kwargs == {"account_id": 3, "frame": '{"e":"X"}', "frame_id": "3-1", "received_at": 1.5e12}
    rec = record_message(reconcile_record(3, "connect"))
    assert (rec.queue_name, rec.actor_name, rec.kwargs) == (
        "reconcile",
        "reconcile_account_job",
        {"account_id": 3, "reason": "connect"},
    )
    with pytest.raises(ValueError):
        record_message(b"garbage")
    settings = load_settings(None, environ={"KRAITE_BINANCE_WS_URL": "ws://127.0.0.1:9"})
    url = stream_url(settings, "KEY")
    assert url.startswith("ws://127.0.0.1:9/private/ws?listenKey=KEY&events=ORDER_TRADE_UPDATE/")
    assert "/ALGO_UPDATE/" in url and url.endswith("/listenKeyExpired")


def _segment_files(path: Path) -> list[str]:
    return sorted(p for p in os.listdir(path) if p.endswith(".seg"))


def test_acknowledged_spool_keeps_sent_records_until_acked_and_replays_them(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=64, ack_required=True).open() as spool:
        for i in range(10):
            spool.append(f"record-{i:02d}-".encode() * 2)
        records = spool.read(100, timeout=0)
        assert len(records) == 10
        spool.commit(records[-1], 10, "epoch-a")
        assert spool.backlog == 0
        assert len(_segment_files(tmp_path)) > 2  # sent is not enough: all kept
        spool.ack(records[4].position)
        kept = _segment_files(tmp_path)
        assert all(int(name[:12]) >= records[4].segment for name in kept)
        assert spool.rewind() == 5  # a broker that lost its data: the unacknowledged five again
        assert [r.data for r in spool.read(100, timeout=0)] == [r.data for r in records[5:]]
    # a new run starts reading at the acknowledged position and knows what it sent, and to whom
    with Spool(str(tmp_path), segment_bytes=64, ack_required=True).open() as spool:
        assert spool.sent_epoch == "epoch-a"
        assert spool.sent_position == records[-1].position
        assert spool.acked_position == records[4].position
        assert [r.data for r in spool.read(100, timeout=0)] == [r.data for r in records[5:]]
        spool_id = spool.spool_id
    with Spool(str(tmp_path), ack_required=True).open() as spool:
        assert spool.spool_id == spool_id and len(spool_id) == 16


def test_retention_gives_up_only_sent_segments(tmp_path: Path) -> None:
    with Spool(str(tmp_path), segment_bytes=100, ack_required=True, max_bytes=250).open() as spool:
        for i in range(20):
            spool.append(b"y" * 40 + str(i).encode())
        assert spool.over_retention()
        assert spool.give_up_oldest() is None  # nothing sent yet: unsent records are never given up
        records = spool.read(100, timeout=0)
        spool.commit(records[9], 10)
        while spool.over_retention() and spool.give_up_oldest() is not None:
            pass
        assert spool.acked_position <= spool.sent_position
        assert spool.give_up_oldest() is None  # stops where the sent records end
        assert spool.backlog == 10  # the unsent half is all there
        remaining = {r.data for r in records[10:]}
        spool.rewind()
        assert remaining <= {r.data for r in spool.read(100, timeout=0)}


def test_idle_acknowledged_spool_deletes_its_last_segment_after_its_age(tmp_path: Path) -> None:
    with Spool(str(tmp_path), ack_required=True, segment_max_age_s=0.05).open() as spool:
        spool.append(b"only")
        assert not spool.expire_idle()  # not acknowledged: kept whatever its age
        (rec,) = spool.read(10, timeout=0)
        spool.commit(rec, 1)
        spool.ack(rec.position)
        deadline = time.monotonic() + 5
        while not spool.expire_idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool.disk_bytes() == 0  # the acknowledged frame is gone once its segment is old
        spool.append(b"next")
        assert [r.data for r in spool.read(10, timeout=0)] == [b"next"]
    with Spool(str(tmp_path), ack_required=True).open() as spool:  # and a new run sends only that one
        assert [r.data for r in spool.read(10, timeout=0)] == [b"next"]


def test_frame_identity_comes_from_the_content() -> None:
    frame = '{"e":"ORDER_TRADE_UPDATE","E":1796133037082,"T":1,"o":{"s":"BTCUSDT"}}'
    a, b = FrameIds(7), FrameIds(7)
    assert a.for_frame(frame, 1) == b.for_frame(frame, 999)  # two connections, two hosts: one id
    assert a.for_frame(frame).startswith("7-e1796133037082-")
    assert a.for_frame(frame.replace('"T":1', '"T":2')) != a.for_frame(frame)
    assert FrameIds(8).for_frame(frame) != a.for_frame(frame)  # the account is part of it
    assert a.for_frame(frame.replace("1796133037082", '"1796133037082"')).startswith("7-e1796133037082-")
    wrapped = '{"stream":"k","data":{"e":"X","E":5}}'
    assert a.for_frame(wrapped).startswith("7-e0000000000005-")
    junk = "not json"
    assert a.for_frame(junk, 5) != a.for_frame(junk, 5)  # no identity: every copy is its own frame
    assert a.for_frame(junk, 5).startswith("7-r")
