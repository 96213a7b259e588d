"""Helpers shared by the tests and bench/: /proc readers, polling, and subprocess groups.

Tests import this module as ``support`` (pytest puts tests/ on ``sys.path``); bench/ scripts put
tests/ on ``sys.path`` and import it the same way. The fixtures live in ``conftest.py``, which
re-imports what it needs from here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: The repository root.
ROOT = Path(__file__).resolve().parent.parent

#: Environment variable that tags the processes a test starts (see ``marked_pids``).
MARKER_VAR = "KRAITE_TEST_MARKER"


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str = ""
) -> Any:
    """Poll ``predicate`` until truthy (returned) or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message or predicate!r} (last={last!r})")


def require_tcp_loopback(*urls: str) -> None:
    """Skip a test that must reach a server over loopback TCP (a forwarder, another network namespace, a
    changed port) when the session's server is the embedded fallback, which listens on a unix socket only."""
    from urllib.parse import urlsplit

    for url in urls:
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            pytest.skip(
                f"needs a server on loopback TCP; this session's is {parts.scheme} over a unix socket"
            )


# -- /proc --------------------------------------------------------------------------------------
def title_of(pid: int) -> str:
    """The process title (``/proc/PID/cmdline``, NULs as spaces) as setproctitle left it; "" once gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children_of(ppid: int) -> list[int]:
    """Live children of ``ppid`` (zombies excluded), in /proc order."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def marked_pids(marker: str, root: Path) -> list[int]:
    """Live processes (zombies excluded) with ``MARKER_VAR=marker`` in their environment or their
    working directory under ``root``. Both, because setproctitle (kraite-mp, redis-server, postgres)
    overwrites the memory /proc/PID/environ reads, while the working directory survives it."""
    needle = f"{MARKER_VAR}={marker}".encode()
    prefix = str(root.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if state == b"Z":
            continue
        if needle in environ.split(b"\0") or cwd == prefix or cwd.startswith(prefix + os.sep):
            found.append(int(entry))
    return found


# -- subprocesses -------------------------------------------------------------------------------
class ProcessGroup:
    """Subprocesses a test starts; all are killed (with their process groups) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.log_files: list[Any] = []

    def log_to(self, directory: str, name: str) -> dict[str, Any]:
        """``start`` keywords sending a process's output to ``<directory>/<name>.log`` (an unread pipe fills
        up and blocks its logging, and its shutdown); the file is closed at teardown, after the processes."""
        f = open(os.path.join(directory, f"{name}.log"), "ab")  # noqa: SIM115 - closed by stop_all
        self.log_files.append(f)
        return {"stdout": subprocess.DEVNULL, "stderr": f}

    def start(self, args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(args, env=env, start_new_session=True, cwd=str(ROOT), **kw)
        self.procs.append(proc)
        return proc

    def kraite(self, *args: str, env: dict[str, str], **kw: Any) -> subprocess.Popen[Any]:
        return self.start([sys.executable, "-m", "kraite_mp", *args], env, **kw)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                # communicate() drains unread pipes: a chatty child blocked on a full pipe cannot exit
                proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        while self.log_files:
            self.log_files.pop().close()


def wait_closed(ws: Any, timeout: float) -> None:
    """Read until the server closes the WebSocket ``ws`` (answering pings meanwhile); fail after ``timeout``."""
    import websocket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            opcode, _ = ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            return
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return
    pytest.fail("server did not close the connection")


def prices_by_id(conn: Any) -> dict[int, tuple[str | None, Any]]:
    """``exchange_symbols`` id -> (mark price as text, synced at)."""
    with conn.cursor() as cur:
        cur.execute("SELECT id, mark_price::text, mark_price_synced_at FROM exchange_symbols")
        rows = {int(r[0]): (r[1], r[2]) for r in cur.fetchall()}
    conn.commit()
    return rows


def db_now(conn: Any) -> Any:
    """The database server's clock."""
    with conn.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        (now,) = cur.fetchone()
    conn.commit()
    return now
