"""The write-ahead log: every accepted message is here, fsynced, before it is acked.

`DATA_DIR/wal/<number>.wal` segments hold records in the protocol's framing
(length, CRC-32, payload). A position is (segment number, byte offset);
positions order records. Only the last segment can have a torn tail (a
segment is fsynced before the next one is opened), and recovery cuts it off.

Appends go through one dedicated writer thread doing group commit: it takes
everything queued since its last pass, writes it with one `write`, fsyncs
once, and hands the batch's tokens back to the event loop, which then acks.
A thread of our own beats aiofiles here: aiofiles hops to its thread pool
once per call and can fsync only what it wrote itself, while the writer
needs one hop per commit, however many records it covers. Measured by
`benchmarks/wal_append.py` (4 concurrent appenders, 2 kB records, each
awaited until durable): about 7,900 records/s and 19 µs of event-loop CPU per
record with the writer thread, against 1,260 records/s and 270 µs with
aiofiles.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from trackd.protocol import HEADER_BYTES, frame_record, iter_records

log = logging.getLogger("trackd.wal")

Position = tuple[int, int]
OnDurable = Callable[[list[tuple[object, Position]], Position], None]
SEGMENT_BYTES = 64 * 1024 * 1024
_SUFFIX = ".wal"
_RETRY_SECONDS = 1.0


class WriteAheadLog:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.durable_end: Position = self._recover()
        self._bytes = sum(self.path(number).stat().st_size for number in self.segments())
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._pending: list[tuple[bytes | None, object]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._fd = -1

    # --- recovery and reading ----------------------------------------------------

    def segments(self) -> list[int]:
        return sorted(int(path.stem) for path in self.directory.glob(f"*{_SUFFIX}"))

    def path(self, segment: int) -> Path:
        return self.directory / f"{segment:020d}{_SUFFIX}"

    def _recover(self) -> Position:
        """Cut a torn tail off the last segment; return where the next record goes."""
        segments = self.segments()
        if not segments:
            self.path(1).touch()
            return (1, 0)
        last = segments[-1]
        data = self.path(last).read_bytes()
        end = 0
        for end, _ in iter_records(data):  # noqa: B007 - the last record's end is the answer
            pass
        if end < len(data):
            log.warning("wal: cut a torn tail of %d bytes off segment %d", len(data) - end, last)
            os.truncate(self.path(last), end)
        return (last, end)

    @property
    def start(self) -> Position:
        return (self.segments()[0], 0)

    def read(self, start: Position, end: Position, max_bytes: int) -> list[tuple[Position, bytes]]:
        """Whole records in [start, end), about `max_bytes` of them, as (end position, payload).

        A start in a segment that retention or the disk budget has removed moves to the
        oldest segment still there: what was in between is gone (and was counted).
        """
        try:
            return self._read(start, end, max_bytes)
        except FileNotFoundError:  # removed while we were reading: start again from what is left
            return self._read(start, end, max_bytes)

    def _read(self, start: Position, end: Position, max_bytes: int) -> list[tuple[Position, bytes]]:
        first = self.segments()[0]
        segment, offset = start if start[0] >= first else (first, 0)
        if (segment, offset) >= end:
            return []
        if segment < end[0] and offset >= self.path(segment).stat().st_size:
            return self._read((self._next_segment(segment), 0), end, max_bytes)
        limit = end[1] if segment == end[0] else self.path(segment).stat().st_size
        with self.path(segment).open("rb") as handle:
            handle.seek(offset)
            data = handle.read(min(limit - offset, max(max_bytes, 1)))
        records = [((segment, offset + stop), payload) for stop, payload in iter_records(data)]
        if not records and data:  # one record larger than max_bytes
            with self.path(segment).open("rb") as handle:
                handle.seek(offset)
                data = handle.read(limit - offset)
            records = [((segment, offset + stop), payload) for stop, payload in iter_records(data)][
                :1
            ]
        return records

    def scan(self, start: Position) -> Iterator[tuple[Position, bytes]]:
        """Every durable record from `start` on, for rebuilding state at startup."""
        position = start
        while True:
            batch = self.read(position, self.durable_end, 8 * 1024 * 1024)
            if not batch:
                return
            yield from batch
            position = batch[-1][0]

    def _next_segment(self, segment: int) -> int:
        return min(number for number in self.segments() if number > segment)

    def count_between(self, start: Position, end: Position) -> int:
        """How many records lie in [start, end), by hopping from header to header."""
        first = self.segments()[0]
        position = start if start[0] >= first else (first, 0)
        count = 0
        for segment in [number for number in self.segments() if position[0] <= number <= end[0]]:
            offset = position[1] if segment == position[0] else 0
            try:
                with self.path(segment).open("rb") as handle:
                    limit = end[1] if segment == end[0] else os.fstat(handle.fileno()).st_size
                    while offset + HEADER_BYTES <= limit:
                        handle.seek(offset)
                        length = int.from_bytes(handle.read(4), "little")
                        offset += HEADER_BYTES + length
                        count += 1
            except FileNotFoundError:
                continue  # removed by retention while we counted
        return count

    def bytes_between(self, start: Position, end: Position) -> int:
        if start >= end:
            return 0
        if start[0] == end[0]:
            return end[1] - start[1]
        total = end[1] - start[1]
        for number in self.segments():
            if start[0] <= number < end[0]:
                total += self.path(number).stat().st_size
        return total

    def size(self) -> int:
        """Bytes on disk plus bytes queued for the next commit: what the disk budget weighs."""
        return self._bytes

    def remove(self, segment: int, records: bool = False) -> list[tuple[int, bytes]]:
        """Delete a closed segment; with `records`, return them as (end offset, payload).

        Only a segment dropped undelivered needs its records (to count what went); reading
        a 64 MiB segment just to delete it would double the daemon's memory for a moment.
        """
        if segment >= self.durable_end[0]:
            raise ValueError(f"wal: segment {segment} is still being written")
        path = self.path(segment)
        data = path.read_bytes() if records else b""
        size = path.stat().st_size
        path.unlink()
        with self._cond:
            self._bytes -= size
        return list(iter_records(data))

    # --- appending -----------------------------------------------------------------

    def start_writer(self, on_durable: OnDurable) -> None:
        """`on_durable(committed, end)` is called from the writer thread after each commit.

        `committed` pairs each token with the position just after its record (for a
        payload-less token, the position after the records before it).
        """
        segment, offset = self.durable_end
        self._fd = os.open(self.path(segment), os.O_WRONLY | os.O_APPEND)
        self._segment, self._offset = segment, offset
        self._thread = threading.Thread(
            target=self._write_loop, args=(on_durable,), name="trackd-wal", daemon=True
        )
        self._thread.start()

    def append(self, payload: bytes | None, token: object) -> None:
        """Queue a record; `payload=None` queues only a token, returned at the next commit."""
        with self._cond:
            self._pending.append((payload, token))
            if payload is not None:
                self._bytes += HEADER_BYTES + len(payload)
            self._cond.notify()

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write_loop(self, on_durable: OnDurable) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            records = [
                frame_record(payload) if payload is not None else b"" for payload, _ in batch
            ]
            data = b"".join(records)
            while not self._commit(data):
                time.sleep(_RETRY_SECONDS)
            segment, offset = self.durable_end
            offset -= len(data)
            committed = []
            for record, (_, token) in zip(records, batch, strict=True):
                offset += len(record)
                committed.append((token, (segment, offset)))
            on_durable(committed, self.durable_end)

    def _commit(self, data: bytes) -> bool:
        """Append and fsync; on failure (disk full, I/O error) undo the partial write and say so."""
        try:
            if data and self._offset and self._offset + len(data) > self.segment_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError as exc:
            self.last_error = f"wal: {exc}"
            log.error("wal: commit failed, retrying: %s", exc)
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError:
                log.exception("wal: could not undo a partial write")
            return False
        self._offset += len(data)
        self.last_error = None
        self.durable_end = (self._segment, self._offset)
        return True

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._segment += 1
        self._offset = 0
        self._fd = os.open(self.path(self._segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
