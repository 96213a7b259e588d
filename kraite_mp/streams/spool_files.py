"""The files of one spool directory (``<spool_dir>/<account_id>/``) that ``streams.spool`` keeps::

    000000000007.seg   records, one per line (a JSON object, so it holds no raw newline)
    000000000008.seg   the active segment (the writer appends here)
    cursor             {"segment": 7, "offset": 1234, "epoch": "..."}: everything before it was sent
                       (to the broker whose epoch is named, see ``streams.sender``)
    acked              {"segment": 7, "offset": 1000}: everything before it was audited
    id                 this spool's random id (names its acknowledgement key in Redis)

The small files are replaced atomically; the sent cursor is written at most every ``CURSOR_PERSIST_S``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: Read at most this many bytes from a segment at once.
READ_CHUNK_BYTES = 1024 * 1024
CURSOR_FILE = "cursor"
ACKED_FILE = "acked"
ID_FILE = "id"
#: While records flow, the sent cursor is written at most this often (a crash re-sends at most this much).
CURSOR_PERSIST_S = 1.0
SEGMENT_SUFFIX = ".seg"
_SEGMENT_RE = re.compile(r"^(\d{12})\.seg$")


class SpoolError(RuntimeError):
    """The spool directory cannot be used (permissions, disk full...)."""


def segment_name(number: int) -> str:
    return f"{number:012d}{SEGMENT_SUFFIX}"


class SpoolFiles:
    """A spool directory's segments (by number) and its cursor, acked and id files."""

    def __init__(self, directory: str, *, fsync: bool = False) -> None:
        self.directory = directory
        #: fsync the small files before renaming them over the old ones.
        self.fsync = fsync
        #: The sent cursor not yet written to ``CURSOR_FILE`` (None: the file is up to date), and when the
        #: file was last written (monotonic).
        self._cursor_pending: bytes | None = None
        self._cursor_written_at = -1e9
        self._cursor_lock = threading.Lock()

    # -- segments --------------------------------------------------------------------------------
    def path(self, number: int) -> str:
        return os.path.join(self.directory, segment_name(number))

    def segments(self) -> list[int]:
        found = []
        for name in os.listdir(self.directory):
            m = _SEGMENT_RE.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def segments_before(self, segment: int) -> list[int]:
        try:
            return [n for n in self.segments() if n < segment]
        except OSError:
            return []

    def size(self, number: int) -> int:
        try:
            return os.stat(self.path(number)).st_size
        except OSError:
            return 0

    def unlink(self, number: int) -> None:
        try:
            os.unlink(self.path(number))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("spool %s: cannot remove %s: %s", self.directory, segment_name(number), e.strerror)

    def disk_bytes(self) -> int:
        total = 0
        for number in self.segments():
            try:
                total += os.stat(self.path(number)).st_size
            except OSError:
                pass
        return total

    def count_records(self, segments: list[int], segment: int, offset: int) -> int:
        """Records in ``segments`` from ``offset`` of ``segment`` on (one newline each)."""
        count = 0
        for number in segments:
            if number < segment:
                continue
            start = offset if number == segment else 0
            try:
                with open(self.path(number), "rb") as f:
                    f.seek(start)
                    for chunk in iter(lambda: f.read(READ_CHUNK_BYTES), b""):
                        count += chunk.count(b"\n")
            except OSError:
                pass
        return count

    # -- the small files -------------------------------------------------------------------------
    def load_id(self) -> str:
        """This spool's id; a new random one (written) if it has none yet."""
        path = os.path.join(self.directory, ID_FILE)
        try:
            with open(path, "rb") as f:
                found = f.read(64).decode("ascii", "replace").strip()
            if re.fullmatch(r"[0-9a-f]{16,64}", found):
                return found
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SpoolError(f"spool {self.directory}: cannot read its id: {e.strerror}") from None
        spool_id = os.urandom(8).hex()
        self.write(ID_FILE, spool_id.encode())
        return spool_id

    def load_cursor(self) -> tuple[int, int, str] | None:
        """The sent cursor (segment, offset, epoch); None: none, or unreadable."""
        data = self._load_json(CURSOR_FILE)
        if data is None:
            return None
        try:
            epoch = data.get("epoch", "")
            return int(data["segment"]), int(data["offset"]), epoch if isinstance(epoch, str) else ""
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("spool %s: unreadable cursor, re-sending from the oldest segment", self.directory)
            return None

    def load_acked(self) -> tuple[int, int] | None:
        """The acknowledged position (segment, offset); None: none, or unreadable."""
        data = self._load_json(ACKED_FILE)
        if data is None:
            return None
        try:
            return int(data["segment"]), int(data["offset"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("spool %s: unreadable %s file, keeping every segment", self.directory, ACKED_FILE)
            return None

    def _load_json(self, name: str) -> Any:
        try:
            with open(os.path.join(self.directory, name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("spool %s: unreadable %s file", self.directory, name)
            return None

    def write_acked(self, segment: int, offset: int) -> None:
        self.write(ACKED_FILE, json.dumps({"segment": segment, "offset": offset}).encode(), quiet=True)

    def write(self, name: str, data: bytes, *, quiet: bool = False) -> None:
        """Replace ``name`` atomically (fsync'd with ``fsync``); ``quiet``: a failure is only logged
        (a cursor that cannot be saved costs a re-send, never a loss)."""
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            if not quiet:
                raise SpoolError(f"spool {self.directory}: cannot write {name}: {e.strerror}") from None
            log.warning("spool %s: cannot save %s: %s", self.directory, name, e.strerror)

    # -- the sent cursor, written at most every CURSOR_PERSIST_S ---------------------------------
    def stage_cursor(self, segment: int, offset: int, epoch: str) -> None:
        """The sent cursor moved: ``persist_cursor`` writes it."""
        payload: dict[str, object] = {"segment": segment, "offset": offset}
        if epoch:
            payload["epoch"] = epoch
        with self._cursor_lock:
            self._cursor_pending = json.dumps(payload).encode()

    @property
    def cursor_pending(self) -> bool:
        """The sent cursor moved since ``CURSOR_FILE`` was last written."""
        return self._cursor_pending is not None

    def cursor_due_in(self) -> float:
        """Seconds until a pending cursor is due to be written (0: now)."""
        return max(0.0, self._cursor_written_at + CURSOR_PERSIST_S - time.monotonic())

    def persist_cursor(self, *, due_only: bool = False) -> None:
        """Write the sent cursor if it moved; ``due_only``: only if the last write is ``CURSOR_PERSIST_S``
        old. A failure is only logged (a cursor that cannot be saved costs a re-send, never a loss)."""
        with self._cursor_lock:
            data = self._cursor_pending
            if data is None:
                return
            now = time.monotonic()
            if due_only and now - self._cursor_written_at < CURSOR_PERSIST_S:
                return
            self._cursor_pending = None
            self._cursor_written_at = now
            self.write(CURSOR_FILE, data, quiet=True)
