"""Fan-out: one worker per sink, each at its own pace.

A worker owns a `Delivery` (its sink, the thread the sink's calls run in, the
retry and dead-letter policy) and a durable cursor into the WAL. It loops:
wait for records past its cursor, let a batch fill for `linger` seconds, read
it, deliver it, advance.

The cursor and the sink's `checkpoint()` state are saved together, atomically,
at most every `checkpoint_seconds` (every `TRICKLE_SAVE_SECONDS` while records
trickle) and at close: replaying from an older cursor is safe, because sinks
are idempotent from their checkpoint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trackd.daemon.batcher import Batcher
from trackd.daemon.delivery import UNTRIED, Delivery, Untried, load_progress
from trackd.daemon.ledger import Ledger
from trackd.daemon.state import StateDamage
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.sinks.base import Record, SinkContext

DAMAGED_TAIL_POLL_SECONDS = 0.1
TRICKLE_RECORDS = 64
TRICKLE_SAVE_SECONDS = 10.0


def save_due(elapsed: float, delivered: int, checkpoint_seconds: float) -> bool:
    """Whether a sink saves its cursor, `elapsed` s and `delivered` records after its last save.

    A save costs the sink its checkpoint (fsyncs), and what it buys is how little a crash
    makes the sink write again. So a stream saves every `checkpoint_seconds`, and a
    trickle (fewer than `TRICKLE_RECORDS` records since the last save, such as the system
    sampler's few messages a second) every `TRICKLE_SAVE_SECONDS`: a crash then makes
    the sink write a few records again, where saving every half second cost a daemon
    sampling 4 runs at 1 s a tenth of its sampling CPU.
    """
    if elapsed < checkpoint_seconds:
        return False
    return delivered >= TRICKLE_RECORDS or elapsed >= TRICKLE_SAVE_SECONDS


class SinkWorker:
    def __init__(
        self,
        delivery: Delivery,
        batcher: Batcher,
        state_dir: Path,
        linger: float,
        checkpoint_seconds: float,
        damage: StateDamage | None = None,
    ) -> None:
        self.delivery = delivery
        self.spec = delivery.spec
        self.batcher = batcher
        self.wal: WriteAheadLog = batcher.wal
        # Read up to `ledger.position`, not the WAL's durable end: the ledger's owner moves
        # it only once the ledger knows every run before it (ingest.py).
        self.ledger: Ledger = batcher.ledger
        self.cursor: Position = self.wal.start
        self.cursor_seq = self.wal.base(self.cursor[0])  # records before the cursor
        self.holding: Position = self.cursor  # the end of the batch in hand, being delivered
        self._state_dir = state_dir
        self._cursor_path = state_dir / "cursor.json"
        self._linger = linger
        self._checkpoint_seconds = checkpoint_seconds
        self._wake = asyncio.Event()
        self._drain_until: Position | None = None
        self._saved_at = 0.0
        self._saved_seq = self.cursor_seq
        self._damage = damage

    # --- control from the fan-out -----------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def drain(self, until: Position) -> None:
        """Deliver up to `until`, then return from `run()`."""
        self._drain_until = until
        self._wake.set()

    def stop(self) -> None:
        """Stop now, even mid-retry."""
        self.delivery.stopped.set()
        self._wake.set()

    @property
    def caught_up(self) -> bool:
        return self.cursor >= self.ledger.position

    def status(self) -> dict[str, Any]:
        stats = self.delivery.stats
        behind = stats.behind_since
        return {
            "spec": self.spec.shown,
            **asdict(stats),
            "cursor": list(self.cursor),
            "lag_bytes": self.wal.bytes_between(self.cursor, self.ledger.position),
            "lag_records": max(0, self.ledger.seq - self.cursor_seq),
            "lag_seconds": 0.0 if behind is None else round(time.time() - behind, 3),
            "notices": self.delivery.sink.notice_counts(),
            "concurrency": self.delivery.sink.concurrency(),
        }

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        delivery, stats = self.delivery, self.delivery.stats
        saved = load_progress(self._cursor_path, self._damage)
        if "position" in saved:
            self.cursor = self.holding = max(tuple(saved["position"]), self.wal.start)
            self.cursor_seq = await delivery.call(self.wal.seq_at, self.cursor)
            self._saved_seq = self.cursor_seq
        try:
            if not await delivery.open(SinkContext(saved.get("state"), self._state_dir)):
                return
            full = False
            while not delivery.stopped.is_set():
                if self.cursor >= self.ledger.position:
                    stats.behind_since = None
                    await self._save_if_due()
                    if self._drain_until is not None and self.cursor >= self._drain_until:
                        return
                    self._wake.clear()
                    if self.cursor >= self.ledger.position:
                        await self._wake.wait()
                    continue
                if stats.behind_since is None:
                    stats.behind_since = time.time()
                if not full and self._linger and self._drain_until is None:
                    await asyncio.sleep(self._linger)  # a few ms: a stop need not cut it short
                records, end, end_seq, first = await delivery.call(
                    self._read_and_attempt, self.cursor, self.cursor_seq, self.ledger.position
                )
                if end == self.cursor:
                    # Only damaged bytes past the cursor for now (wal/segments.py): readers get past
                    # them once a valid record follows, so look again later, without spinning.
                    await delivery.sleep(max(self._linger, DAMAGED_TAIL_POLL_SECONDS))
                    continue
                full = self.wal.bytes_between(end, self.ledger.position) > 0
                self.holding = end
                if records and not await delivery.deliver(records, first):
                    return
                self.cursor, self.cursor_seq = end, end_seq
                await self._save_if_due()
        finally:
            await delivery.close(self._cursor_path, self._progress)

    def _read_and_attempt(
        self, start: Position, start_seq: int, until: Position
    ) -> tuple[list[Record], Position, int, Exception | Untried | None]:
        """On the sink's thread: the next batch, and the outcome of a first write of it."""
        records, end, end_seq = self.batcher.read(
            start, start_seq, until, self.delivery.sink.batch_rows
        )
        first = self.delivery.attempt(records) if records else UNTRIED
        return records, end, end_seq, first

    def _progress(self) -> dict[str, Any]:
        return {"position": list(self.cursor)}

    async def _save_if_due(self) -> None:
        """Save the cursor now and then; a failed save (a full disk) is retried at the next."""
        now = time.monotonic()
        delivered = self.cursor_seq - self._saved_seq
        if save_due(now - self._saved_at, delivered, self._checkpoint_seconds):
            self._saved_at, self._saved_seq = now, self.cursor_seq
            try:
                await self.delivery.call(self.delivery.save, self._cursor_path, self._progress())
            except OSError as exc:
                stats = self.delivery.stats
                stats.last_error, stats.last_error_at = f"saving the cursor: {exc}", time.time()


class Fanout:
    def __init__(self, workers: list[SinkWorker]) -> None:
        self.workers = workers
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(worker.run()) for worker in self.workers]

    def wake(self, _end: Position | None = None) -> None:
        for worker in self.workers:
            worker.wake()

    async def wait_caught_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(worker.caught_up for worker in self.workers):
                return True
            await asyncio.sleep(0.02)
        return all(worker.caught_up for worker in self.workers)

    async def drain(self, until: Position, timeout: float) -> None:
        """Let every sink deliver up to `until` within `timeout`, then stop them all."""
        for worker in self.workers:
            worker.drain(until)
        _, pending = await asyncio.wait(self._tasks, timeout=timeout) if self._tasks else ((), ())
        for worker in self.workers:
            worker.stop()
        if pending:
            await asyncio.wait(pending, timeout=10)
