"""Which sweep runs: ``auto`` resolved (``choose_mode``) and the sweep after a reconnect (``mode_for_gap``).

A full sweep is due every ``supervisor.sync_full_interval_s``, and whenever this host's user-data child
for the account may have missed frames since the last one (its heartbeat is stale, not streaming, or it
restarted since). A child reconnecting for no longer than ``supervisor.gap_sweep_max_s`` gets targeted:
the gap sweep its reconnect queues reads what the gap hid.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings

#: The sweeps ``reconcile_account`` can run (``auto`` picks full or targeted).
MODES = ("full", "targeted", "gap", "history", "auto")
#: The modes a person may ask for (``sync-orders --mode``): ``gap`` and ``history`` need the gap's start,
#: which only a reconnecting stream knows.
OPERATOR_MODES = ("full", "targeted", "auto")
#: The heartbeat state of a user-data child whose connection is up and delivering.
STREAMING_STATE = "streaming"
#: ... and those of one between connections (``kraite_mp.streams.connection``): its reconnect queues a sweep.
RECONNECTING_STATES = frozenset({"paced", "backoff", "connecting"})


def _fresh_heartbeat(settings: Settings, account_id: int) -> tuple[dict[str, Any], float] | None:
    """This host's user-data child's heartbeat for the account and the child's start (epoch s), None when
    it is missing, unreadable or stale (older than ``supervisor.heartbeat_timeout_s``)."""
    key = runfiles.child_key(runfiles.ROLE_USER_DATA, account_id)
    hb = runfiles.read_heartbeat(runfiles.heartbeat_path(settings.run_dir, key))
    if not hb:
        return None
    try:
        ts, started = float(hb["ts"]), float(hb["started"])
    except (KeyError, TypeError, ValueError):
        return None
    if time.time() - ts > settings.supervisor.heartbeat_timeout_s:
        return None
    return dict(hb), started


def _continuous_since(fresh: tuple[dict[str, Any], float] | None, since_ms: int) -> bool:
    """Has this host's user-data child for the account (its ``_fresh_heartbeat``) been alive since
    ``since_ms``?

    False when its heartbeat is missing, stale (older than ``supervisor.heartbeat_timeout_s``), not
    ``streaming`` (connecting, in backoff, fatal: frames are being lost right now), or the child
    started after ``since_ms``: it restarted, so frames may be lost in between.
    """
    if fresh is None or fresh[0].get("state") != STREAMING_STATE:
        return False
    return fresh[1] * 1000 <= since_ms


def _dark_for_s(fresh: tuple[dict[str, Any], float] | None) -> float | None:
    """Seconds the child of this heartbeat (``_fresh_heartbeat``) has been reconnecting
    (``RECONNECTING_STATES``, the heartbeat's ``dark_since``); None when it is streaming, gone, stale or in
    another state."""
    if fresh is None or fresh[0].get("state") not in RECONNECTING_STATES:
        return None
    fields = fresh[0].get("fields")
    try:
        dark_since = float(fields["dark_since"]) if isinstance(fields, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
    return None if dark_since is None else max(0.0, time.time() - dark_since)


def choose_mode(settings: Settings, account_id: int, now_ms: int | None = None) -> str:
    """``auto`` resolved: full when one is due or the stream may have missed frames, else targeted.

    A stream reconnecting for no longer than ``supervisor.gap_sweep_max_s`` gets targeted: the sweep its
    reconnect queues reads what the gap hid (the gap sweep), and a full sweep now would only do it twice (after
    a mass drop, for every account still waiting for a connection token)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    last = runfiles.last_full_sweep_ms(settings.run_dir, account_id)
    if last is None or now_ms - last >= settings.supervisor.sync_full_interval_s * 1000:
        return "full"
    fresh = _fresh_heartbeat(settings, account_id)
    dark_s = _dark_for_s(fresh)
    if dark_s is not None and dark_s <= settings.supervisor.gap_sweep_max_s:
        return "targeted"
    if not _continuous_since(fresh, last):
        return "full"
    return "targeted"


def mode_for_gap(settings: Settings, gap_start_ms: int | None, now_ms: int | None = None) -> str:
    """The sweep after a reconnect: ``gap`` for a known gap up to ``supervisor.gap_sweep_max_s`` long
    (0: never), else ``full`` (the gap is unknown, or so long that only a full sweep is sure)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    max_ms = settings.supervisor.gap_sweep_max_s * 1000
    if gap_start_ms is None or max_ms <= 0 or not 0 <= now_ms - gap_start_ms <= max_ms:
        return "full"
    return "gap"
