"""Test support: a sink that keeps what it is given in memory, as OpenTelemetry's
`InMemorySpanExporter` does for spans.

A daemon built with `--sink memory:NAME` (or `InMemorySink("NAME")` handed to a
fan-out in-process) delivers into a list that a test reads back with
`memory_sink("NAME").records()`; no backend, no files. Only useful where the
daemon runs in the test's own process (trackd's in-process tests, or a user's
test that runs `trackd.daemon.server.serve` in a thread); a daemon in another
process keeps its list to itself.
"""

from __future__ import annotations

import threading
from typing import Any

from trackd.sinks.base import Record, Sink, SinkContext

_SINKS: dict[str, InMemorySink] = {}
_SINKS_LOCK = threading.Lock()


class InMemorySink(Sink):
    """Every record written, in order, with the RunInfo the daemon gave it."""

    kind = "memory"
    target_key = "name"
    known_options = ()

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self.opened = False
        with _SINKS_LOCK:
            _SINKS[target] = self

    def open(self, context: SinkContext) -> None:
        self.opened = True

    def write(self, batch: list[Record]) -> None:
        with self._lock:
            self._records.extend(batch)

    def close(self) -> None:
        self.opened = False

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def rows(self, run_name: str | None = None) -> list[list[Any]]:
        """Every metric row delivered ([step, ts, values]), of one run or of all."""
        return [
            row
            for record in self.records()
            if record.type == "metrics" and run_name in (None, record.run.name)
            for row in record.body["rows"]
        ]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


def memory_sink(name: str) -> InMemorySink:
    """The in-memory sink last built under `name` in this process."""
    with _SINKS_LOCK:
        found = _SINKS.get(name)
    if found is None:
        raise KeyError(f"no memory sink named {name!r} was built in this process")
    return found
