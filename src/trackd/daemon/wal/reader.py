"""Reading the WAL: whole records between two positions, damage and copies skipped.

One `Reader` per cursor (each sink worker's batcher has its own, and so does the
control socket's `wal` command); it runs in its caller's thread and keeps no
state between calls: the caller passes where to start and where to stop (the
ledger's published end, never the writer's durable end), and gets the records
and their end positions back. What it shares with the writer it only reads: the
segment files, `durable_end` (to tell a sealed segment) and the record numbers of
each segment (`base`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from trackd.daemon.wal.segments import Position, Segments
from trackd.daemon.wal.writer import Writer


class Reader:
    def __init__(self, segments: Segments, writer: Writer) -> None:
        self._segments = segments
        self._writer = writer

    def read(self, start: Position, end: Position, max_bytes: int) -> list[tuple[Position, bytes]]:
        """Whole records in [start, end), about `max_bytes` of them, as (end position, payload).

        A start in a segment that retention or the disk budget has removed moves to the
        oldest segment still there: what was in between is gone (and was counted).
        """
        try:
            return self._read(start, end, max_bytes)
        except FileNotFoundError:  # removed before or while we read: go on from what is left
            oldest = (self._segments.numbers()[0], 0)
            return self._read(max(start, oldest), end, max_bytes)

    def _read(self, start: Position, end: Position, max_bytes: int) -> list[tuple[Position, bytes]]:
        """The records from `start`, whose segment must exist: segments go oldest first, so
        a reader that keeps up never lists the directory (a listing cost a sink more than a
        small batch's whole read)."""
        segments = self._segments
        segment, offset = start
        budget = max(max_bytes, 1)
        records: list[tuple[Position, bytes]] = []
        while not records and (segment, offset) < end:
            with segments.path(segment).open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                limit = end[1] if segment == end[0] else size
                if offset < limit:
                    sealed = segment < self._writer.durable_end[0] and limit == size
                    chunk = min(budget, limit - offset)
                    for begin, stop, payload in segments.records(
                        handle.fileno(), segment, offset, limit, sealed, chunk
                    ):
                        if records and stop - offset > budget:
                            break
                        if not segments.is_copy(segment, begin):
                            records.append(((segment, stop), payload))
                    else:
                        offset = limit  # only damage or copies were left: go on past them
                    continue
            if segment >= end[0]:
                break
            segment, offset = self._next_segment(segment), 0
        return records

    def scan(self, start: Position, end: Position) -> Iterator[tuple[Position, bytes]]:
        """Every record from `start` up to `end`, for rebuilding state at startup."""
        position = start
        while True:
            batch = self.read(position, end, 8 * 1024 * 1024)
            if not batch:
                return
            yield from batch
            position = batch[-1][0]

    def _next_segment(self, segment: int) -> int:
        return min(number for number in self._segments.numbers() if number > segment)

    def base(self, segment: int) -> int:
        """How many records lie before `segment` (before the oldest one kept, if it is gone)."""
        bases, writer = self._writer.bases, self._writer
        found = bases.get(segment)
        if found is not None:
            return found
        kept = [number for number in self._segments.numbers() if number >= segment]
        return bases.get(kept[0], writer.durable_seq) if kept else writer.durable_seq

    def seq_at(self, position: Position) -> int:
        """How many records lie before `position`: counts at most one segment's records.

        For a sink's cursor, once when its worker starts; from then on the worker adds up
        what it reads.
        """
        segment, offset = position
        first = self._segments.start[0]
        if segment < first:
            return self.base(first)
        try:
            return self.base(segment) + self._segments.count(segment, offset)
        except FileNotFoundError:  # removed by retention meanwhile
            return self.base(self._segments.start[0])

    def bytes_between(self, start: Position, end: Position) -> int:
        if start >= end:
            return 0
        if start[0] == end[0]:
            return end[1] - start[1]
        total = end[1] - start[1]
        for number in self._segments.numbers():
            if start[0] <= number < end[0]:
                try:
                    total += self._segments.path(number).stat().st_size
                except FileNotFoundError:  # dropped by retention since the listing: not behind
                    continue
        return total
