"""Reading a sink's next batch out of the WAL.

Kept apart from delivery (the sink worker) and from appending (the WAL): the
batcher only knows how to cut the log after a cursor into batches bounded by
bytes and records, and how to turn stored frames into the `Record`s sinks see.
It runs in the sink's worker thread, so decoding never holds up the event loop.
"""

from __future__ import annotations

import msgpack

from trackd.daemon.ledger import Ledger
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import INTERNAL_TYPES
from trackd.sinks.base import Record

MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_BATCH_RECORDS = 2000


class Batcher:
    def __init__(
        self,
        wal: WriteAheadLog,
        ledger: Ledger,
        max_bytes: int = MAX_BATCH_BYTES,
        max_records: int = MAX_BATCH_RECORDS,
    ) -> None:
        self.wal = wal
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.max_records = max_records

    def read(self, start: Position, end: Position) -> tuple[list[Record], Position]:
        """The records after `start` (up to `end`), and the position after the last one read."""
        raw = self.wal.read(start, end, self.max_bytes)[: self.max_records]
        records = []
        for position, payload in raw:
            message = msgpack.unpackb(payload)  # validated when it was accepted
            if message["t"] not in INTERNAL_TYPES:
                run = self.ledger.info(message["r"])
                records.append(Record(position, message["t"], run, message["b"]))
        return records, (raw[-1][0] if raw else start)
