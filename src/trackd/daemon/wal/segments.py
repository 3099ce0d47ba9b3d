"""Segment files: their names, buffered reads of their records, and what readers skip.

`DATA_DIR/wal/<number>.wal` segments hold records in the protocol's framing
(length, CRC-32, payload). A position is (segment number, byte offset);
positions order records. A damaged record (a flipped bit, a zeroed block) costs
only itself: readers skip it and resume at the next offset where a whole record
with a matching CRC holds a protocol envelope; the skip is logged once and
counted. Records that copy earlier ones (found by recovery at start) are skipped
by every reader.

`Segments` is shared by recovery, the writer and every reader. Recovery fills in
the copies once, before any other thread exists; after that they are only read.
Damaged stretches are noted by whichever reader meets them first, under a lock.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from trackd.protocol import HEADER_BYTES, ProtocolError, decode

log = logging.getLogger("trackd.wal")

Position = tuple[int, int]
SEGMENT_BYTES = 64 * 1024 * 1024
SUFFIX = ".wal"
DUPLICATE_SUFFIX = ".duplicate"
HEADER = struct.Struct("<II")
CHUNK_BYTES = 1 << 20
# Offsets where a header could start: a length of 1 B to 32 MiB has a little-endian top byte
# of 0 or 1 and is not zero. Resynchronising tests only these, in C, instead of every byte (a
# record over 32 MiB, possible only with `max_frame_bytes` raised, right after damage is
# skipped with it).
_MAP_STARTS = frozenset({bytes([code]) for code in (*range(0x80, 0x90), 0xDE, 0xDF)})
_CANDIDATE = re.compile(rb"(?=(?:[^\x00]..|.[^\x00].|..[^\x00])[\x00\x01]|...\x01)", re.DOTALL)


class Window:
    """Buffered reads of one segment file up to `limit`: most records are read from memory."""

    def __init__(self, fd: int, limit: int, chunk: int) -> None:
        self.fd, self.limit, self.chunk = fd, limit, max(chunk, HEADER_BYTES)
        self.base, self.data = 0, b""

    def get(self, offset: int, size: int) -> bytes:
        start = offset - self.base
        if start < 0 or start + size > len(self.data):
            self.base = offset
            self.data = os.pread(self.fd, min(max(size, self.chunk), self.limit - offset), offset)
            start = 0
        return self.data[start : start + size]

    def record_at(self, offset: int) -> bytes | None:
        """The payload of the whole, valid record at `offset`, or None.

        Length 0 is never valid: every payload the WAL stores is a protocol frame, and eight
        zero bytes (what a crash can leave in a file extended but not written) must not
        read as a record. No other cap on the length: `max_frame_bytes` may be raised
        above the protocol's default, and such frames are stored whole.
        """
        if offset + HEADER_BYTES > self.limit:
            return None
        length, crc = HEADER.unpack(self.get(offset, HEADER_BYTES))
        if length == 0 or offset + HEADER_BYTES + length > self.limit:
            return None
        payload = self.get(offset + HEADER_BYTES, length)
        return payload if zlib.crc32(payload) == crc else None

    def envelope_at(self, offset: int) -> bool:
        """A valid record holding a protocol envelope: where reading may resume after damage.

        The envelope check makes a false resynchronisation (a CRC matching by chance
        inside damaged bytes) practically impossible; it runs only while resynchronising,
        after a one-byte test (a payload starts with a MessagePack map) spares most
        candidates their CRC.
        """
        if offset + HEADER_BYTES >= self.limit:
            return False
        if self.get(offset + HEADER_BYTES, 1) not in _MAP_STARTS:
            return False
        payload = self.record_at(offset)
        if payload is None:
            return False
        try:
            decode(payload, max_bytes=len(payload))
        except ProtocolError:
            return False
        return True

    def resync(self, offset: int) -> int:
        """After a damaged record at `offset`: where the next valid record starts, or `limit`.

        Every plausible header offset after `offset` is tried in order, so an intact
        record right after the damaged one is never jumped over (a damaged length field
        can point anywhere, even at a later record).
        """
        start = offset + 1
        while start + HEADER_BYTES < self.limit:
            block = os.pread(self.fd, min(CHUNK_BYTES, self.limit - start), start)
            for match in _CANDIDATE.finditer(block):
                if self.envelope_at(start + match.start()):
                    return start + match.start()
            start += max(len(block) - HEADER_BYTES + 1, 1)
        return self.limit


def intact_records(path: Path) -> Iterator[bytes]:
    """The payload of every valid record in one file (a segment or a spool), in order, with
    damage skipped the way the WAL's readers skip it.

    For `trackd replay`, which reads a data directory it must leave as it is: no torn
    tail cut, no copy set aside, so it cannot go through `WriteAheadLog`.
    """
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        window = Window(handle.fileno(), size, CHUNK_BYTES)
        offset = 0
        while offset + HEADER_BYTES <= size:
            payload = window.record_at(offset)
            if payload is None:
                offset = window.resync(offset)
                continue
            yield payload
            offset += HEADER_BYTES + len(payload)


class Segments:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._damage_lock = threading.Lock()
        self._corrupt: dict[Position, int] = {}  # (segment, offset) of a damaged stretch -> bytes
        self.duplicates: dict[int, frozenset[int]] = {}  # segment -> offsets of copied records
        self.set_aside = 0  # records in copies set aside whole (renamed *.duplicate)

    def numbers(self) -> list[int]:
        return sorted(int(path.stem) for path in self.directory.glob(f"*{SUFFIX}"))

    def path(self, segment: int) -> Path:
        return self.directory / f"{segment:020d}{SUFFIX}"

    @property
    def start(self) -> Position:
        return (self.numbers()[0], 0)

    def records(
        self,
        fd: int,
        segment: int,
        offset: int,
        limit: int,
        sealed: bool,
        chunk: int = CHUNK_BYTES,
    ) -> Iterator[tuple[int, int, bytes]]:
        """Each valid record in [offset, limit) of a segment, as (start, end, payload).

        Damaged bytes are skipped up to the next valid record and noted. A damaged
        stretch that runs to `limit` is noted only in a `sealed` segment (`limit` is its
        size): at the end of the segment being written it may be a tail still to come.
        Copies of earlier records are included: `is_copy` tells them.
        """
        window = Window(fd, limit, chunk)
        position = offset
        while position < limit:
            known = self._corrupt.get((segment, position))
            if known is not None:
                position += known
                continue
            payload = window.record_at(position)
            if payload is None:
                after = window.resync(position)
                if after < limit or sealed:
                    self._note_damage(segment, position, after)
                if after == limit:
                    return
                position = after
                continue
            end = position + HEADER_BYTES + len(payload)
            yield position, end, payload
            position = end

    def all(self, segment: int) -> list[tuple[int, int, bytes]]:
        with self.path(segment).open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return list(self.records(handle.fileno(), segment, 0, size, sealed=False))

    def count(self, segment: int, limit: int) -> int:
        """Records readers would return in [0, limit) of a segment (neither damage nor copies)."""
        with self.path(segment).open("rb") as handle:
            records = self.records(handle.fileno(), segment, 0, limit, sealed=False)
            return sum(not self.is_copy(segment, start) for start, _, _ in records)

    def is_copy(self, segment: int, start: int) -> bool:
        """Whether the record at (segment, start) repeats an earlier one (recovery.py)."""
        return start in self.duplicates.get(segment, ())

    def _note_damage(self, segment: int, start: int, end: int) -> None:
        with self._damage_lock:
            if (segment, start) in self._corrupt:
                return
            self._corrupt[(segment, start)] = end - start
        log.warning(
            "wal: segment %d: skipped %d damaged bytes at offset %d (a corrupt record); "
            "reading resumes at offset %d",
            segment,
            end - start,
            start,
            end,
        )

    def damage(self) -> dict[str, int]:
        """What readers have skipped so far, for `trackd status`.

        A damaged stretch is usually one record (one flipped bit spoils one), but its
        framing cannot be trusted, so stretches and bytes are counted, not records.
        """
        with self._damage_lock:
            spans = dict(self._corrupt)
        return {
            "corrupt_spans": len(spans),
            "corrupt_bytes": sum(spans.values()),
            "duplicate_records": self.set_aside
            + sum(len(offsets) for offsets in self.duplicates.values()),
        }
