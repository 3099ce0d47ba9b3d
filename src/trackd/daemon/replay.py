"""`trackd replay`: deliver a client spool, a folder of spools, or a daemon data dir to sinks.

It is the daemon's delivery without the daemon: the same `Delivery` (retries,
dead letters) per sink, fed from the source's records instead of the WAL.
Replaying is idempotent by content, not by path: for each sink, the highest
sequence number delivered per client session is saved (atomically with the
sink's checkpoint) under `DATA_DIR/replay/<sink>/`, so a second replay of the
same data, from wherever it was copied, skips what already arrived, and a
replay cut short resumes where it stopped.

A record of a file (an artifact, a media object) names it by its path where
it was logged. A source copied off another machine, a data dir or a run's
`init(dir=...)` folder, carries those files in its own `artifacts/` store,
named by their sha256: a path that is not there is looked up in that copy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trackd.daemon.delivery import Backoff, Delivery, load_progress
from trackd.daemon.ledger import Ledger
from trackd.daemon.wal import intact_records
from trackd.protocol import (
    INTERNAL_TYPES,
    SPOOL_SUFFIX,
    Message,
    ProtocolError,
    decode,
)
from trackd.sinks.base import Record, SinkContext, SinkSpec

BATCH_RECORDS = 2000
DIGEST_CHARS = 64  # a sha256 in hex: the name of a file in an `artifacts/` store
SAVE_SECONDS = 0.5


class SourceError(ValueError):
    """The source is not a spool, a folder of spools or a trackd data dir."""


def source_files(source: Path) -> list[Path]:
    """The record files of a source, oldest first."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise SourceError(f"replay: {source} does not exist")
    wal = sorted((source / "wal").glob("*.wal"))
    spools = sorted((source / "spool").glob(f"*{SPOOL_SUFFIX}")) + sorted(
        source.glob(f"*{SPOOL_SUFFIX}")
    )
    if not wal and not spools:
        raise SourceError(f"replay: {source} holds no spool files and no trackd WAL")
    return wal + spools


def file_stores(source: Path) -> list[Path]:
    """The `artifacts` stores a source may carry: its own folder's (a data dir, a run's
    `dir`) and the one above it (a data dir's `spool/`, or a spool file in a `dir`)."""
    top = source if source.is_dir() else source.parent
    return [top / "artifacts", top.parent / "artifacts"]


def relocated(message: Message, stores: list[Path]) -> Message:
    """A file's record whose path is gone (the source was copied off the machine that
    logged it) with its path into the copy's store, found by the file's digest."""
    body = message["b"]
    path, digest = body.get("path"), body.get("sha256")
    if not isinstance(path, str) or not isinstance(digest, str) or os.path.exists(path):
        return message
    if len(digest) != DIGEST_CHARS or not digest.isalnum():  # a name in the store, no more
        return message
    for store in stores:
        copied = store / digest[:2] / digest
        if copied.is_file():
            return {**message, "b": {**body, "path": str(copied)}}
    return message


def read_messages(files: list[Path]) -> Iterator[Message]:
    """Every valid message in the files, in order; a damaged record costs only itself."""
    for path in files:
        for payload in intact_records(path):
            try:
                yield decode(payload, max_bytes=len(payload))
            except ProtocolError:
                continue


def base_ledger(source: Path, files: list[Path]) -> Ledger:
    """Run info for every run in the source: its saved ledger, then its own run_starts."""
    ledger = Ledger.load(source / "ledger.msgpack") if source.is_dir() else Ledger()
    for message in read_messages(files):
        if message["t"] == "run_start":
            ledger.apply(ledger.resolve(message))
    return ledger


def wanted(message: Message, ledger: Ledger, run: str | None) -> bool:
    if message["t"] in INTERNAL_TYPES:
        return False
    if message["t"] == "run_start" and message["b"].get("join"):
        return False  # another process of the job started this run (see Ingest.receive)
    if run is None:
        return True
    info = ledger.info(message["r"])
    return run in (info.name, info.id) or info.id.startswith(run)


async def replay_into(
    spec: SinkSpec,
    files: list[Path],
    stores: list[Path],
    ledger: Ledger,
    run: str | None,
    state_root: Path,
    backoff: Backoff,
    advance: Callable[[int], None],
) -> Delivery:
    """Deliver the source to one sink; `advance(n)` reports n more records handled."""
    state_dir = state_root / spec.name
    progress_path = state_dir / "progress.json"
    saved = load_progress(progress_path)
    sessions: dict[str, int] = dict(saved.get("sessions", {}))
    delivery = Delivery(
        spec, spec.build(), state_root / "deadletter" / f"{spec.name}.jsonl", backoff
    )

    def progress() -> dict[str, Any]:
        return {"sessions": dict(sessions)}

    # Positions as sinks see them: growing across batches and across replays into this
    # state (a sink may skip a record at or before the last position it handed over).
    started = time.time_ns()
    positions = ((started, ordinal) for ordinal in itertools.count())

    try:
        if not await delivery.open(SinkContext(saved.get("state"), state_dir)):
            return delivery
        batch: list[Message] = []
        # A data dir may hold a message twice: in its WAL, and in a spool the daemon had not
        # yet let go of (a client's or `replay --into-daemon`'s). Each session's messages come
        # in sequence order in each file, so one already taken is one at or below the highest.
        taken: dict[str, int] = {}
        saved_at = time.monotonic()
        for message in map(ledger.resolve, read_messages(files)):
            if not wanted(message, ledger, run):
                continue
            session, seq = message["s"], message["q"]
            if seq <= sessions.get(session, 0) or seq <= taken.get(session, 0):
                advance(1)
                continue
            taken[session] = seq
            batch.append(relocated(message, stores))
            if len(batch) >= BATCH_RECORDS:
                await _deliver(delivery, batch, ledger, sessions, positions)
                advance(len(batch))
                batch = []
                if time.monotonic() - saved_at > SAVE_SECONDS:
                    await delivery.call(delivery.save, progress_path, progress())
                    saved_at = time.monotonic()
        if batch:
            await _deliver(delivery, batch, ledger, sessions, positions)
            advance(len(batch))
    finally:
        await delivery.close(progress_path, progress)
    return delivery


async def _deliver(
    delivery: Delivery,
    batch: list[Message],
    ledger: Ledger,
    sessions: dict[str, int],
    positions: Iterator[tuple[int, int]],
) -> None:
    records = [
        Record(next(positions), message["t"], ledger.info(message["r"]), message["b"])
        for message in batch
    ]
    if not await delivery.deliver(records):
        raise asyncio.CancelledError
    for message in batch:
        sessions[message["s"]] = max(sessions.get(message["s"], 0), message["q"])


def count(files: list[Path], ledger: Ledger, run: str | None) -> int:
    return sum(1 for message in read_messages(files) if wanted(message, ledger, run))
