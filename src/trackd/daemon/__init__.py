"""The daemon: who owns each piece of state, and how things cross between threads.

Threads and what each one owns (nobody else writes it):

* **The event loop** (asyncio, the main thread) owns the ledger (`ledger.py`:
  sessions, runs, and the published end `ledger.position` / `ledger.seq`),
  ingest's dedupe state and stats, each sink worker's cursor, and every
  socket. It alone applies commits to the ledger and only then publishes the
  new end (`Ingest._committed`), so a reader never reaches a record of a run
  the ledger does not know. Ledger snapshots are taken here, also for a worker
  thread (`server.on_loop`, through `run_coroutine_threadsafe`).
* **The WAL writer thread** (`trackd-wal`, `wal/writer.py`) is the only appender: it
  takes queued records under a condition variable, group-commits them, and
  hands each commit back with `loop.call_soon_threadsafe`. It owns the live
  segment, `durable_end` / `durable_seq` and the segment counts it writes at
  each rotation (`counts.json`).
* **One thread per sink** (`delivery.py`) owns its sink object and its own
  WAL reader (`batcher.py`, `wal/reader.py`). It gets its read bound and
  start position as call arguments from the loop (immutable tuples) and
  returns the records and the new position as the call's result.
* **Retention** (`retention.py`, via `asyncio.to_thread`) deletes whole sealed
  segments; readers that find a segment gone move on to the oldest one left.
* **The Prometheus thread** (`metrics.py`), when enabled, gets the same
  status as the control socket, built on the loop (`server.on_loop`).

Recovery (`wal/recovery.py`: torn tail, copied segments, segment counts) runs once, at start,
before any of these threads exists.
"""
