"""A spool on a disk that fills up: no torn record, no lost frame, no crash loop, write-ahead resumes.

The spool is a real tmpfs of 256 KiB (mounted by the test, as root; skipped, saying so, where mount is
refused), filled by records that Redis accepted but no worker acknowledged, which the spool must keep.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.userdata_helpers import (
    ALL_DISPATCH_KEYS,
    add_sim_accounts,
    audit_count,
    run_scenario,
    running_worker,
)
from support import wait_for
from test_userdata import setup_factory, spool_acked, wait_streaming  # noqa: F401 - a fixture

from kraite_mp.streams.spool import Spool

TMPFS_SIZE = "256k"


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def grow(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


@pytest.mark.integration
def test_full_disk_keeps_order_in_memory_and_resumes_write_ahead(tiny_disk: Path) -> None:
    records = [f"record-{i:05d}-".encode() + b"x" * 1000 for i in range(600)]  # ~600 KiB > 256 KiB
    read: list[bytes] = []
    with Spool(
        str(tiny_disk / "1"), segment_bytes=32 * 1024, ack_required=True, memory_limit=1000
    ).open() as spool:
        for rec in records[:400]:
            spool.append(rec)
        assert spool.in_memory and spool.memory_episodes == 1  # the disk filled up, nothing raised
        read += [r.data for r in spool.read(1000, timeout=0)]  # disk first ...
        read += [r.data for r in spool.read(1000, timeout=0)]  # ... then what waited in memory
        assert read == records[:400]  # whole records, in order: no torn line where the disk filled
        grow(tiny_disk, "4m")
        spool.append(records[400])  # the memory queue is sent: write-ahead again
        assert not spool.in_memory
        for rec in records[401:]:
            spool.append(rec)
        assert not spool.in_memory
        read += [r.data for r in spool.read(1000, timeout=0)]
    assert read == records


@pytest.mark.integration
def test_memory_queue_is_bounded(tiny_disk: Path) -> None:
    with Spool(str(tiny_disk / "2"), ack_required=True, memory_limit=5).open() as spool:
        with pytest.raises(Exception, match="already wait in memory"):
            for i in range(400):
                spool.append(b"y" * 1000 + str(i).encode())
        assert spool.in_memory


@pytest.mark.e2e
def test_child_on_a_full_spool_disk_loses_no_frame_and_never_crash_loops(
    db: Any,
    secret_key: str,
    setup_factory: Any,  # noqa: F811 - the fixture imported above
    simulator: Any,
    tiny_disk: Path,
) -> None:
    setup = setup_factory(
        simulator,
        KRAITE__user_data_stream__spool_dir=str(tiny_disk),
        KRAITE__user_data_stream__spool_segment_bytes="32768",
        KRAITE__user_data_stream__spool_max_bytes="1048576",
        user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS,
    )
    (account,) = add_sim_accounts(db, secret_key, simulator, 1)
    child = setup.start_child(account.id)
    wait_streaming(setup, simulator, account)
    # no worker: Redis takes every frame, nobody acknowledges, the spool keeps them all and fills the disk
    steps = 0
    while "frames wait in memory" not in setup.logs() and steps < 3000:
        run_scenario(simulator, account.api_key, steps=50)
        steps += 50
        wait_for(lambda: "backlog=0" in setup.title(account.id), 30, message="frames sent to Redis")
    assert "frames wait in memory" in setup.logs(), "the 256 KiB spool never filled"
    wait_for(lambda: "spool=memory" in setup.title(account.id), 10, message="the title shows it")
    run_scenario(simulator, account.api_key, steps=50)  # more while the disk is full
    assert child.poll() is None  # no crash (loop) on a full disk
    with running_worker(setup.broker, threads=8):
        total = int(simulator.stats()["frames_sent"][account.api_key])
        wait_for(lambda: audit_count(db, account.id) == total, 90, message="every frame audited")
        # acknowledged segments are deleted: the disk has room again and write-ahead resumes
        run_scenario(simulator, account.api_key, steps=20)
        wait_for(lambda: "write-ahead resumes" in setup.logs(), 60, message="write-ahead resumed")
        total = int(simulator.stats()["frames_sent"][account.api_key])
        wait_for(lambda: audit_count(db, account.id) == total, 60, message="every frame audited, again")
        wait_for(lambda: spool_acked(os.path.join(str(tiny_disk), str(account.id))), 30, message="all acked")
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT frame_id) FROM api_data_stream WHERE account_id = %s"
            " AND source = 'ws'",
            (account.id,),
        )
        assert cur.fetchone() == (total, total)
    assert child.poll() is None
    assert "spool=disk" in setup.title(account.id)
