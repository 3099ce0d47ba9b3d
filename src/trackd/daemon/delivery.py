"""Writing batches into one sink: on its own thread, with backoff, dead letters and stats.

Shared by the daemon's fan-out (a worker per sink, fed from the WAL) and by
`trackd replay` (fed from a spool or a data directory), so both retry, give up
and count in exactly one way. A retriable error is retried with exponential
backoff and full jitter (capped); the stop event cuts a wait short. A
permanent error on a batch is retried record by record, and the records that
still fail go to the dead-letter file with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trackd.daemon.state import StateDamage
from trackd.jsonfile import read_json, write_json_atomic
from trackd.sinks.base import Record, Sink, SinkContext, SinkError, SinkSpec

log = logging.getLogger("trackd.delivery")
T = TypeVar("T")
UNMAPPED_RETRIES = 5


class Untried:
    """No write of the batch was attempted yet (`Delivery.deliver`'s `first`)."""


UNTRIED = Untried()


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a uniform wait in [0, min(cap, base * 2**attempt)]."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 32)))


@dataclass
class SinkStats:
    open: bool = False  # its open() returned (an SDK's import and a backend's first answer)
    delivered_records: int = 0
    delivered_rows: int = 0
    retries: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_success: float | None = None
    behind_since: float | None = None


class Delivery:
    def __init__(
        self, spec: SinkSpec, sink: Sink, dead_letter_path: Path, backoff: Backoff
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.stats = SinkStats()
        self.stopped = asyncio.Event()
        self._dead_letter_path = dead_letter_path
        self._backoff = backoff
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"trackd-{spec.kind}")
        self._rng = random.Random()
        self._logged: set[str] = set()

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a sink call on the sink's own thread: SDKs block, and a hung one holds only it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open(self, context: SinkContext) -> bool:
        """Open the sink, retrying until it works; False if stopped first."""
        attempt = 0
        while not self.stopped.is_set():
            try:
                await self.call(self.sink.open, context)
                self.stats.open = True
                return True
            except Exception as exc:  # SDK errors are the sink's to map; anything else is a bug
                self._failed(exc)
                await self.sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
        return False

    def attempt(self, records: list[Record]) -> Exception | None:
        """One write of a batch, on the sink's thread: what it raised, or None once stored.

        The fan-out reads a batch and makes this first attempt in one call on the sink's
        thread, so that a batch that goes through costs the event loop one hand-off.
        """
        try:
            self.sink.write(records)
        except Exception as exc:  # judged by `deliver`, on the event loop
            return exc
        return None

    async def deliver(
        self, records: list[Record], first: Exception | Untried | None = UNTRIED
    ) -> bool:
        """Write a batch, given the outcome of a `first` attempt if one was made; False if
        stopped before it was stored.

        An exception the sink did not map is a bug in it: it is retried, but after
        `UNMAPPED_RETRIES` in a row it is treated as permanent, so that one record a
        sink cannot handle goes to the dead letters instead of stalling it forever.
        """
        attempt = 0
        outcome = first
        while not self.stopped.is_set():
            if isinstance(outcome, Untried):
                outcome = await self.call(self.attempt, records)
            if outcome is None:
                self._delivered(records)
                return True
            self._failed(outcome)
            if isinstance(outcome, SinkError):
                if not outcome.retriable:
                    return await self._one_by_one(records, outcome)
            elif attempt + 1 >= UNMAPPED_RETRIES:
                error = SinkError(f"{type(outcome).__name__}: {outcome}", retriable=False)
                return await self._one_by_one(records, error)
            await self.sleep(self._backoff.delay(attempt, self._rng))
            attempt += 1
            outcome = UNTRIED
        return False

    async def _one_by_one(self, records: list[Record], error: SinkError) -> bool:
        if len(records) == 1:
            self._dead_letter(records[0], str(error))
            return True
        for record in records:
            if not await self.deliver([record]):
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
            log.error("sink %s raised an unmapped error; retrying", self.spec.shown, exc_info=exc)

    def _dead_letter(self, record: Record, reason: str) -> None:
        self.stats.dead_letters += 1
        self._dead_letter_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        fd = os.open(self._dead_letter_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")
        log.warning("sink %s: dead-lettered a %s record: %s", self.spec.shown, record.type, reason)

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), seconds)

    def save(self, path: Path, progress: dict[str, Any]) -> None:
        """Atomically save where delivery stands together with the sink's checkpoint state.

        Called on the sink's thread (via `call`): the sink's checkpoint may fsync.
        """
        document = {"spec": self.spec.shown, **progress, "state": self.sink.checkpoint()}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(path, document)

    async def close(self, path: Path, progress: Callable[[], dict[str, Any]]) -> None:
        """Save progress and close the sink (both on its thread), then release the thread."""
        if self.stats.open:
            try:
                await self.call(lambda: self.save(path, progress()))
                await self.call(self.sink.close)
            except Exception:
                log.exception("sink %s: error while closing", self.spec.shown)
        self._executor.shutdown(wait=False)


def load_progress(path: Path, damage: StateDamage | None = None) -> dict[str, Any]:
    """Where a sink's delivery stood; {} (start from the oldest record kept) if unknown.

    A truncated or corrupt file must not keep the daemon from starting: it is logged and
    counted, and the sink starts over from the WAL's start without its checkpoint state
    (it may then deliver again what it delivered before).
    """
    try:
        saved = read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("position", []), list):
            raise ValueError(f"{path}: not a delivery progress document")
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        if damage is None:
            raise
        damage.note(f"{exc}; the sink starts again from the oldest record kept")
        return {}
    return saved
