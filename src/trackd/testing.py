"""Test support: a sink that keeps what it is given in memory, as OpenTelemetry's
`InMemorySpanExporter` does for spans.

`LocalDaemon` runs a daemon in a thread of the test's process with such a sink,
so a user's test can assert on what a run delivered without a backend. A daemon
built with `--sink memory:NAME` (or an `InMemorySink("NAME")` handed to a
fan-out in-process) delivers into a list read back with
`memory_sink("NAME").records()`; a daemon in another process keeps its list to
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
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


class LocalDaemon:
    """A daemon in a thread of this process, delivering into an `InMemorySink`, for tests.

    While it runs, `TRACKD_RUNTIME_DIR` and `TRACKD_DATA_DIR` point at `directory`, so
    `trackd.init()` in the same process logs to it::

        with LocalDaemon(tmp_path) as daemon:
            with trackd.init(project="p", name="n") as run:
                run.log({"loss": 0.5})
            daemon.flush()
            assert daemon.sink.rows("n")[0][2] == {"loss": 0.5}
    """

    def __init__(self, directory: Path, name: str = "local") -> None:
        self.runtime_dir = directory / "runtime"
        self.data_dir = directory / "data"
        self._name = f"{name}-{id(self):x}"
        self._thread: threading.Thread | None = None
        self._saved: dict[str, str | None] = {}
        self.exit_code: int | None = None

    @property
    def sink(self) -> InMemorySink:
        return memory_sink(self._name)

    def request(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        from trackd.client.control import request

        return request(command, runtime_dir=str(self.runtime_dir), timeout=timeout, **arguments)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the sink has everything the daemon has made durable."""
        if not self.request("flush", timeout=timeout + 5, wait=timeout):
            raise TimeoutError(f"the memory sink did not catch up within {timeout}s")

    def __enter__(self) -> LocalDaemon:
        from trackd.daemon.server import serve
        from trackd.daemon.settings import Settings
        from trackd.sinks.base import SinkSpec

        settings = Settings(
            data_dir=self.data_dir,
            runtime_dir=self.runtime_dir,
            sinks=[SinkSpec("memory", self._name, {})],
            linger=0.0,
        )
        for variable, value in (
            ("TRACKD_RUNTIME_DIR", str(self.runtime_dir)),
            ("TRACKD_DATA_DIR", str(self.data_dir)),
            ("TRACKD_ENDPOINT", None),
        ):
            self._saved[variable] = os.environ.get(variable)
            _set_env(variable, value)

        def run() -> None:
            self.exit_code = asyncio.run(serve(settings))

        self._thread = threading.Thread(target=run, name="trackd-local-daemon", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._answers():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the local trackd daemon did not start")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        from trackd.client.control import DaemonUnreachable

        try:
            self.request("status", timeout=0.5)
        except DaemonUnreachable:
            return False
        return True

    def __exit__(self, *_exc: object) -> None:
        from trackd.client.control import DaemonUnreachable

        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(DaemonUnreachable):
                self.request("shutdown")
            self._thread.join(60)
        for variable, value in self._saved.items():
            _set_env(variable, value)


def _set_env(variable: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = value
