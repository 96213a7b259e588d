"""The supervisor's signals, gunicorn style: a handler only queues the signal and wakes the loop."""

from __future__ import annotations

import errno
import os
import queue
import select
import signal
from collections.abc import Iterator

#: The signals the parent handles.
SIGNALS: tuple[int, ...] = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
#: Their names as the ``Arbiter.handle_<name>`` methods spell them.
SIG_NAMES: dict[int, str] = {s: signal.Signals(s).name.lower() for s in SIGNALS}


class SignalQueue:
    """Queued signals plus a self-pipe, so that ``wait`` returns at once when one arrives."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.pipe: tuple[int, int] | None = None

    def install(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe = (read_fd, write_fd)
        for sig in SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.queue.put_nowait(signum)  # no logging here: a handler may interrupt a logging call
        self.wakeup()

    def wakeup(self) -> None:
        if self.pipe is None:
            return
        try:
            os.write(self.pipe[1], b".")
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def wait(self, timeout_s: float) -> None:
        """Wait for a signal (via the pipe) or the timeout."""
        assert self.pipe is not None
        try:
            ready, _, _ = select.select([self.pipe[0]], [], [], max(0.0, timeout_s))
            if ready:
                while os.read(self.pipe[0], 4096):
                    pass
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def pending(self) -> Iterator[str]:
        """The names of the signals queued so far, oldest first."""
        while True:
            try:
                signum = self.queue.get_nowait()
            except queue.Empty:
                return
            yield SIG_NAMES[signum]

    def close(self) -> None:
        """Default handlers back and the pipe closed (at exit, and first thing in a fresh child)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipe = None
