"""A durable, append-only, per-account spool: the write-ahead log between the WebSocket and Redis.

The user-data child appends every frame here *before* anything else happens to it; a sender thread
reads the spool in order and enqueues each record to Redis, then advances a persisted cursor. So:

- Redis down: records pile up on disk, receiving never waits for Redis; they are sent in order
  once Redis is back.
- The child dies (or is restarted): the next incarnation finds the segments and the cursor and
  sends what was not yet sent. Delivery is at-least-once (a crash between an enqueue and the
  cursor write re-sends a record); the job is idempotent by frame id, so this is harmless.

Layout (``<spool_dir>/<account_id>/``)::

    000000000007.seg   records, one per line (a JSON object, so it holds no raw newline)
    000000000008.seg   the active segment (the writer appends here)
    cursor             {"segment": 7, "offset": 1234}: everything before it was sent

The writer never appends to a segment written by an earlier process (a crash may have left a torn
last line there): ``open()`` always starts a new segment. The writer rotates to a new segment at
``segment_bytes``; the reader deletes a segment once the cursor moved past it, so a drained spool
holds at most one (partly filled) segment.

A record is written with one ``write()`` on an ``O_APPEND`` descriptor: it survives the process
being killed at any point. ``fsync=True`` also makes it survive power loss, at the price of one
fsync per record.

Thread-safety: one writer thread (``append``) and one reader thread (``read``/``commit``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Rotate the active segment once it is this big.
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
#: Read at most this many bytes from a segment at once.
READ_CHUNK_BYTES = 1024 * 1024
CURSOR_FILE = "cursor"
SEGMENT_SUFFIX = ".seg"
_SEGMENT_RE = re.compile(r"^(\d{12})\.seg$")


class SpoolError(RuntimeError):
    """The spool directory cannot be used (permissions, disk full...)."""


@dataclass(frozen=True)
class SpoolRecord:
    """One record and where the cursor goes once it is sent."""

    data: bytes
    segment: int
    #: Offset just past this record's newline.
    end_offset: int


def segment_name(number: int) -> str:
    return f"{number:012d}{SEGMENT_SUFFIX}"


class Spool:
    """Append records (bytes without newlines); read them back in order; commit what was sent."""

    def __init__(
        self, directory: str, *, fsync: bool = False, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._cond = threading.Condition(threading.Lock())
        # writer state
        self._active = 0
        self._active_fd = -1
        self._active_size = 0
        # reader state: the next record to hand out
        self._read_segment = 0
        self._read_offset = 0
        self._read_fd = -1
        self._read_fd_segment = -1
        # committed (persisted) position
        self._commit_segment = 0
        self._commit_offset = 0
        #: Records appended (or found at open) and not yet committed.
        self.backlog = 0
        #: Records dropped because they were unreadable (torn last line of a crashed writer).
        self.dropped = 0
        self._closed = False

    # -- setup -----------------------------------------------------------------------------------
    def open(self) -> Spool:
        """Recover segments and cursor left by an earlier process; start a fresh active segment."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e.strerror}") from None
        segments = self._segments()
        cursor = self._load_cursor()
        if cursor is not None and (not segments or cursor[0] >= segments[0]):
            self._commit_segment, self._commit_offset = cursor
        elif segments:
            self._commit_segment, self._commit_offset = segments[0], 0
        # segments wholly before the cursor were sent: remove them
        for number in segments:
            if number < self._commit_segment:
                self._unlink(number)
        segments = [n for n in segments if n >= self._commit_segment]
        self._read_segment, self._read_offset = self._commit_segment, self._commit_offset
        self.backlog = self._count_pending(segments)
        self._active = (segments[-1] + 1) if segments else max(self._commit_segment, 1)
        if not segments:
            self._read_segment, self._read_offset = self._active, 0
            self._commit_segment, self._commit_offset = self._active, 0
        self._open_active()
        if self.backlog:
            log.warning(
                "spool %s: %d records left by an earlier run, sending them first",
                self.directory,
                self.backlog,
            )
        return self

    def _segments(self) -> list[int]:
        found = []
        for name in os.listdir(self.directory):
            m = _SEGMENT_RE.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))

    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            with open(os.path.join(self.directory, CURSOR_FILE)) as f:
                data = json.load(f)
            return int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("spool %s: unreadable cursor, re-sending from the oldest segment", self.directory)
            return None

    def _count_pending(self, segments: list[int]) -> int:
        count = 0
        for number in segments:
            start = self._commit_offset if number == self._commit_segment else 0
            try:
                with open(self._path(number), "rb") as f:
                    f.seek(start)
                    for chunk in iter(lambda: f.read(READ_CHUNK_BYTES), b""):
                        count += chunk.count(b"\n")
            except OSError:
                pass
        return count

    def _open_active(self) -> None:
        path = self._path(self._active)
        try:
            self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolError(f"spool segment {path}: {e.strerror}") from None
        self._active_size = os.fstat(self._active_fd).st_size

    # -- writer ----------------------------------------------------------------------------------
    def append(self, record: bytes) -> None:
        """Write one record durably (see module doc); raises SpoolError when the disk refuses."""
        line = record + b"\n"
        with self._cond:
            if self._closed:
                raise SpoolError("spool is closed")
            if self._active_size >= self.segment_bytes:
                self._rotate()
            try:
                written = os.write(self._active_fd, line)
                while written < len(line):  # regular files write all at once; be correct anyway
                    written += os.write(self._active_fd, line[written:])
                if self.fsync:
                    os.fsync(self._active_fd)
            except OSError as e:
                raise SpoolError(f"cannot write spool {self.directory}: {e.strerror}") from None
            self._active_size += len(line)
            self.backlog += 1
            self._cond.notify_all()

    def _rotate(self) -> None:
        os.close(self._active_fd)
        self._active += 1
        self._open_active()

    # -- reader ----------------------------------------------------------------------------------
    def read(self, max_records: int = 256, timeout: float | None = None) -> list[SpoolRecord]:
        """The next records after the last ones read (not necessarily committed); waits up to ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                records = self._read_locked(max_records)
                if records or self._closed:
                    return records
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _read_locked(self, max_records: int) -> list[SpoolRecord]:
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
                self._read_fd = os.open(self._path(segment), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._read_fd = -1
        return self._read_fd

    def commit(self, record: SpoolRecord, count: int) -> None:
        """``count`` records up to and including ``record`` were sent: persist the cursor past them."""
        with self._cond:
            moved_segment = record.segment != self._commit_segment
            self._commit_segment, self._commit_offset = record.segment, record.end_offset
            self.backlog = max(0, self.backlog - count)
            active = self._active
        self._save_cursor(record.segment, record.end_offset)
        if moved_segment:  # segments wholly behind the cursor are done
            for number in self._segments_before(record.segment):
                if number < active:
                    self._unlink(number)

    def _segments_before(self, segment: int) -> list[int]:
        try:
            return [n for n in self._segments() if n < segment]
        except OSError:
            return []

    def _save_cursor(self, segment: int, offset: int) -> None:
        path = os.path.join(self.directory, CURSOR_FILE)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps({"segment": segment, "offset": offset}).encode())
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            # the records are sent; at worst the next run sends them again (idempotent by frame id)
            log.warning("spool %s: cannot save cursor: %s", self.directory, e.strerror)

    def _unlink(self, number: int) -> None:
        try:
            os.unlink(self._path(number))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("spool %s: cannot remove %s: %s", self.directory, segment_name(number), e.strerror)

    def disk_bytes(self) -> int:
        total = 0
        for number in self._segments():
            try:
                total += os.stat(self._path(number)).st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        with self._cond:
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
