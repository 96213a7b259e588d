"""Pure units of the user-data path: the durable spool, frame ids, records (frame parsing: test_binance_user.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kraite_mp.config import load_settings
from kraite_mp.messages import FrameIds, frame_record, reconcile_record, record_message
from kraite_mp.streams.spool import Spool, segment_name
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
