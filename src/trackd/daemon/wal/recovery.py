"""Opening a WAL: copied segments set aside, the torn tail cut, segments counted.

Runs once, at start, in the thread that opens the WAL, before the writer or any
reader exists; what it finds is handed to them (`Recovered`) and not changed by
it again.

Only the last segment can have a torn tail (a segment is fsynced before the next
one is opened), and recovery cuts exactly that: bytes after the last valid
record of the last segment, never valid records after a damaged one.

Every (session, sequence) is stored once by ingest, so a record met twice can
only be a copy made outside the daemon (a backup restored as a new segment).
Segments that begin with the same record are compared: a copy made wholly of
records already in its original is set aside (renamed `*.duplicate`), and a
partial copy's repeated records are skipped by every reader.

Records are numbered so that a sink's lag in records is a subtraction: the count
of every sealed segment is kept in `counts.json` (written by the writer at each
rotation); a segment missing there, or whose size changed, is counted here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from trackd.daemon.wal.segments import DUPLICATE_SUFFIX, Position, Segments, Window
from trackd.jsonfile import read_json, write_json_atomic

log = logging.getLogger("trackd.wal")
COUNTS_FILE = "counts.json"


@dataclass
class Recovered:
    durable_end: Position
    last_records: int  # records in the last segment
    counts: dict[int, tuple[int, int]]  # sealed segment -> (records, bytes)
    bases: dict[int, int]  # segment -> records before it


def recover(segments: Segments) -> Recovered:
    _set_aside_copies(segments)
    durable_end, last_records = _cut_torn_tail(segments)
    counts, bases = _number(segments, durable_end[0])
    return Recovered(durable_end, last_records, counts, bases)


def _cut_torn_tail(segments: Segments) -> tuple[Position, int]:
    """Where the next record goes, and how many records the last segment holds."""
    numbers = segments.numbers()
    if not numbers:
        segments.path(1).touch(mode=0o600)
        return (1, 0), 0
    last = numbers[-1]
    path = segments.path(last)
    end = count = 0
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for start, stop, _ in segments.records(handle.fileno(), last, 0, size, sealed=False):
            end = stop
            count += not segments.is_copy(last, start)
    if end < size:
        log.warning("wal: cut a torn tail of %d bytes off segment %d", size - end, last)
        os.truncate(path, end)
    return (last, end), count


def _number(segments: Segments, last: int) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    saved = _load_counts(segments)
    counts: dict[int, tuple[int, int]] = {}
    bases: dict[int, int] = {}
    total = 0
    counted = False
    for segment in segments.numbers():
        bases[segment] = total
        if segment == last:
            break
        size = segments.path(segment).stat().st_size
        known = saved.get(segment)
        if known is None or known[1] != size:
            known = (segments.count(segment, size), size)
            counted = True
        counts[segment] = known
        total += known[0]
    if counted:
        save_counts(segments, counts)
    return counts, bases


def save_counts(segments: Segments, counts: dict[int, tuple[int, int]]) -> None:
    document = {str(segment): list(known) for segment, known in dict(counts).items()}
    write_json_atomic(segments.directory / COUNTS_FILE, document)


def _load_counts(segments: Segments) -> dict[int, tuple[int, int]]:
    """`counts.json` as {segment: (records, bytes)}; unreadable, it is only recounted."""
    path = segments.directory / COUNTS_FILE
    try:
        saved = read_json(path)
        return {int(segment): (int(known[0]), int(known[1])) for segment, known in saved.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        log.warning("wal: %s unreadable (%s): segments are counted again", path.name, exc)
        return {}


def _set_aside_copies(segments: Segments) -> None:
    """Find segments that copy another (same first record) and keep their copies unread.

    Only the first record of each segment is read here, so opening stays cheap; a
    pair is compared record by record only when their first records match. The
    later segment in WAL order holds the copies, whichever file was the original,
    so every record is read once. A copy starting at another record than its
    original's first, or whose original is gone, is not recognised.
    """
    firsts: dict[bytes, int] = {}
    for segment in segments.numbers():
        with segments.path(segment).open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            first = Window(handle.fileno(), size, 4096).record_at(0)
        if first is None:
            continue
        original = firsts.setdefault(hashlib.sha256(first).digest(), segment)
        if original != segment:
            _find_copies(segments, original, segment)


def _find_copies(segments: Segments, original: int, segment: int) -> None:
    seen = {hashlib.sha256(payload).digest() for _, _, payload in segments.all(original)}
    records = segments.all(segment)
    copies = [start for start, _, payload in records if hashlib.sha256(payload).digest() in seen]
    path = segments.path(segment)
    if len(copies) == len(records):
        os.replace(path, path.with_name(path.name + DUPLICATE_SUFFIX))
        segments.set_aside += len(copies)
        log.warning(
            "wal: segment %d holds only copies of records in segment %d (a restored "
            "backup?): set aside as %s",
            segment,
            original,
            path.name + DUPLICATE_SUFFIX,
        )
    else:
        segments.duplicates[segment] = frozenset(copies)
        log.warning(
            "wal: segment %d repeats %d records of segment %d; they are skipped",
            segment,
            len(copies),
            original,
        )
