"""A data directory holding a large WAL backlog, written straight to segment files.

Logging a million messages through a client takes minutes on a shared machine; a
backlog for `trackd status` to be measured or tested against only needs valid
records and a ledger checkpoint that knows the run. Segments are cut the way the
WAL cuts them (a record never straddles two), in the WAL's own record framing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from trackd.daemon.ledger import Ledger
from trackd.protocol import encode, frame_record

SEGMENT_BYTES = 64 * 1024 * 1024
SESSION = "backlog-session"
RUN = "backlog-run"


def write_backlog(data_dir: Path, records: int, segment_bytes: int = SEGMENT_BYTES) -> int:
    """A run_start and `records - 1` one-row metrics messages; returns the segments written."""
    wal = data_dir / "wal"
    wal.mkdir(parents=True, exist_ok=True)
    start = {"project": "backlog", "name": "big", "started": time.time(), "config": {}}
    first = {"v": 1, "s": SESSION, "q": 1, "t": "run_start", "r": RUN, "b": start}
    ledger = Ledger()
    ledger.apply(first)
    segment, chunks, size = 1, [frame_record(encode(first))], 0
    size = len(chunks[0])
    for seq in range(2, records + 1):
        row = [seq, 1.0, {"loss": 1.0 / seq}]
        message = {"v": 1, "s": SESSION, "q": seq, "t": "metrics", "r": RUN, "b": {"rows": [row]}}
        record = frame_record(encode(message))
        if size + len(record) > segment_bytes:
            _write(wal, segment, chunks)
            segment, chunks, size = segment + 1, [], 0
        chunks.append(record)
        size += len(record)
    _write(wal, segment, chunks)
    ledger.sessions[SESSION] = records
    ledger.runs[RUN]["rows"] = records - 1
    ledger.position = (segment, size)
    Ledger.save(ledger.snapshot(), data_dir / "ledger.msgpack")
    return segment


def _write(wal: Path, segment: int, chunks: list[bytes]) -> None:
    path = wal / f"{segment:020d}.wal"
    path.write_bytes(b"".join(chunks))
    os.chmod(path, 0o600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("records", type=int)
    arguments = parser.parse_args()
    print(write_backlog(arguments.data_dir, arguments.records))
