"""What every client of one Binance base URL shares inside this process: the block in force after a
429/418, the last X-MBX-USED-WEIGHT-1M reading and the server-time offset.

It is the fast path in front of the egress's shared budget (``kraite_mp.binance.budget``): a block
seen once is remembered here, so a refused call costs no Redis round trip while the block lasts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kraite_mp.binance.budget import reset_budgets


@dataclass
class HostState:
    """What all clients of one base URL (one IP's limits) share in this process."""

    #: ``time.monotonic()`` before which no request may be sent (after a 429/418), 0 = none.
    blocked_until: float = 0.0
    #: 429 or 418: what caused ``blocked_until``.
    blocked_status: int = 0
    #: Last X-MBX-USED-WEIGHT-1M seen, and the (server-clock) minute it was seen in.
    used_weight: int = 0
    used_weight_minute: int = -1
    #: Server time minus local time, ms; re-measured on -1021.
    time_offset_ms: int = 0


_hosts: dict[str, HostState] = {}
_hosts_lock = threading.Lock()


def host_state(base_url: str) -> HostState:
    """The shared rate-limit/ban/clock state of a base URL."""
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
