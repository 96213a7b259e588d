"""The children's heartbeat files, as the supervisor reads them: how often it looks, which live child
it stops for a stale file, and which new beats it relays to the status reporters that publish for the
children (``RedisStatus(relay_children=True)``). What one file means is ``process.check_heartbeat``'s."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kraite_mp.supervisor import process, runfiles
from kraite_mp.supervisor.process import AfterStop, Child, ChildState

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.supervisor.ownership import StopChild
    from kraite_mp.supervisor.publish import Reporters

#: Heartbeat files are checked every heartbeat_timeout_s / this, within the bounds below.
CHECKS_PER_TIMEOUT = 10
CHECK_MIN_S = 0.2
CHECK_MAX_S = 5.0


def next_check_at(settings: Settings, now: float) -> float:
    interval = settings.supervisor.heartbeat_timeout_s / CHECKS_PER_TIMEOUT
    return now + min(CHECK_MAX_S, max(CHECK_MIN_S, interval))


def check(
    pids: Mapping[int, Child], settings: Settings, reporters: Reporters, now: float, stop_child: StopChild
) -> None:
    """Stop the live children whose heartbeat went stale, then relay the beats written since the last
    check."""
    timeout_s = settings.supervisor.heartbeat_timeout_s
    wall = time.time()
    for child in list(pids.values()):
        if child.state in (ChildState.STARTING, ChildState.RUNNING) and process.check_heartbeat(
            child, settings.run_dir, now, wall, timeout_s
        ):
            stop_child(child, AfterStop.BACKOFF, "heartbeat stale")
    if reporters.relays_child_beats:
        _relay_beats(pids, settings, reporters)


def _relay_beats(pids: Mapping[int, Child], settings: Settings, reporters: Reporters) -> None:
    """Hand the new heartbeats to the status reporters, all at once: the children publish nothing
    themselves."""
    run_dir = settings.run_dir
    found = (process.unrelayed_beat(c, run_dir, c.pid, c.heartbeat_mtime) for c in pids.values())
    beats = [beat for beat in found if beat is not None]
    if beats:
        reporters.on_child_beats(settings, beats)


def relay_last_beat(child: Child, pid: int, settings: Settings, reporters: Reporters) -> None:
    """A child's last words (``fatal`` and its error, ``stopped``) may come after the last check: relay them
    as it is reaped (when the reporters relay the children's beats)."""
    if not reporters.relays_child_beats:
        return
    run_dir = settings.run_dir
    mtime = process.heartbeat_mtime(runfiles.heartbeat_path(run_dir, child.key))
    beat = process.unrelayed_beat(child, run_dir, pid, mtime)
    if beat is not None:
        reporters.on_child_beats(settings, [beat])
