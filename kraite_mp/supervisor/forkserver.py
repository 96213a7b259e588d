"""The fork server: a copy of the warmed-up supervisor that every user-data child is forked from.

A child forked straight from the supervisor gets the supervisor's heap *as it is at that moment*. The
supervisor keeps working between forks: it allocates, frees, writes its records and status. Each child
therefore shares fewer pages with its siblings than the one before. Measured at 300 accounts, an idle
child's USS rose with its fork order, from 5.9 MB for the first tenth to 6.7 MB for the last, and the mean
was 7.6 MB at 1,000 (docs/BENCHMARKS.md). The fork server is forked once, right after the warm-up and
``immortal.immortalize_heap()`` (``process.prepare_to_fork``). It then does nothing but fork, so its heap
stays the one the first child saw, and every child shares it alike.

The children must still be the supervisor's own, to be reaped, signalled and restarted as before. The
supervisor makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), and the server double-forks: it
forks an intermediate process, which forks the child, reports the child's pid and exits. The orphaned
child is re-parented to the supervisor. The server reaps the intermediate before it answers, so by the time
the supervisor has the pid, the child is already the supervisor's. It waits for that (``getppid()``) before it sets its parent-death
signal, because Linux sends that signal when the first parent exits. Then it runs exactly as a directly
forked child does (``context.run_child``).

Protocol: the supervisor writes one request per child on a pipe: a 4-byte length, then the pickled
request (role, account, key, and the settings when they changed since the last request). It reads the
answer on another pipe, an 8-byte ``(request id, pid)`` of which pid 0 means the fork failed, and waits
at most ``REPLY_TIMEOUT_S``. The pipes connect the supervisor and a process it forked itself, so pickle
carries nothing untrusted. When the server does not answer, is gone, or subreaping is not available, the
supervisor stops using it and forks children itself, as it did before (``supervisor.fork_server = false``
does that from the start). A dead server is restarted at the next spawn, forked from the supervisor as it
is then. The server dies with the supervisor (``PR_SET_PDEATHSIG`` SIGKILL) and ends when its request
pipe closes.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import pickle
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kraite_mp import exitcodes
from kraite_mp.supervisor.context import ChildContext, run_child, set_pdeathsig

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account
    from kraite_mp.supervisor.context import Target
    from kraite_mp.supervisor.publish import Reporters

log = logging.getLogger(__name__)

#: prctl(2) option: orphaned descendants are re-parented to this process, not to init.
PR_SET_CHILD_SUBREAPER = 36
#: The supervisor waits this long for the pid of a child it asked the server for (seconds).
REPLY_TIMEOUT_S = 5.0
#: A child forked by the server waits at most this long to be re-parented to the supervisor (seconds).
REPARENT_TIMEOUT_S = 5.0
#: How often it looks (seconds): the intermediate exits right after its fork.
REPARENT_POLL_S = 0.001
#: The answer: request id, pid (0: the fork failed).
_REPLY = struct.Struct("<II")
_LENGTH = struct.Struct("<I")
#: The process title of the server.
TITLE = "kraite-mp: fork-server"


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+); False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def _read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd``, or None at end of file."""
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ForkServer:
    """The supervisor's handle on its fork server (kept in the supervisor, inherited by the server)."""

    def __init__(
        self,
        settings: Settings,
        targets: dict[str, Target],
        reporters: Reporters,
        become_child: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.reporters = reporters
        #: Drops the supervisor's machinery (signal queue, lock file) in the server, as in a child.
        self.become_child = become_child
        self.supervisor_pid = os.getpid()
        self.pid: int | None = None
        self._requests = self._replies = -1
        self._next_id = 0
        self._sent_settings: Settings | None = None
        #: Why the last ``spawn`` gave no pid ("gone", "fork", "timeout"), "" when it gave one.
        self.failure = ""

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- in the supervisor ------------------------------------------------------------------------
    def start(self, signals_blocked: Callable[[], Any]) -> bool:
        """Fork the server. ``signals_blocked`` is a context manager that blocks the children's signals
        around the fork (the server keeps them blocked). False when it cannot run here."""
        if self.running:
            return True
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        self.reporters.before_fork()  # no socket crosses the fork
        gc.freeze()
        with signals_blocked():
            try:
                pid = os.fork()
            except OSError as e:
                for fd in (request_r, request_w, reply_r, reply_w):
                    os.close(fd)
                log.error("fork server: fork failed (%s); the supervisor forks its children itself", e)
                return False
            if pid == 0:  # pragma: no cover - runs in the server (covered by the e2e tests)
                code = exitcodes.EXIT_ERROR
                try:
                    os.close(request_w)
                    os.close(reply_r)
                    self._serve(request_r, reply_w)
                    code = exitcodes.EXIT_OK
                finally:
                    os._exit(code)
        os.close(request_r)
        os.close(reply_w)
        self.pid, self._requests, self._replies = pid, request_w, reply_r
        self._sent_settings = self.settings
        log.info("fork server started pid=%s (user-data children are forked from it)", pid)
        return True

    def spawn(self, settings: Settings, role: str, account: Account | None, key: str) -> int | None:
        """Ask the server for a child: its pid, or None, with ``failure`` saying why: "gone" (the server
        died; it is reaped and started again), "fork" (it could not fork: neither could the supervisor,
        probably), "timeout" (it did not answer: it is killed)."""
        self.failure = ""
        if not self.running:
            self.failure = "gone"
            return None
        self._next_id = (self._next_id + 1) % 2**32
        request: dict[str, Any] = {"id": self._next_id, "role": role, "account": account, "key": key}
        if settings is not self._sent_settings:  # reloaded (SIGHUP): the server uses these from now on
            request["settings"] = settings
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _write_all(self._requests, _LENGTH.pack(len(payload)) + payload)
            pid = self._await_reply(self._next_id)
        except OSError as e:  # EPIPE: it died since the last spawn, not yet reaped
            log.warning("fork server pid=%s: %s", self.pid, e)
            self.failure, pid = "gone", None
        if pid is None:
            self.stop()
            return None
        self._sent_settings = settings
        if pid == 0:
            self.failure = "fork"
            return None
        return pid

    def _await_reply(self, request_id: int) -> int | None:
        """The pid the server answered for ``request_id`` (0: it could not fork); None when it did not
        answer in time or is gone (``failure`` says which)."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("fork server pid=%s: no answer within %.0f s", self.pid, REPLY_TIMEOUT_S)
                self.failure = "timeout"
                return None
            ready, _, _ = select.select([self._replies], [], [], left)
            if not ready:
                continue
            data = _read_exact(self._replies, _REPLY.size)
            if data is None:
                log.warning("fork server pid=%s: gone", self.pid)
                self.failure = "gone"
                return None
            answered, pid = _REPLY.unpack(data)
            if answered != request_id:
                continue  # the late answer to a request given up on
            if pid == 0:
                log.error("fork server pid=%s: could not fork the child", self.pid)
            return int(pid)

    def reaped(self, pid: int, how: str) -> bool:
        """The supervisor reaped ``pid``: True when it was the server (which is then forgotten)."""
        if pid != self.pid:
            return False
        log.warning("fork server pid=%s exited (%s); it is started again at the next spawn", pid, how)
        self._close_pipes()
        self.pid = None
        return True

    def stop(self) -> None:
        """End the server (its request pipe closed, then SIGKILL); the supervisor reaps it."""
        if self.pid is None:
            return
        self._close_pipes()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close_in_child(self) -> None:
        """In a process forked by the supervisor itself: drop the server's pipes."""
        self._close_pipes()
        self.pid = None

    def _close_pipes(self) -> None:
        for fd in (self._requests, self._replies):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._requests = self._replies = -1

    # -- in the server ----------------------------------------------------------------------------
    def _serve(self, requests: int, replies: int) -> None:  # pragma: no cover - runs in the server
        from setproctitle import setproctitle

        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != self.supervisor_pid:  # the supervisor died before prctl()
            return
        self.become_child()
        gc.disable()  # as in the supervisor: no collection frees holes for the children to write into
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its intermediates are waited for, not signalled
        setproctitle(TITLE)
        settings = self.settings
        while True:
            header = _read_exact(requests, _LENGTH.size)
            if header is None:
                return  # the supervisor closed the pipe: stop
            payload = _read_exact(requests, _LENGTH.unpack(header)[0])
            if payload is None:
                return
            request = pickle.loads(payload)
            settings = request.get("settings", settings)
            self._fork_child(settings, request, requests, replies)
            del request, payload

    def _fork_child(
        self, settings: Settings, request: dict[str, Any], requests: int, replies: int
    ) -> None:  # pragma: no cover - runs in the server
        ctx = ChildContext(
            settings, request["role"], request["account"], key=request["key"], reporters=self.reporters
        )
        ctx.parent_pid = self.supervisor_pid  # the child's parent once it is re-parented
        target = self.targets[request["role"]]
        gc.freeze()
        # the intermediate tells the server the child's pid; the server answers only once the intermediate
        # is reaped, i.e. once the child is the supervisor's: the supervisor can wait for it at once
        pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
        try:
            middle = os.fork()
        except OSError:
            os.close(pid_r)
            os.close(pid_w)
            _write_all(replies, _REPLY.pack(request["id"], 0))
            return
        if middle == 0:  # the intermediate: fork the child, report it, exit (the child is orphaned)
            code = exitcodes.EXIT_ERROR
            try:
                pid = os.fork()
                if pid == 0:
                    for fd in (requests, replies, pid_r, pid_w):
                        os.close(fd)
                    code = self._run_child(ctx, target)
                else:
                    _write_all(pid_w, _LENGTH.pack(pid))
                    code = exitcodes.EXIT_OK
            except OSError:
                code = exitcodes.EXIT_ERROR
            finally:
                os._exit(code)
        os.close(pid_w)
        try:
            os.waitpid(middle, 0)
            data = _read_exact(pid_r, _LENGTH.size)
        finally:
            os.close(pid_r)
        child = _LENGTH.unpack(data)[0] if data is not None else 0
        _write_all(replies, _REPLY.pack(request["id"], child))

    def _run_child(self, ctx: ChildContext, target: Target) -> int:  # pragma: no cover - in the child
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != self.supervisor_pid and time.monotonic() < deadline:
            time.sleep(REPARENT_POLL_S)
        gc.enable()  # the child collects its own garbage; the frozen server objects stay untouched
        return run_child(ctx, target)  # its after_fork exits at once if the supervisor is not the parent
