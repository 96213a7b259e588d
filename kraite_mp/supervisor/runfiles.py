"""The run_dir contract between the supervisor, its children and the operator commands.

Layout: ``<run_dir>/heartbeats/<key>.json`` (one per child, written by the child),
``<run_dir>/supervisor.json`` (the supervisor's snapshot) and ``<run_dir>/supervisor.lock`` (one
supervisor per run_dir). Every JSON file is replaced atomically, so a reader sees a whole record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from typing import Any, TypedDict, cast

log = logging.getLogger(__name__)

#: The children's roles: the first part of their keys and process titles.
ROLE_USER_DATA = "user-data"
ROLE_MARK_PRICE = "mark-price"
ROLE_SYNC = "sync-orders"
ROLE_METRICS = "metrics"

#: Heartbeat files live in this folder of the run_dir.
HEARTBEATS_DIR = "heartbeats"
#: The supervisor's snapshot, rewritten at most once a second.
STATUS_FILE = "supervisor.json"
#: Held (flock) by the running supervisor; holds its pid.
LOCK_FILE = "supervisor.lock"
#: One file per account: when this host last completed a full reconciliation sweep of it.
RECONCILE_DIR = "reconcile"


class Heartbeat(TypedDict):
    """A child's heartbeat file: the parent reads ``pid``, ``state`` and ``error``."""

    key: str
    role: str
    account_id: int | None
    account_name: str | None
    pid: int
    #: The child's own state: "starting", "connecting", "streaming", "backoff", "fatal", ...
    state: str
    #: time.time() of this write, and of the child's start (after the fork).
    ts: float
    started: float
    #: Role-specific counters shown in the title (user-data: frames, last, backlog; mark-price:
    #: symbols, rows, ticks, last_write_ms, skipped; sync-orders: accounts, weight, ...).
    fields: dict[str, Any]
    #: Why the child failed (redacted), for the supervisor's FATAL reason and ``kraite-mp status``.
    error: str | None


class ChildSnapshot(TypedDict):
    """One child in the supervisor's snapshot."""

    key: str
    role: str
    account_id: int | None
    account_name: str | None
    pid: int | None
    #: A supervisor ChildState value: "PENDING", "STARTING", "RUNNING", "BACKOFF", ...
    state: str
    started_at: float | None
    spawns: int
    restarts: int
    attempt: int
    last_exit: str | None
    last_exit_code: int | None
    last_exit_at: float | None
    backoff_s: float | None
    backoff_until: float | None
    fatal_reason: str | None


class Snapshot(TypedDict):
    """``supervisor.json``: what the supervisor knows about itself and every child."""

    pid: int
    #: "running", "stopping", or "stopped" (the last write of a clean shutdown).
    state: str
    started: float
    ts: float
    accounts: int
    children_alive: int
    restarts: int
    children: list[ChildSnapshot]
    #: The fork server's pid (supervisor.fork_server), None when the supervisor forks its children itself.
    fork_server_pid: int | None


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this run_dir's lock."""


def child_key(role: str, account_id: int | None = None) -> str:
    """A child's name in files, titles and Redis: ``user-data-7``, ``mark-price``, ``sync-orders``."""
    return role if account_id is None else f"{role}-{account_id}"


def heartbeat_dir(run_dir: str) -> str:
    return os.path.join(run_dir, HEARTBEATS_DIR)


def heartbeat_path(run_dir: str, key: str) -> str:
    return os.path.join(heartbeat_dir(run_dir), f"{key}.json")


def status_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATUS_FILE)


def write_json_atomic(path: str, data: object) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``; raises OSError."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_heartbeat(path: str, beat: Heartbeat) -> None:
    write_json_atomic(path, beat)


def read_heartbeat(path: str) -> Heartbeat | None:
    # written only by ChildContext; a reader still checks the types of the values it uses
    return cast("Heartbeat | None", read_json(path))


def remove_heartbeat(run_dir: str, key: str) -> None:
    try:
        os.unlink(heartbeat_path(run_dir, key))
    except FileNotFoundError:
        pass


def write_snapshot(run_dir: str, snapshot: Snapshot) -> None:
    write_json_atomic(status_path(run_dir), snapshot)


def read_snapshot(run_dir: str) -> Snapshot | None:
    """The supervisor's last snapshot (``<run_dir>/supervisor.json``), or None."""
    return cast("Snapshot | None", read_json(status_path(run_dir)))


def acquire_lock(run_dir: str, pid: int) -> int:
    """Hold ``<run_dir>/supervisor.lock`` (flock) with ``pid`` in it; the fd, or AlreadyRunning."""
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another supervisor is running with run_dir {run_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{pid}\n".encode())
    return fd


def _sweep_path(run_dir: str, account_id: int) -> str:
    return os.path.join(run_dir, RECONCILE_DIR, f"account-{account_id}.json")


def last_full_sweep_ms(run_dir: str, account_id: int) -> int | None:
    """When this host last completed a full reconciliation sweep of the account (epoch ms), if ever."""
    value = (read_json(_sweep_path(run_dir, account_id)) or {}).get("last_full_ms")
    return int(value) if isinstance(value, int) else None


def remember_full_sweep(run_dir: str, account_id: int, started_ms: int) -> None:
    """Record a completed full sweep; a failure is logged, never raised (the next pass sweeps fully)."""
    path = _sweep_path(run_dir, account_id)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"last_full_ms": started_ms})
    except OSError:
        log.warning("cannot record the full sweep of account %s in %s", account_id, path, exc_info=True)
