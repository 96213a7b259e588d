"""What the supervisor says about itself: its process title and its status snapshot (the run_dir's status
file and the status hooks' ``on_snapshot``). Both are rewritten at most once a second, and only when
something changed; the snapshot also every few seconds, so that a reader sees a fresh ``ts``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kraite_mp.supervisor import runfiles
from kraite_mp.supervisor.context import set_process_title

if TYPE_CHECKING:
    from kraite_mp.supervisor.arbiter import Arbiter

log = logging.getLogger(__name__)

#: Title and status file are rewritten at most this often.
STATUS_INTERVAL_S = 1.0
#: ... and at least this often, so that a reader sees a fresh ``ts`` from a live supervisor.
STATUS_IDLE_INTERVAL_S = 5.0


class StatusReport:
    """The ``Arbiter``'s title and snapshot, read off the arbiter each time they are written."""

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        #: Something the snapshot shows changed (a child flags its own changes: ``Child.dirty``).
        self.dirty = True
        self._last_title: str | None = None
        self._title_at = 0.0
        self._written_at = 0.0

    def title(self) -> str:
        arb = self.arbiter
        counts = f"accounts={arb.accounts_count} children={len(arb.pids)} restarts={arb.restarts}"
        return f"kraite-mp: supervisor {counts}" + (" stopping" if arb.stopping else "")

    def update_title(self, force: bool = False) -> None:
        title = self.title()
        if force or title != self._last_title:
            now = time.monotonic()
            if force or now - self._title_at >= STATUS_INTERVAL_S:
                self._title_at = now
                self._last_title = title
                set_process_title(title)

    def snapshot(self) -> runfiles.Snapshot:
        arb = self.arbiter
        mono, wall = time.monotonic(), time.time()
        children = [c.snapshot(mono, wall) for c in arb.children.values()]
        server = arb.forker.server
        return {
            "pid": arb.pid,
            "state": "stopping" if arb.stopping else "running",
            "started": round(arb.started_wall, 3),
            "ts": round(wall, 3),
            "accounts": arb.accounts_count,
            "children_alive": len(arb.pids),
            "restarts": arb.restarts,
            "children": children,
            "fork_server_pid": server.pid if server is not None else None,
        }

    def write(self, force: bool = False) -> None:
        arb = self.arbiter
        now = time.monotonic()
        age = now - self._written_at
        dirty = self.dirty or any(c.dirty for c in arb.children.values())
        if not force and (age < STATUS_INTERVAL_S or (not dirty and age < STATUS_IDLE_INTERVAL_S)):
            return
        self._written_at = now
        self.dirty = False
        for c in arb.children.values():
            c.dirty = False
        data = self.snapshot()
        if force and not arb.pids and arb.stopping:
            data["state"] = "stopped"
        arb.reporters.on_snapshot(arb.settings, data, force=force)
        try:
            runfiles.write_snapshot(arb.settings.run_dir, data)
        except OSError as e:
            log.warning("cannot write %s: %s", runfiles.status_path(arb.settings.run_dir), e)
