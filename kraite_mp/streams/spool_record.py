"""A record read from the spool (``streams.spool``), and positions: where a record ends in the spool's
segments, as one number that grows with every record (what the cursors and acknowledgements compare).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``SpoolRecord.segment`` of a record that waited in memory (the disk refused it).
MEMORY_SEGMENT = -1
#: Bits of a record's end offset in its position (``SpoolRecord.position``).
POSITION_OFFSET_BITS = 40


@dataclass(frozen=True)
class SpoolRecord:
    """One record and where the cursor goes once it is sent."""

    data: bytes
    segment: int
    #: Offset just past this record's newline.
    end_offset: int

    @property
    def in_memory(self) -> bool:
        """Held in memory while the disk refused writes: sent, never acknowledged nor replayed."""
        return self.segment == MEMORY_SEGMENT

    @property
    def position(self) -> int:
        """Where this record ends, as one number that grows with every record of this spool."""
        return (self.segment << POSITION_OFFSET_BITS) | self.end_offset


def position_of(segment: int, offset: int) -> int:
    return (segment << POSITION_OFFSET_BITS) | offset


def split_position(position: int) -> tuple[int, int]:
    """The (segment, offset) of a position: ``position_of`` undone."""
    return position >> POSITION_OFFSET_BITS, position & ((1 << POSITION_OFFSET_BITS) - 1)
