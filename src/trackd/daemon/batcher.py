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
        self.reader = wal.reader()  # one per cursor: a batcher serves one sink worker
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.max_records = max_records

    def read(
        self, start: Position, start_seq: int, end: Position, max_rows: int
    ) -> tuple[list[Record], Position, int]:
        """The records after `start` (up to `end`), the position after the last one read,
        and how many records lie before that position (`start_seq` lie before `start`).

        A batch also stops once it holds `max_rows` metric rows (the sink's `batch_rows`),
        so that a slow sink still moves its cursor every few seconds.
        """
        raw = self.reader.read(start, end, self.max_bytes)[: self.max_records]
        records: list[Record] = []
        rows = 0
        after, seq, segment = start, start_seq, start[0]
        for position, payload in raw:
            if rows >= max_rows:
                break
            message = msgpack.unpackb(payload)  # validated when it was accepted
            if position[0] != segment:  # a new segment, or a jump past removed ones
                segment, seq = position[0], self.reader.base(position[0])
            after, seq = position, seq + 1
            if message["t"] not in INTERNAL_TYPES:
                run = self.ledger.info(message["r"])
                records.append(Record(position, message["t"], run, message["b"]))
                if message["t"] == "metrics":
                    rows += len(message["b"]["rows"])
        return records, after, seq
