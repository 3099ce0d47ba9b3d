"""The write-ahead log: every accepted message is here, fsynced, before it is acked.

Split along its threads, each part with one owner (see also daemon/__init__.py):

* `segments.py`: the segment files, buffered reads of their records, and what
  readers skip (damaged stretches, copied records);
* `recovery.py`: at start, before any other thread: copied segments set aside,
  the torn tail cut, sealed segments counted;
* `writer.py`: the writer thread, the only appender (group commit);
* `reader.py`: reads between two positions, one reader per cursor.

`WriteAheadLog` ties them together for the daemon: it opens (recovers) the
directory, and hands out the writer's calls and readers.

Records are numbered: `durable_seq` is how many records lie before
`durable_end`, and `base(segment)` how many lie before a segment, so a sink's
lag in records is a subtraction, whatever the backlog. Numbers start at 0 with
the oldest segment at each start; they are never stored with a cursor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from trackd.daemon.wal.reader import Reader
from trackd.daemon.wal.recovery import COUNTS_FILE, recover
from trackd.daemon.wal.segments import SEGMENT_BYTES, Position, Segments, intact_records
from trackd.daemon.wal.writer import OnDurable, Writer

__all__ = [
    "COUNTS_FILE",
    "SEGMENT_BYTES",
    "OnDurable",
    "Position",
    "Reader",
    "WriteAheadLog",
    "intact_records",
]


class WriteAheadLog:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.files = Segments(directory)
        self.writer = Writer(self.files, recover(self.files), segment_bytes)
        self._reader = self.reader()

    def reader(self) -> Reader:
        """A reader of its own, for one cursor."""
        return Reader(self.files, self.writer)

    # --- what the writer publishes ----------------------------------------------------

    @property
    def durable_end(self) -> Position:
        return self.writer.durable_end

    @property
    def durable_seq(self) -> int:
        return self.writer.durable_seq

    @property
    def last_error(self) -> str | None:
        return self.writer.last_error

    @property
    def segment_bytes(self) -> int:
        return self.writer.segment_bytes

    @segment_bytes.setter
    def segment_bytes(self, value: int) -> None:
        self.writer.segment_bytes = value

    def size(self) -> int:
        return self.writer.size()

    # --- appending (the writer thread) ------------------------------------------------

    def start_writer(self, on_durable: OnDurable) -> None:
        self.writer.start(on_durable)

    def append(self, payload: bytes | None, token: object) -> None:
        self.writer.append(payload, token)

    def close(self) -> None:
        self.writer.close()

    # --- segments and reading -----------------------------------------------------------

    def segments(self) -> list[int]:
        return self.files.numbers()

    def path(self, segment: int) -> Path:
        return self.files.path(segment)

    @property
    def start(self) -> Position:
        return self.files.start

    def damage(self) -> dict[str, int]:
        return self.files.damage()

    def read(self, start: Position, end: Position, max_bytes: int) -> list[tuple[Position, bytes]]:
        return self._reader.read(start, end, max_bytes)

    def scan(self, start: Position) -> Iterator[tuple[Position, bytes]]:
        """Every durable record from `start` on, for rebuilding state at startup."""
        return self._reader.scan(start, self.durable_end)

    def base(self, segment: int) -> int:
        return self._reader.base(segment)

    def seq_at(self, position: Position) -> int:
        return self._reader.seq_at(position)

    def bytes_between(self, start: Position, end: Position) -> int:
        return self._reader.bytes_between(start, end)

    def remove(self, segment: int, records: bool = False) -> list[tuple[int, bytes]]:
        """Delete a closed segment; with `records`, return them as (end offset, payload).

        Only a segment dropped undelivered needs its records (to count what went); reading
        a 64 MiB segment just to delete it would double the daemon's memory for a moment.
        """
        if segment >= self.durable_end[0]:
            raise ValueError(f"wal: segment {segment} is still being written")
        path = self.path(segment)
        kept = [
            (stop, payload)
            for begin, stop, payload in (self.files.all(segment) if records else [])
            if not self.files.is_copy(segment, begin)
        ]
        size = path.stat().st_size
        path.unlink()
        self.writer.removed(segment, size)
        return kept
