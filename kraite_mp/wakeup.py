"""``WakeEvent``: a ``threading.Event`` that a thread blocked in ``poll()`` on a socket can also wait for.

An idle stream sleeps in one blocking call, the poll of its socket with the ping, watchdog and heartbeat
deadlines folded into the timeout (``streams.connection``). What another thread decides meanwhile (stop
from the signal relay, a lost listenKey from the keepalive thread) must wake that poll at once, not at the
next deadline: ``set()`` also makes ``fileno()`` readable, and the poll watches it next to the socket.

The pipe is made on the first ``fileno()``, in the process that polls: the supervisor builds one of these
per child before forking, and a thousand children must not cost it two thousand descriptors. ``set()``
before the pipe exists writes nothing; the poller makes the pipe, then looks at the flag, then polls, so
it cannot miss a ``set()`` either way.
"""

from __future__ import annotations

import os
import threading


class WakeEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self._pipe: tuple[int, int] | None = None
        self._pipe_lock = threading.Lock()
        self._pipe_pid = 0

    def fileno(self) -> int:
        """The read end of the pipe: readable while the event is set."""
        with self._pipe_lock:
            if self._pipe is None or self._pipe_pid != os.getpid():  # never a pipe inherited over fork
                self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._pipe_pid = os.getpid()
                if self.is_set():
                    self._ring()
            return self._pipe[0]

    def set(self) -> None:
        super().set()
        with self._pipe_lock:
            if self._pipe is not None and self._pipe_pid == os.getpid():
                self._ring()

    def clear(self) -> None:
        super().clear()
        with self._pipe_lock:
            if self._pipe is None or self._pipe_pid != os.getpid():
                return
            try:
                while os.read(self._pipe[0], 64):
                    pass
            except BlockingIOError:
                pass

    def _ring(self) -> None:
        assert self._pipe is not None
        try:
            os.write(self._pipe[1], b"!")
        except BlockingIOError:  # the pipe is full: it is readable already
            pass
