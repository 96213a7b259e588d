"""The periodic sync: every ``supervisor.sync_interval_s`` the supervisor starts a one-shot ``sync-orders``
child (REST only; in a fleet, on the mark-price leader alone), never two at once, and stops one that runs
longer than ``supervisor.sync_timeout_s``."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from kraite_mp.supervisor.process import AfterStop, Child, ChildState
from kraite_mp.supervisor.runfiles import ROLE_SYNC

if TYPE_CHECKING:
    from kraite_mp.supervisor.arbiter import Arbiter

log = logging.getLogger(__name__)


class PeriodicSync:
    """The ``Arbiter``'s sync schedule; the child itself is one of the arbiter's children."""

    def __init__(self, arbiter: Arbiter, now: float) -> None:
        self.arbiter = arbiter
        self.next_at = now + arbiter.settings.supervisor.sync_interval_s

    def wake_at(self) -> float:
        """When the loop must wake next for the sync: its next start, or the running one's timeout."""
        sup = self.arbiter.settings.supervisor
        wake = self.next_at if sup.sync_interval_s > 0 else math.inf
        child = self.arbiter.children.get(ROLE_SYNC)
        if child is not None and child.pid is not None and child.state != ChildState.STOPPING:
            wake = min(wake, child.spawned_at + sup.sync_timeout_s)
        return wake

    def reschedule(self) -> None:
        """After a reload: a shorter interval counts from now, a longer one from the next sync."""
        self.next_at = min(self.next_at, time.monotonic() + self.arbiter.settings.supervisor.sync_interval_s)

    def maybe_start(self, now: float) -> None:
        arb = self.arbiter
        sup = arb.settings.supervisor
        child = arb.children.get(ROLE_SYNC)
        if child is not None and child.pid is not None and child.state != ChildState.STOPPING:
            if now - child.spawned_at > sup.sync_timeout_s:
                timeout_s = sup.sync_timeout_s
                log.warning(
                    "%s pid=%s still running after %.0fs: stopping it", child.label, child.pid, timeout_s
                )
                arb.stop_child(child, AfterStop.EXIT, "sync timeout")
        if sup.sync_interval_s <= 0 or now < self.next_at:
            return
        self.next_at = now + sup.sync_interval_s
        if arb.fleet is not None and not arb.fleet.view.lead_mark_price:
            # one periodic sync per fleet: the mark-price leader's. A host that takes the lead (its leader
            # died) syncs one interval later, not at once (its schedule ran on meanwhile): the streams it
            # takes over come first (each reconnect reconciles its own account)
            return
        if ROLE_SYNC not in arb.targets:
            return
        if child is not None and child.pid is not None:
            msg = "%s pid=%s from the previous interval is still running: not starting another"
            log.warning(msg, child.label, child.pid)
            return
        if child is None:
            child = arb.children[ROLE_SYNC] = Child(key=ROLE_SYNC, role=ROLE_SYNC, one_shot=True)
        arb.spawn(child)  # REST only, no WebSocket: not paced by the spawn bucket
