"""The demo's plumbing: console output, subprocesses in their own process groups, JSON over HTTP."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: SIGTERM -> wait this long -> SIGKILL the process group (kraite-mp's own graceful timeout is 10 s).
STOP_TIMEOUT_S = 20.0
#: Lines of a process log shown when it fails.
LOG_TAIL_LINES = 25


class DemoError(RuntimeError):
    """A step failed; the message says which and why (no secrets)."""


# -- output ------------------------------------------------------------------------------------


class Console:
    """Progress lines, and a table redrawn in place on a terminal (appended otherwise)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = 0

    def line(self, text: str = "") -> None:
        self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, n: int, total: int, text: str) -> None:
        self.line(f"[{n}/{total}] {text}")

    def detail(self, text: str) -> None:
        self.line(f"      {text}")

    def redraw(self, lines: list[str]) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # cursor up N lines, clear to the end
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines) if self.tty else 0


@contextmanager
def timed(console: Console, what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    console.detail(f"{what} ({time.monotonic() - started:.1f} s)")


# -- processes ---------------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A subprocess in its own session (process group), logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> str:
        """SIGTERM to the process itself (it stops its own children: dramatiq treats a second TERM as
        "kill now"), then SIGKILL to the whole group if it is late or left anything behind."""
        outcome = "had already exited"
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
                outcome = "stopped"
            except subprocess.TimeoutExpired:
                outcome = f"did not stop within {timeout_s:.0f} s: killed"
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in its group, if any
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        return f"{outcome}, exit code {self.proc.returncode}"


def start_process(
    name: str, args: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path, stdout_pipe: bool = False
) -> ManagedProcess:
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below in the parent
    try:
        proc = subprocess.Popen(
            args,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=log_file,
            start_new_session=True,  # Ctrl-C reaches only the demo, which stops everything in order
        )
    finally:
        log_file.close()
    return ManagedProcess(name, proc, log_path)


def read_line(proc: ManagedProcess, timeout_s: float) -> str:
    """The first stdout line of ``proc`` within ``timeout_s`` (the simulator's JSON line)."""
    assert proc.proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = proc.proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode()
        elif not proc.alive():
            break
    raise DemoError(f"{proc.name} printed nothing usable within {timeout_s:.0f} s:\n{proc.tail()}")


def http_json(url: str, body: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method="POST" if body is not None else "GET",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback simulator URL
        return json.loads(resp.read())
