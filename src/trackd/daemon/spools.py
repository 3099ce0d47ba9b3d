"""Picking up client spools: runs logged while the daemon was down, or offline.

A spool is ingested only when its lock can be taken, that is, once the client
that wrote it has finished or died; a live client re-sends its own spool. Its
records go through the same dedupe as live messages (a spool usually repeats
some already-acked messages), and the file is removed once everything read
from it is durable in the WAL. Reads go through aiofiles so that a large
spool never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path

import aiofiles

from trackd.daemon.ingest import Ingest
from trackd.protocol import SPOOL_SUFFIX, iter_records

log = logging.getLogger("trackd.spools")
CHUNK_BYTES = 4 * 1024 * 1024


async def pick_up(directory: Path, ingest: Ingest) -> int:
    """Ingest every unlocked spool in `directory`; return how many were taken."""
    taken = 0
    for path in await asyncio.to_thread(_oldest_first, directory):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its client is still alive and will deliver it itself
            if not path.exists():
                continue  # removed by the previous pick-up between our glob and our lock
            if await _ingest_file(fd, path, ingest):
                path.unlink()
                taken += 1
        except OSError as exc:
            ingest.stats.error("spool", f"spool {path.name}: {exc}")
        finally:
            os.close(fd)
    return taken


def _oldest_first(directory: Path) -> list[Path]:
    """Spools in the order their sessions last wrote them: a run resumed in a later session
    arrives after the session it continues (a sink such as W&B's skips steps that go back).
    Named by a random session id, spools sorted by name came in any order."""

    def written(path: Path) -> tuple[int, str]:
        try:
            return path.stat().st_mtime_ns, path.name
        except OSError:
            return 0, path.name  # gone already: skipped when opened

    return sorted(directory.glob(f"*{SPOOL_SUFFIX}"), key=written)


async def _ingest_file(fd: int, path: Path, ingest: Ingest) -> bool:
    """Ingest a spool; False if the WAL was full and the file must be read again later."""
    carry = b""
    async with aiofiles.open(fd, "rb", closefd=False) as handle:
        while chunk := await handle.read(CHUNK_BYTES):
            buffer = carry + chunk
            consumed = 0
            for consumed, payload in iter_records(buffer):  # noqa: B007 - used after the loop
                if not ingest.receive(payload, None, from_spool=True):
                    await ingest.barrier()
                    return False
            carry = buffer[consumed:]
            await ingest.barrier()
    if carry:
        ingest.stats.error("spool", f"spool {path.name}: {len(carry)} bytes of torn tail dropped")
        log.warning("spool %s: dropped a torn tail of %d bytes", path.name, len(carry))
    return True
