"""What every client of one Binance base URL shares inside this process: the last X-MBX-USED-WEIGHT-1M
reading and the server-time offset. A 429/418 block lives in the egress budget
(``kraite_mp.binance.budget``), which every process shares.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kraite_mp.binance.budget import reset_budgets


@dataclass
class HostState:
    """What all clients of one base URL (one IP's limits) share in this process."""

    #: Last X-MBX-USED-WEIGHT-1M seen, and the (server-clock) minute it was seen in.
    used_weight: int = 0
    used_weight_minute: int = -1
    #: Server time minus local time, ms; re-measured on -1021.
    time_offset_ms: int = 0


_hosts: dict[str, HostState] = {}
_hosts_lock = threading.Lock()


def host_state(base_url: str) -> HostState:
    """The shared used-weight and clock state of a base URL."""
    with _hosts_lock:
        state = _hosts.get(base_url)
        if state is None:
            state = _hosts[base_url] = HostState()
        return state


def reset_host_state(base_url: str | None = None) -> None:
    """Forget bans, weights and clock offsets (tests; ``None`` = every host), and this process's budget
    objects (what Redis holds stays: each simulator is its own host, so its own budget)."""
    with _hosts_lock:
        if base_url is None:
            _hosts.clear()
        else:
            _hosts.pop(base_url, None)
    reset_budgets()
