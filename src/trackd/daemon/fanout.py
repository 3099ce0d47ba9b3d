"""Fan-out: one worker per sink, each at its own pace.

A worker owns its sink, a single thread the sink's calls run in (SDKs block;
a slow or hung sink then holds only its own thread), and a durable cursor
into the WAL. It loops: wait for records past its cursor, let a batch fill
for `linger` seconds, read it, deliver it, advance. A retriable error is
retried with exponential backoff and full jitter (capped); the stop event
cuts a wait short. A permanent error on a batch is retried record by record,
and the records that still fail go to the dead-letter file with the reason.

The cursor and the sink's `checkpoint()` state are saved together, atomically,
at most every `checkpoint_seconds` and at close: replaying from an older
cursor is safe, because sinks are idempotent from their checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from trackd.daemon.batcher import Batcher
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.sinks.base import Record, Sink, SinkContext, SinkError, SinkSpec

log = logging.getLogger("trackd.fanout")
UNMAPPED_RETRIES = 5
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a uniform wait in [0, min(cap, base * 2**attempt)]."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 32)))


@dataclass
class SinkStats:
    delivered_records: int = 0
    delivered_rows: int = 0
    retries: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_success: float | None = None
    behind_since: float | None = None


class SinkWorker:
    def __init__(
        self,
        spec: SinkSpec,
        sink: Sink,
        batcher: Batcher,
        state_dir: Path,
        dead_letter_path: Path,
        backoff: Backoff,
        linger: float,
        checkpoint_seconds: float,
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.batcher = batcher
        self.wal: WriteAheadLog = batcher.wal
        self.stats = SinkStats()
        self.cursor: Position = self.wal.start
        self._state_dir = state_dir
        self._cursor_path = state_dir / "cursor.json"
        self._dead_letter_path = dead_letter_path
        self._backoff = backoff
        self._linger = linger
        self._checkpoint_seconds = checkpoint_seconds
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"trackd-{spec.kind}")
        self._rng = random.Random()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._drain_until: Position | None = None
        self._saved_at = 0.0
        self._opened = False
        self._logged: set[str] = set()

    # --- control from the fan-out -----------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def drain(self, until: Position) -> None:
        """Deliver up to `until`, then return from `run()`."""
        self._drain_until = until
        self._wake.set()

    def stop(self) -> None:
        """Stop now, even mid-retry."""
        self._stop.set()
        self._wake.set()

    @property
    def caught_up(self) -> bool:
        return self.cursor >= self.wal.durable_end

    def status(self) -> dict[str, Any]:
        now = time.time()
        behind = self.stats.behind_since
        return {
            "spec": self.spec.text,
            **asdict(self.stats),
            "cursor": list(self.cursor),
            "lag_bytes": self.wal.bytes_between(self.cursor, self.wal.durable_end),
            "lag_seconds": 0.0 if behind is None else round(now - behind, 3),
        }

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if not await self._open():
                return
            full = False
            while not self._stop.is_set():
                if self.cursor >= self.wal.durable_end:
                    self.stats.behind_since = None
                    await self._save_if_due()
                    if self._drain_until is not None and self.cursor >= self._drain_until:
                        return
                    self._wake.clear()
                    if self.cursor >= self.wal.durable_end:
                        await self._wake.wait()
                    continue
                if self.stats.behind_since is None:
                    self.stats.behind_since = time.time()
                if not full and self._linger and self._drain_until is None:
                    await self._sleep(self._linger)
                records, end = await self._call(
                    self.batcher.read, self.cursor, self.wal.durable_end
                )
                full = self.wal.bytes_between(end, self.wal.durable_end) > 0
                if records and not await self._deliver(records):
                    return
                self.cursor = end
                await self._save_if_due()
        finally:
            await self._close()

    async def _open(self) -> bool:
        saved = self._load_cursor()
        context = SinkContext(state=saved.get("state"), state_dir=self._state_dir)
        attempt = 0
        while not self._stop.is_set():
            try:
                await self._call(self.sink.open, context)
                self._opened = True
                return True
            except Exception as exc:  # SDK errors are the sink's to map; anything else is a bug
                self._failed(exc)
                await self._sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
        return False

    async def _deliver(self, records: list[Record]) -> bool:
        """Write a batch; False if stopped before it was stored.

        An exception the sink did not map is a bug in it: it is retried, but after
        `UNMAPPED_RETRIES` in a row it is treated as permanent, so that one record a
        sink cannot handle goes to the dead letters instead of stalling it forever.
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                await self._call(self.sink.write, records)
            except SinkError as exc:
                self._failed(exc)
                if not exc.retriable:
                    return await self._deliver_one_by_one(records, exc)
            except Exception as exc:
                self._failed(exc)
                if attempt + 1 >= UNMAPPED_RETRIES:
                    error = SinkError(f"{type(exc).__name__}: {exc}", retriable=False)
                    return await self._deliver_one_by_one(records, error)
            else:
                self._delivered(records)
                return True
            await self._sleep(self._backoff.delay(attempt, self._rng))
            attempt += 1
        return False

    async def _deliver_one_by_one(self, records: list[Record], error: SinkError) -> bool:
        if len(records) == 1:
            self._dead_letter(records[0], str(error))
            return True
        for record in records:
            if not await self._deliver([record]):
                return False
        return True

    def _delivered(self, records: list[Record]) -> None:
        stats = self.stats
        stats.delivered_records += len(records)
        stats.delivered_rows += sum(len(r.body["rows"]) for r in records if r.type == "metrics")
        stats.last_success = time.time()

    def _failed(self, exc: BaseException) -> None:
        self.stats.retries += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self.stats.last_error_at = time.time()
        if not isinstance(exc, SinkError) and self.stats.last_error not in self._logged:
            self._logged.add(self.stats.last_error)
            log.error("sink %s raised an unmapped error; retrying", self.spec.text, exc_info=exc)

    def _dead_letter(self, record: Record, reason: str) -> None:
        self.stats.dead_letters += 1
        self._dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "position": list(record.position),
            "run": record.run.id,
            "project": record.run.project,
            "name": record.run.name,
            "type": record.type,
            "reason": reason,
            "body": record.body,
            "at": time.time(),
        }
        with self._dead_letter_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
        log.warning("sink %s: dead-lettered a %s record: %s", self.spec.text, record.type, reason)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- the durable cursor ------------------------------------------------------------------

    def _load_cursor(self) -> dict[str, Any]:
        try:
            saved: dict[str, Any] = json.loads(self._cursor_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        position = tuple(saved["position"])
        self.cursor = max(position, self.wal.start)
        return saved

    async def _save_if_due(self) -> None:
        now = time.monotonic()
        if now - self._saved_at >= self._checkpoint_seconds:
            self._saved_at = now
            await self._call(self._save_cursor)

    def _save_cursor(self) -> None:
        state = self.sink.checkpoint()
        self._state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self._cursor_path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(
                {"spec": self.spec.text, "position": list(self.cursor), "state": state}, handle
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._cursor_path)

    async def _close(self) -> None:
        if self._opened:
            try:
                await self._call(self._save_cursor)
                await self._call(self.sink.close)
            except Exception:
                log.exception("sink %s: error while closing", self.spec.text)
        self._executor.shutdown(wait=False)


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
