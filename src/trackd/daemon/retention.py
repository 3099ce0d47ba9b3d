"""Keeping the WAL within its time and disk budgets.

A segment every sink has passed (wholly before the lowest cursor) is
*delivered*. Delivered segments are kept for `retain` seconds, so that
`tail --since-start` and `replay` can read them, and then deleted. Over
`max_wal_bytes`, delivered segments go first, oldest first. If that is not
enough (a sink is stuck), `on_full` decides:

* ``block`` (the default): ingest stops accepting, so clients stop being acked
  and keep their data in their own memory and spool until the sinks catch up;
* ``drop_oldest``: the oldest segment goes even though a sink still needed it;
  its records are counted per sink that had not passed it, shown in status,
  and logged once per segment.

The ledger is checkpointed before any deletion, so a restart never needs a
deleted segment to know which sessions' messages it already holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from trackd.daemon.fanout import Fanout
from trackd.daemon.wal import Position, WriteAheadLog

log = logging.getLogger("trackd.retention")
CHECK_SECONDS = 0.5


@dataclass
class RetentionStats:
    blocked: bool = False
    deleted_segments: int = 0
    dropped_segments: int = 0
    dropped_records: int = 0
    dropped_rows: int = 0


class Retention:
    def __init__(
        self,
        wal: WriteAheadLog,
        fanout: Fanout,
        save_ledger: Callable[[], None],
        retain: float,
        max_bytes: int,
        on_full: str,
    ) -> None:
        self.wal = wal
        self.fanout = fanout
        self.stats = RetentionStats()
        self._save_ledger = save_ledger
        self._retain = retain
        self._max_bytes = max_bytes
        self._on_full = on_full

    @property
    def blocked(self) -> bool:
        """Checked on every message, so the budget holds to within one message."""
        return self._on_full == "block" and 0 < self._max_bytes < self.wal.size()

    def _oldest_needed(self) -> Position:
        cursors = [worker.cursor for worker in self.fanout.workers]
        return min(cursors) if cursors else self.wal.durable_end

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.enforce)
            await asyncio.sleep(CHECK_SECONDS)

    def enforce(self) -> None:
        """Delete what the budgets say must go; set or clear `blocked`."""
        wal = self.wal
        closed = [number for number in wal.segments() if number < wal.durable_end[0]]
        delivered = [number for number in closed if number < self._oldest_needed()[0]]
        cutoff = time.time() - self._retain
        expired = [n for n in delivered if wal.path(n).stat().st_mtime < cutoff]
        size = wal.size()
        doomed = set(expired)
        for number in delivered:
            if size - sum(wal.path(n).stat().st_size for n in doomed) <= self._max_bytes:
                break
            doomed.add(number)
        if doomed:
            self._save_ledger()
            for number in sorted(doomed):
                wal.remove(number)
                self.stats.deleted_segments += 1
            size = wal.size()
        over = bool(self._max_bytes) and size > self._max_bytes
        if over and self._on_full == "drop_oldest":
            undelivered = [number for number in closed if number not in doomed]
            for number in undelivered:
                if wal.size() <= self._max_bytes:
                    break
                self._drop(number)
            over = wal.size() > self._max_bytes
        blocked = over and self._on_full == "block"
        if blocked != self.stats.blocked:
            log.warning(
                "wal over its %d-byte budget: ingest %s",
                self._max_bytes,
                "blocked until the sinks catch up" if blocked else "resumed",
            )
        self.stats.blocked = blocked

    def _drop(self, segment: int) -> None:
        """Delete an undelivered segment, counting the records no sink holds yet."""
        self._save_ledger()
        behind = [w for w in self.fanout.workers if w.holding[0] <= segment]
        held = min((w.holding for w in behind), default=(segment + 1, 0))
        records = self.wal.remove(segment, records=True)
        lost = [payload for end, payload in records if (segment, end) > held]
        rows = 0
        for payload in lost:
            message = msgpack.unpackb(payload)
            if message["t"] == "metrics":
                rows += len(message["b"]["rows"])
        self.stats.dropped_segments += 1
        self.stats.dropped_records += len(lost)
        self.stats.dropped_rows += rows
        log.warning(
            "wal full (on_full=drop_oldest): dropped segment %d with %d records (%d rows) "
            "that %s had not delivered",
            segment,
            len(lost),
            rows,
            ", ".join(w.spec.shown for w in behind) or "no sink",
        )
