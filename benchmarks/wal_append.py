"""WAL appends: trackd's dedicated writer thread versus aiofiles, as the daemon would use them.

Both append the same records from an asyncio loop and fsync in groups, the way
ingest does: a burst of `--records` small frames, each awaited until durable.
aiofiles hops to its thread pool once per call (write, then flush and fsync);
the writer thread takes whatever is queued, writes it in one call, fsyncs once,
and hands the whole group back to the loop. Prints records/s and loop-thread
CPU for each, so the choice in daemon/wal/writer.py rests on a number.

    .venv/bin/python benchmarks/wal_append.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiofiles

from trackd.daemon.wal import WriteAheadLog
from trackd.protocol import frame_record


async def with_writer_thread(directory: Path, records: int, payload: bytes, clients: int) -> float:
    loop = asyncio.get_running_loop()
    wal = WriteAheadLog(directory)
    waiting: dict[int, asyncio.Future[None]] = {}

    def committed(pairs: list[tuple[object, object]], _end: object) -> None:
        for token, _ in pairs:
            future = waiting.pop(token)  # type: ignore[call-overload]
            future.set_result(None)

    wal.start_writer(lambda tokens, end, _seq: loop.call_soon_threadsafe(committed, tokens, end))

    async def client(first: int) -> None:
        for index in range(first, records, clients):
            waiting[index] = loop.create_future()
            wal.append(payload, index)
            await waiting[index]

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    wal.close()
    return elapsed


async def with_aiofiles(directory: Path, records: int, payload: bytes, clients: int) -> float:
    lock = asyncio.Lock()
    async with aiofiles.open(directory / "segment.wal", "ab") as handle:

        async def client(first: int) -> None:
            for _ in range(first, records, clients):
                async with lock:
                    await handle.write(frame_record(payload))
                    await handle.flush()
                    await asyncio.to_thread(os.fdatasync, handle.fileno())

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--bytes", type=int, default=2000, help="payload size of one record")
    parser.add_argument("--clients", type=int, default=4, help="concurrent appenders")
    args = parser.parse_args()
    payload = os.urandom(args.bytes)
    print(f"{args.records} records of {args.bytes} B from {args.clients} concurrent appenders")
    print(f"{'method':<28}{'records/s':>12}{'loop CPU µs/record':>22}")
    for name, method in (
        ("writer thread (trackd)", with_writer_thread),
        ("aiofiles", with_aiofiles),
    ):
        with tempfile.TemporaryDirectory() as directory:
            cpu = time.thread_time()
            elapsed = asyncio.run(method(Path(directory), args.records, payload, args.clients))
            cpu = time.thread_time() - cpu
        print(f"{name:<28}{args.records / elapsed:>12,.0f}{cpu / args.records * 1e6:>22.1f}")


if __name__ == "__main__":
    main()
