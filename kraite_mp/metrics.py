"""Prometheus metrics of every kraite-mp process (the names are a contract: docs/METRICS.md).

prometheus_client in multiprocess mode, the way pre-fork servers use it: ``kraite-mp run`` points
``PROMETHEUS_MULTIPROC_DIR`` at ``<run_dir>/metrics`` before anything imports prometheus_client (so
the supervisor, every child it forks and the Dramatiq workers started with the same variable write
their series into per-process files there), removes the files of processes that are gone, and one
small child serves them all on ``metrics.listen`` (``kraite_mp.supervisor.metrics_child``).

Without ``PROMETHEUS_MULTIPROC_DIR`` the series live in the process's own registry and cost next to
nothing. Account ids are labels; account names and keys never are (no secret in a label).
"""

from __future__ import annotations

import glob
import os
import re
import threading

#: The variable prometheus_client reads (when it is first imported) to write per-process files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The size a per-process metrics file starts at (prometheus_client: 64 KiB), doubled by prometheus_client as
#: the series fill it. A child's few series fit in 4 KiB. Linux maps a file's pages 64 KiB at a time on a
#: read fault ("fault-around"), so a 64 KiB file cost every child 64 KiB of private memory per file, four files.
MMAP_INITIAL_BYTES = 4096

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Series:
    """Every series of kraite-mp; built on first use (``series()``), after the process knows whether it
    writes multiprocess files: prometheus_client decides that when it is first imported."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, mmap_dict

        if getattr(mmap_dict, "_INITIAL_MMAP_SIZE", 0) > MMAP_INITIAL_BYTES:  # a private constant: if present
            mmap_dict._INITIAL_MMAP_SIZE = MMAP_INITIAL_BYTES

        # -- user-data children -------------------------------------------------------------------------------
        self.USER_DATA_FRAMES = Counter(
            "kraite_user_data_frames", "User-data frames received (and spooled).", ["account", "event"]
        )
        self.USER_DATA_CONNECTED = Gauge(
            "kraite_user_data_connected",
            "1 while the account's user-data stream is connected.",
            ["account"],
            multiprocess_mode="livemax",
        )
        self.USER_DATA_RECONNECTS = Counter(
            "kraite_user_data_reconnects", "User-data connections ended, by reason.", ["account", "reason"]
        )
        self.SPOOL_BACKLOG = Gauge(
            "kraite_spool_backlog",
            "Frames spooled and not yet sent to Redis.",
            ["account"],
            multiprocess_mode="livemax",
        )
        self.SPOOL_UNACKED = Gauge(
            "kraite_spool_unacked",
            "Frames sent to Redis whose audit no worker acknowledged yet.",
            ["account"],
            multiprocess_mode="livemax",
        )
        # -- workers -------------------------------------------------------------------------------------------
        self.FRAME_TO_COMMIT = Histogram(
            "kraite_frame_to_commit_seconds",
            "Frame received by the child -> its audit row committed by a worker.",
            buckets=_LATENCY_BUCKETS,
        )
        self.ORDERS_UPDATED = Counter(
            "kraite_orders_updated", "Order updates applied, by execution type.", ["execution"]
        )
        self.RECONCILE_FOUND = Counter(
            "kraite_reconcile_found", "What reconciliations found and changed, by kind.", ["kind"]
        )
        # -- mark-price ---------------------------------------------------------------------------------------
        self.MARK_PRICE_WRITE = Histogram(
            "kraite_mark_price_write_seconds",
            "One mark-price tick written and committed.",
            buckets=_LATENCY_BUCKETS,
        )
        self.MARK_PRICE_ROWS = Counter(
            "kraite_mark_price_rows", "exchange_symbols rows updated by mark-price ticks."
        )
        self.MARK_PRICE_SKIPPED = Counter(
            "kraite_mark_price_skipped", "Mark-price ticks or entries skipped.", ["reason"]
        )
        self.MARK_PRICE_LAST_TICK = Gauge(
            "kraite_mark_price_last_tick_timestamp_seconds",
            "Wall time of the last committed mark-price tick.",
            multiprocess_mode="max",
        )
        # -- REST -----------------------------------------------------------------------------------------------
        self.REST_WEIGHT_USED = Gauge(
            "kraite_rest_weight_used",
            "X-MBX-USED-WEIGHT-1M last seen on a response, by egress.",
            ["egress"],
            multiprocess_mode="max",
        )
        self.REST_RESPONSES = Counter(
            "kraite_rest_responses", "Binance REST responses, by HTTP status.", ["status"]
        )
        # -- supervisor ---------------------------------------------------------------------------------------
        self.CHILD_RESTARTS = Counter(
            "kraite_child_restarts", "Children restarted after an exit, by role.", ["role"]
        )
        self.CHILD_STATE = Gauge(
            "kraite_child_state",
            "1 for each child's current supervisor state (PENDING, RUNNING, BACKOFF, FATAL, ...).",
            ["key", "state"],
            multiprocess_mode="livemax",
        )


_series: Series | None = None
_series_lock = threading.Lock()


def series() -> Series:
    """The process's series (built once, on first use)."""
    global _series
    if _series is None:
        with _series_lock:
            if _series is None:
                _series = Series()
    return _series


_PID_FILE = re.compile(r"_(\d+)\.db$")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_dir(directory: str) -> None:
    """Create ``directory`` and remove the files of processes that are gone (a worker's stay)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        m = _PID_FILE.search(path)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(path)
            except OSError:
                pass


def process_dead(pid: int) -> None:
    """A child was reaped: its live gauges stop counting (prometheus_client's multiprocess cleanup)."""
    if multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
