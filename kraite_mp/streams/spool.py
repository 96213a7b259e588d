"""A durable, append-only, per-account spool: the write-ahead log between the WebSocket and Redis.

The user-data child appends every frame here *before* anything else happens to it; a sender thread
reads the spool in order and enqueues each record to Redis, then advances a cursor, persisted at most
every ``spool_files.CURSOR_PERSIST_S`` while records flow (each write creates and renames a file), at
once when the flow pauses, and on close. So:

- Redis down: records pile up on disk, receiving never waits for Redis; they are sent in order
  once Redis is back.
- The child dies (or is restarted): the next incarnation finds the segments and the cursor and
  sends what was not yet sent. Delivery is at-least-once (a crash between an enqueue and the
  cursor write re-sends a record); the job is idempotent by frame id, so this is harmless.
- End-to-end acknowledgement (``ack_required``): a record stays on disk after Redis accepted it,
  until a worker acknowledged its audit commit (``ack``, driven by the sender), so a broker that lost
  its data can be replayed from the spool (``rewind``). Retention is bounded by ``max_bytes``: past
  it the oldest sent-but-unacknowledged segment is given up (``give_up_oldest``), never unsent ones.

Layout: segments (one record a line) and the ``cursor``, ``acked`` and ``id`` files, kept by
``streams.spool_files``; a record's position is ``streams.spool_record``. The writer never appends to
a segment written by an earlier process (a crash may have left a torn last line there): ``open()``
always starts a new segment. The writer rotates to a new segment at ``segment_bytes`` or
``segment_max_age_s``; a segment is deleted once the acknowledged cursor (the sent one without
``ack_required``) moved past it, so a drained spool holds at most one (partly filled) segment, and an
idle one none with frames older than ``segment_max_age_s``.

A record is written with one ``write()`` on an ``O_APPEND`` descriptor: it survives the process
being killed at any point. ``fsync=True`` also makes it survive power loss, at the price of one
fsync per record.

Thread-safety: one writer thread (``append``) and one reader thread (``read``/``commit``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

from kraite_mp.streams.spool_files import READ_CHUNK_BYTES, SpoolError, SpoolFiles, segment_name
from kraite_mp.streams.spool_record import MEMORY_SEGMENT, SpoolRecord, position_of, split_position

log = logging.getLogger(__name__)

#: Rotate the active segment once it is this big.
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024


class Spool:
    """Append records (bytes without newlines); read them back in order; commit what was sent."""

    def __init__(
        self,
        directory: str,
        *,
        fsync: bool = False,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_max_age_s: float | None = None,
        ack_required: bool = False,
        max_bytes: int | None = None,
        memory_limit: int = 0,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        #: The segment files and the cursor, acked and id files (the sent cursor's write schedule too).
        self.files = SpoolFiles(directory, fsync=fsync)
        self.segment_bytes = segment_bytes
        self.segment_max_age_s = segment_max_age_s
        #: Keep records until ``ack`` (not just ``commit``).
        self.ack_required = ack_required
        #: Retention bound of the spool's segments (bytes); None: unbounded.
        self.max_bytes = max_bytes
        #: Random id of this spool directory (persisted); set by ``open``.
        self.spool_id = ""
        #: Records that may wait in memory while the disk refuses writes (0: none, append raises).
        self.memory_limit = memory_limit
        self._memory: deque[bytes] = deque()
        #: Since when the disk refuses writes (monotonic), and how often it began to.
        self.memory_since: float | None = None
        self.memory_episodes = 0
        self._cond = threading.Condition(threading.Lock())
        # writer state
        self._active = 0
        self._active_fd = -1
        self._active_size = 0
        self._active_opened_at = 0.0
        # reader state: the next record to hand out
        self._read_segment = 0
        self._read_offset = 0
        self._read_fd = -1
        self._read_fd_segment = -1
        # committed (persisted) position: sent to Redis ...
        self._commit_segment = 0
        self._commit_offset = 0
        #: ... to the broker of this epoch (see ``streams.sender``; "" = unknown)
        self.sent_epoch = ""
        # ... and acknowledged (audited); == the sent position without ``ack_required``
        self._acked_segment = 0
        self._acked_offset = 0
        #: Records appended (or found at open) and not yet committed.
        self.backlog = 0
        #: Records dropped because they were unreadable (torn last line of a crashed writer).
        self.dropped = 0
        self._closed = False
        self._wakeups = 0

    # -- setup -----------------------------------------------------------------------------------
    def open(self) -> Spool:
        """Recover segments and cursor left by an earlier process; start a fresh active segment."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e.strerror}") from None
        self.spool_id = self.files.load_id()
        segments = self.files.segments()
        cursor = self.files.load_cursor()
        acked = self.files.load_acked() if self.ack_required else None
        if acked is None or (cursor is not None and acked > cursor[:2]):
            acked = cursor[:2] if cursor is not None else None  # a spool written before acks: sent = audited
        if acked is not None and (not segments or acked[0] >= segments[0]):
            self._acked_segment, self._acked_offset = acked
        elif segments:
            self._acked_segment, self._acked_offset = segments[0], 0
        if cursor is not None and cursor[:2] >= (self._acked_segment, self._acked_offset):
            self._commit_segment, self._commit_offset, self.sent_epoch = cursor
        else:
            self._commit_segment, self._commit_offset = self._acked_segment, self._acked_offset
        # segments wholly before the acknowledged position are done: remove them
        for number in segments:
            if number < self._acked_segment:
                self.files.unlink(number)
        segments = [n for n in segments if n >= self._acked_segment]
        # the reader starts at the acknowledged position; the sender skips what it knows it sent
        self._read_segment, self._read_offset = self._acked_segment, self._acked_offset
        self.backlog = self.files.count_records(segments, self._commit_segment, self._commit_offset)
        self._active = (segments[-1] + 1) if segments else max(self._commit_segment, 1)
        if segments and self.files.size(segments[-1]) == 0:
            # an empty last segment (a run that spooled nothing: an account FATAL at every retry) is the
            # active one again: no torn line to skip, and no empty file left per run
            self._active = segments[-1]
        if not segments:
            self._read_segment, self._read_offset = self._active, 0
            self._commit_segment, self._commit_offset = self._active, 0
            self._acked_segment, self._acked_offset = self._active, 0
        if self.ack_required:  # from now on a missing file means a spool written before acknowledgements
            self.files.write_acked(self._acked_segment, self._acked_offset)
        self._open_active()
        if self.backlog:
            log.warning(
                "spool %s: %d records left by an earlier run, sending them first",
                self.directory,
                self.backlog,
            )
        return self

    def _open_active(self) -> None:
        path = self.files.path(self._active)
        try:
            self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolError(f"spool segment {path}: {e.strerror}") from None
        self._active_size = os.fstat(self._active_fd).st_size
        self._active_opened_at = time.monotonic()

    # -- writer ----------------------------------------------------------------------------------
    def append(self, record: bytes) -> None:
        """Write one record durably (see module doc). While the disk refuses writes (full, read-only) the
        record waits in memory (``memory_limit`` records at most) and write-ahead resumes once the memory
        queue is sent and the disk takes a write again; SpoolError when neither can take it."""
        line = record + b"\n"
        with self._cond:
            if self._closed:
                raise SpoolError("spool is closed")
            if self._memory:  # keep the order: nothing goes to disk before the memory queue is sent
                self._to_memory(record, None)
            else:
                try:
                    self._write_line(line)
                except SpoolError as e:
                    if not self.memory_limit:
                        raise
                    self._to_memory(record, e)
            self.backlog += 1
            self._cond.notify_all()

    def _write_line(self, line: bytes) -> None:
        if self._active_size >= self.segment_bytes or self._active_expired():
            self._rotate()
        try:
            written = os.write(self._active_fd, line)
            while written < len(line):  # a full disk may take part of it: the next write raises
                written += os.write(self._active_fd, line[written:])
            if self.fsync:
                os.fsync(self._active_fd)
        except OSError as e:
            try:  # no torn record in the middle of a segment: cut back what went in
                os.ftruncate(self._active_fd, self._active_size)
            except OSError:
                pass
            raise SpoolError(f"cannot write spool {self.directory}: {e.strerror}") from None
        self._active_size += len(line)
        if self.memory_since is not None:
            log.warning(
                "spool %s: the disk takes writes again after %.0fs: write-ahead resumes",
                self.directory,
                time.monotonic() - self.memory_since,
            )
            self.memory_since = None

    def _to_memory(self, record: bytes, error: SpoolError | None) -> None:
        if len(self._memory) >= self.memory_limit:
            raise SpoolError(
                f"spool {self.directory}: the disk refuses writes and {self.memory_limit} frames already"
                " wait in memory"
            )
        if self.memory_since is None:
            self.memory_since = time.monotonic()
            self.memory_episodes += 1
            log.error(
                "spool %s: %s; frames wait in memory (at most %d) and go straight to Redis until the disk"
                " takes them again",
                self.directory,
                error or "the disk refuses writes",
                self.memory_limit,
            )
        self._memory.append(record)

    @property
    def in_memory(self) -> bool:
        """The disk refused a write and write-ahead has not resumed yet."""
        return self.memory_since is not None

    def _active_expired(self) -> bool:
        return (
            self.segment_max_age_s is not None
            and self._active_size > 0
            and time.monotonic() - self._active_opened_at >= self.segment_max_age_s
        )

    def _rotate(self) -> None:
        """Start the next segment; if the disk refuses it, the current one stays active (SpoolError)."""
        old_fd, old_size, old_opened = self._active_fd, self._active_size, self._active_opened_at
        self._active += 1
        try:
            self._open_active()
        except SpoolError:
            self._active -= 1
            self._active_fd, self._active_size, self._active_opened_at = old_fd, old_size, old_opened
            raise
        os.close(old_fd)

    # -- reader ----------------------------------------------------------------------------------
    def read(self, max_records: int = 256, timeout: float | None = None) -> list[SpoolRecord]:
        """The next records after the last ones read (not necessarily committed); waits up to ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wakeups = self._wakeups
        while True:
            with self._cond:
                records = self._read_locked(max_records)
                if records or self._closed or self._wakeups != wakeups:
                    return records
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _read_locked(self, max_records: int) -> list[SpoolRecord]:
        records = self._read_disk_locked(max_records)
        if not records and self._memory:  # the disk is read to its end: what waits in memory comes next
            while self._memory and len(records) < max_records:
                records.append(SpoolRecord(self._memory.popleft(), MEMORY_SEGMENT, 0))
        return records

    def wake(self) -> None:
        """Make a ``read`` that waits for the writer return now (the sender is stopping)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def _read_disk_locked(self, max_records: int) -> list[SpoolRecord]:
        records: list[SpoolRecord] = []
        while len(records) < max_records:
            segment = self._read_segment
            limit = self._active_size if segment == self._active else None
            fd = self._reader_fd(segment)
            if fd < 0:  # vanished: go on with the next one
                if segment >= self._active:
                    break
                self._read_segment, self._read_offset = segment + 1, 0
                continue
            if limit is None:
                limit = os.fstat(fd).st_size
            if self._read_offset >= limit:
                if segment >= self._active:
                    break
                self._read_segment, self._read_offset = segment + 1, 0
                continue
            chunk = os.pread(fd, min(READ_CHUNK_BYTES, limit - self._read_offset), self._read_offset)
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                if segment < self._active and self._read_offset + len(chunk) >= limit:
                    # the torn last line of a writer that died mid-record: nothing to salvage
                    log.warning(
                        "spool %s: dropping a torn record at the end of %s",
                        self.directory,
                        segment_name(segment),
                    )
                    self.dropped += 1
                    self._read_segment, self._read_offset = segment + 1, 0
                    continue
                if len(chunk) >= READ_CHUNK_BYTES:  # one record bigger than a chunk: read it whole
                    chunk = os.pread(fd, limit - self._read_offset, self._read_offset)
                    last_newline = chunk.rfind(b"\n")
                if last_newline < 0:
                    break
            start = 0
            for line in chunk[: last_newline + 1].split(b"\n")[:-1]:
                start += len(line) + 1
                records.append(SpoolRecord(line, segment, self._read_offset + start))
                if len(records) >= max_records:
                    break
            self._read_offset += start
        return records

    def _reader_fd(self, segment: int) -> int:
        if self._read_fd_segment != segment:
            if self._read_fd >= 0:
                os.close(self._read_fd)
            self._read_fd, self._read_fd_segment = -1, segment
            try:
                self._read_fd = os.open(self.files.path(segment), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._read_fd = -1
        return self._read_fd

    def commit(self, record: SpoolRecord, count: int, epoch: str = "") -> None:
        """``count`` records up to and including ``record`` were sent (to the broker of ``epoch``): persist
        the cursor past them. Without ``ack_required`` they are acknowledged too."""
        with self._cond:
            self.backlog = max(0, self.backlog - count)
            if record.in_memory:  # never on disk: no cursor to move
                return
            self._commit_segment, self._commit_offset = record.segment, record.end_offset
            self.sent_epoch = epoch
        self.files.stage_cursor(record.segment, record.end_offset, epoch)
        self.persist_cursor(due_only=True)
        if not self.ack_required:
            self._acknowledge(record.segment, record.end_offset)

    @property
    def cursor_pending(self) -> bool:
        """The sent cursor moved since its file was last written."""
        return self.files.cursor_pending

    def cursor_due_in(self) -> float:
        """Seconds until a pending cursor is due to be written (0: now)."""
        return self.files.cursor_due_in()

    def persist_cursor(self, *, due_only: bool = False) -> None:
        """Write the sent cursor if it moved (``SpoolFiles.persist_cursor``)."""
        self.files.persist_cursor(due_only=due_only)

    @property
    def sent_position(self) -> int:
        """Where the sent cursor is (``SpoolRecord.position`` of the last record sent)."""
        return position_of(self._commit_segment, self._commit_offset)

    @property
    def holds_nothing(self) -> bool:
        """No record on disk: the active segment is empty and every earlier one acknowledged (deleted)."""
        with self._cond:
            return self._active_size == 0 and self._acked_segment >= self._active and not self._memory

    @property
    def acked_position(self) -> int:
        return position_of(self._acked_segment, self._acked_offset)

    def ack(self, position: int) -> None:
        """Everything up to ``position`` (a ``SpoolRecord.position``) was audited: persist the acknowledged
        cursor, delete the segments wholly behind it (the active one too, once it is acknowledged and older
        than ``segment_max_age_s``)."""
        segment, offset = split_position(position)
        if (segment, offset) <= (self._acked_segment, self._acked_offset):
            return
        self.persist_cursor()  # the cursor file is never behind the acknowledged one (``open`` trusts that)
        self.files.write_acked(segment, offset)
        self._acknowledge(segment, offset)

    def _acknowledge(self, segment: int, offset: int) -> None:
        with self._cond:
            moved = segment != self._acked_segment
            self._acked_segment, self._acked_offset = segment, offset
            if (
                segment == self._active
                and offset >= self._active_size
                and self._active_expired()
                and not self._closed
            ):
                self._rotate()  # an idle account: its last, acknowledged frames go now
                moved = True
            active = self._active
        if not moved:
            return
        for number in self.files.segments_before(active):  # never the active segment
            if number < segment or (number == segment and self.files.size(number) <= offset):
                self.files.unlink(number)

    def expire_idle(self) -> bool:
        """An idle spool whose every record is acknowledged: once its active segment is older than
        ``segment_max_age_s``, rotate and delete it (no frame stays on disk longer than it must)."""
        with self._cond:
            if (self._acked_segment, self._acked_offset) != (self._active, self._active_size):
                return False
            if not self._active_expired() or self._closed:
                return False
            old = self._active
            self._rotate()
            self._acked_segment, self._acked_offset = self._active, 0
            if self._commit_segment == old and self._commit_offset >= self.files.size(old):
                self._commit_segment, self._commit_offset = self._active, 0
        self.files.write_acked(self._acked_segment, 0)
        self.files.unlink(old)
        return True

    def rewind(self) -> int:
        """Read again from the acknowledged position (a broker lost what it had); the records to re-send."""
        with self._cond:
            self._read_segment, self._read_offset = self._acked_segment, self._acked_offset
            self._commit_segment, self._commit_offset = self._acked_segment, self._acked_offset
            segments = [n for n in self.files.segments() if n >= self._acked_segment]
            self.backlog = self.files.count_records(segments, self._acked_segment, self._acked_offset)
            self._cond.notify_all()
            return self.backlog

    def over_retention(self) -> bool:
        return self.max_bytes is not None and self.disk_bytes() > self.max_bytes

    def give_up_oldest(self) -> int | None:
        """Over ``max_bytes``: acknowledge the oldest segment without its audit (it was sent, not
        acknowledged); the new acknowledged position, or None when no segment may go (unsent ones never)."""
        with self._cond:
            oldest = self._acked_segment
            if oldest >= self._commit_segment or oldest >= self._active:
                return None  # its records are not all sent yet
            segment, offset = oldest + 1, 0
        self.ack(position_of(segment, offset))
        return position_of(segment, offset)

    def disk_bytes(self) -> int:
        return self.files.disk_bytes()

    def close(self) -> None:
        self.persist_cursor()
        with self._cond:
            if self._memory:
                log.error(
                    "spool %s: closed with %d frame(s) that the full disk never took and Redis did not get"
                    " (the reconnect's reconciliation covers their effect)",
                    self.directory,
                    len(self._memory),
                )
            self._closed = True
            for fd in (self._active_fd, self._read_fd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._active_fd = self._read_fd = -1
            self._cond.notify_all()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
