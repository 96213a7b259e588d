"""What every forked child gets from the supervisor: ``after_fork``, the signal relay, ``beat()``.

The supervisor builds a ``ChildContext`` before the fork (it connects nothing); the child calls
``after_fork()`` first thing, then runs its loop until ``ctx.stop`` is set, calling
``ctx.beat(state, **fields)`` often. ``beat`` is cheap to call on every frame: it rewrites the
heartbeat file (``runfiles.Heartbeat``), the process title and the status hooks at most once per
``BEAT_INTERVAL_S`` (or at once when the state changes). The parent judges liveness by the file's
mtime, so a child must call ``beat()`` from its main loop at least every ``idle_beat_s`` even when
idle (never from a helper thread: a stuck loop must look stuck). ``idle_beat_s`` is a quarter of
``supervisor.heartbeat_timeout_s`` (15 s at the default 60 s), at most ``IDLE_BEAT_MAX_S``: the rate
liveness needs, not once a second; a child with nothing to report sleeps that long.

Signals: SIGTERM/SIGINT set ``ctx.stop``, SIGHUP sets ``ctx.reload``. The Python-level handlers do
nothing; the C-level handler writes the signal number to a wakeup pipe (``signal.set_wakeup_fd``)
and a tiny relay thread sets the events. Setting a ``threading.Event`` from inside a signal
handler can deadlock (the handler may interrupt ``Event.wait`` while it holds the event's lock),
and the relay also wakes other threads at once when the main thread is blocked in a C call.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kraite_mp import exitcodes
from kraite_mp.config import Settings
from kraite_mp.store.accounts import Account
from kraite_mp.supervisor import runfiles
from kraite_mp.supervisor.publish import Reporters
from kraite_mp.wakeup import WakeEvent

log = logging.getLogger(__name__)

#: At most one heartbeat-file write and one title update per second.
BEAT_INTERVAL_S = 1.0
#: An idle child beats every ``heartbeat_timeout_s / IDLE_BEATS_PER_TIMEOUT`` ...
IDLE_BEATS_PER_TIMEOUT = 4
#: ... but at least this often (``kraite-mp status`` calls a heartbeat 30 s old STALE) ...
IDLE_BEAT_MAX_S = 15.0
#: ... and at most this often.
IDLE_BEAT_MIN_S = BEAT_INTERVAL_S
_PR_SET_PDEATHSIG = 1

#: The signals a child handles. The supervisor blocks them around ``fork()`` so that none is
#: delivered to the parent's handlers inside the child; ``after_fork`` unblocks them.
CHILD_SIGNALS: frozenset[int] = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        log.warning("PR_SET_PDEATHSIG unavailable: an orphaned child may outlive its parent")


def title_prefix(role: str, account: Account | None) -> str:
    if account is None:
        return f"kraite-mp: {role}"
    # names are operator-chosen: keep the title one token per field
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in account.name)[:32]
    return f"kraite-mp: {role} account={account.id} name={name}"


class ChildContext:
    def __init__(
        self,
        settings: Settings,
        role: str,
        account: Account | None = None,
        key: str | None = None,
        *,
        reporters: Reporters | None = None,
    ) -> None:
        self.settings = settings
        self.role = role
        self.account = account
        self.key = key or runfiles.child_key(role, account.id if account else None)
        self.heartbeat_path = runfiles.heartbeat_path(settings.run_dir, self.key)
        #: Status hooks (``after_fork``, ``on_beat``); none unless the supervisor hands some over.
        self.reporters = reporters if reporters is not None else Reporters()
        #: Set by SIGTERM/SIGINT: loops must finish promptly (use ``stop.wait(timeout)`` to sleep; a loop
        #: blocked in ``poll()`` watches ``stop.fileno()``).
        self.stop = WakeEvent()
        #: A child with nothing new to report beats this often (see the module doc).
        self.idle_beat_s = idle_beat_s(settings.supervisor.heartbeat_timeout_s)
        #: Set by SIGHUP: reload what can be reloaded without reconnecting (mark-price symbol map).
        self.reload = threading.Event()
        self.state = "starting"
        self.fields: dict[str, Any] = {}
        self.error: str | None = None
        self.started = time.time()
        self.parent_pid = os.getpid()
        self._last_beat = 0.0
        self._title_prefix = title_prefix(role, account)

    # -- in the child ---------------------------------------------------------------------------
    def after_fork(self) -> None:
        """First thing in the child: die with the parent, own signal handlers, fresh randomness."""
        set_pdeathsig(signal.SIGTERM)
        if os.getppid() != self.parent_pid:  # parent died between fork() and prctl()
            os._exit(exitcodes.EXIT_OK)
        random.seed()  # or every child draws the same jitter
        self.started = time.time()
        self._install_signal_relay()
        self.reporters.after_fork(self)
        self.beat("starting", force=True)

    def _install_signal_relay(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(read_fd, True)
        # the wakeup fd must be non-blocking: a full pipe would block the C handler otherwise
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _ignore_in_python)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        t = threading.Thread(target=self._relay_signals, args=(read_fd,), name="signal-relay", daemon=True)
        t.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)

    def _relay_signals(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
            if not data:  # pragma: no cover - the write end lives as long as the process
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.stop.set()
                elif signum == signal.SIGHUP:
                    self.reload.set()

    def beat(self, state: str | None = None, *, force: bool = False, **fields: Any) -> None:
        """Record liveness and counters; writes the heartbeat file and title at most once a second."""
        changed = state is not None and state != self.state
        if state is not None:
            self.state = state
        if fields:
            self.fields.update(fields)
        now = time.monotonic()
        if not (force or changed) and now - self._last_beat < BEAT_INTERVAL_S:
            return
        self._last_beat = now
        self.set_title()
        self._write_heartbeat()
        self.reporters.on_beat(self)

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last heartbeat written (0.0: none yet)."""
        return self._last_beat

    def set_title(self) -> None:
        parts = [self._title_prefix, f"state={self.state}"]
        parts.extend(f"{k}={v}" for k, v in self.fields.items())
        set_process_title(" ".join(parts))

    def status(self) -> runfiles.Heartbeat:
        return {
            "key": self.key,
            "role": self.role,
            "account_id": self.account.id if self.account else None,
            "account_name": self.account.name if self.account else None,
            "pid": os.getpid(),
            "state": self.state,
            "ts": time.time(),
            "started": self.started,
            "fields": self.fields,
            "error": self.error,
        }

    def _write_heartbeat(self) -> None:
        from kraite_mp.logs import redact_value

        try:
            # redacted here, where this child's secrets are known: the supervisor relays the file to Redis
            runfiles.write_heartbeat(self.heartbeat_path, redact_value(self.status()))
        except OSError:
            log.warning("cannot write heartbeat %s", self.heartbeat_path, exc_info=True)

    def fail(self, reason: str) -> None:
        """Record a (redacted) error for ``status`` without changing state."""
        from kraite_mp.logs import redact

        self.error = redact(reason)[:500]

    def fatal(self, reason: str, code: int = exitcodes.EXIT_FATAL_CREDENTIALS) -> int:
        """Record why this child cannot usefully be restarted soon; return the exit code to use."""
        self.fail(reason)
        self.beat("fatal", force=True)
        log.error("fatal: %s", self.error)
        return code


