"""How the supervisor makes a child's process: a user-data child from the fork server while one runs
(``supervisor.fork_server``, see ``forkserver``), any other child, or every child without a server, by a
fork of the supervisor itself. The ``Arbiter`` decides when to spawn and records the pid it gets."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kraite_mp import exitcodes
from kraite_mp.supervisor import process
from kraite_mp.supervisor.context import CHILD_SIGNALS, ChildContext, Target, run_child
from kraite_mp.supervisor.forkserver import ForkServer, become_subreaper
from kraite_mp.supervisor.runfiles import ROLE_USER_DATA

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.supervisor.process import Child
    from kraite_mp.supervisor.publish import Reporters

log = logging.getLogger(__name__)

#: The fork server is started (again, after it died) at most this often; then children are forked here.
FORK_SERVER_STARTS = 5


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """The children's signals blocked around a fork: none reaches the parent's handlers in the child."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class Forker:
    """The supervisor's forks. ``settings`` and ``targets`` are passed on every call: a reload replaces
    the settings, and the targets are loaded after the supervisor starts."""

    def __init__(self, reporters: Reporters, become_child: Callable[[], None]) -> None:
        self.reporters = reporters
        #: Drops the supervisor's machinery in a fresh child (and in the fork server).
        self.become_child = become_child
        #: Where user-data children are forked from; None: forked here.
        self.server: ForkServer | None = None
        self._server_starts = 0
        self._warned_threads = False

    def start_server(self, settings: Settings, targets: dict[str, Target]) -> None:
        """Start (or restart) the fork server, at most ``FORK_SERVER_STARTS`` times; without one, or
        without subreaping, children are forked here."""
        if self._server_starts >= FORK_SERVER_STARTS:
            if self.server is not None:
                log.error(
                    "fork server started %d times; the supervisor forks its children itself",
                    FORK_SERVER_STARTS,
                )
            self.server = None
            return
        if self.server is None:
            if not become_subreaper():
                log.warning("PR_SET_CHILD_SUBREAPER unavailable: no fork server, children are forked here")
                return
            self.server = ForkServer(settings, targets, self.reporters, self.become_child)
        self._server_starts += 1
        self.server.settings = settings  # what the server starts with (restarted after a reload)
        if not self.server.start(_signals_blocked):
            self.server = None

    def _from_server(self, child: Child, settings: Settings, targets: dict[str, Target]) -> int | None:
        if self.server is None or child.role != ROLE_USER_DATA:
            return None
        if not self.server.running:
            self.start_server(settings, targets)
            if self.server is None:
                return None
        pid = self.server.spawn(settings, child.role, child.account, child.key)
        if pid is None and self.server.failure == "timeout":  # hung: fork here from now on
            log.error("fork server failed for %s; the supervisor forks its children itself", child.label)
            self._server_starts = FORK_SERVER_STARTS
        # "gone": this child is forked here, the server is reaped and started again at the next spawn;
        # "fork": no process could be made, this child's fork here most likely fails too (then backoff)
        return pid

    def fork(self, child: Child, settings: Settings, targets: dict[str, Target]) -> int | None:
        """A new process for ``child`` (from the fork server, for a user-data child, when it runs): its pid,
        None when the fork failed (``child`` is in BACKOFF then). A child forked here never returns into
        this stack: it leaves through ``os._exit``."""
        pid = self._from_server(child, settings, targets)
        if pid is not None:
            return pid
        target = targets[child.role]
        ctx = ChildContext(settings, child.role, child.account, key=child.key, reporters=self.reporters)
        if threading.active_count() > 1 and not self._warned_threads:
            self._warned_threads = True  # a thread's locks would be copied held into every child
            log.error("the supervisor has %d threads; forking is unsafe", threading.active_count())
        self.reporters.before_fork()  # no socket crosses the fork
        # (the parent runs with the collector off, see process.prepare_to_fork: no collection before the
        # fork frees holes in shared pages for the child to write into)
        gc.freeze()  # objects allocated so far are never touched by the collector: pages stay shared
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.error("fork failed for %s: %s", child.label, e)
            process.schedule_backoff(child, time.monotonic(), settings, f"fork failed: {e}")
            return None
        if pid == 0:  # pragma: no cover - runs in the child (covered by the e2e tests)
            code = exitcodes.EXIT_ERROR
            try:
                self.become_child()
                code = run_child(ctx, target)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return pid

    def close_in_child(self) -> None:  # pragma: no cover - runs in the child
        if self.server is not None:
            self.server.close_in_child()
            self.server = None

    def stop(self) -> None:
        """End the fork server and reap it (SIGKILLed: at once)."""
        if self.server is None:
            return
        pid = self.server.pid
        self.server.stop()
        if pid is not None:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