def idle_beat_s(heartbeat_timeout_s: float) -> float:
    return min(IDLE_BEAT_MAX_S, max(IDLE_BEAT_MIN_S, heartbeat_timeout_s / IDLE_BEATS_PER_TIMEOUT))


def _ignore_in_python(signum: int, frame: object) -> None:
    """Installed so the default action (terminate) does not apply; the relay thread does the work."""


def set_process_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover
        pass


#: A child's entry point: runs until ``ctx.stop``, returns the exit code.
Target = Callable[[ChildContext], int]


def load_targets(spec: Mapping[str, str]) -> dict[str, Target]:
    """Import every entry point ("module:attr") now, in the parent, before any fork."""
    targets: dict[str, Target] = {}
    for role, path in spec.items():
        module_name, attr = path.split(":")
        targets[role] = getattr(importlib.import_module(module_name), attr)
    return targets


def run_child(ctx: ChildContext, target: Target) -> int:
    """Run ``target`` in a freshly forked child and turn every outcome into an exit code."""
    code = exitcodes.EXIT_ERROR
    try:
        ctx.after_fork()
        code = target(ctx)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else exitcodes.EXIT_ERROR
    except BaseException as e:  # noqa: BLE001 - the child must always report
        ctx.fail(f"{type(e).__name__}: {e}")
        log.exception("child %s crashed", ctx.key)
        ctx.beat("crashed", force=True)
        code = exitcodes.EXIT_ERROR
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
    return code
