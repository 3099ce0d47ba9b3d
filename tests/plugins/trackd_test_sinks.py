"""Fault-injection sinks, installed as a third-party plugin would be (entry points).

Both store through the real JSONL sink, so a test can count what arrived.
"""

from __future__ import annotations

import os
import time

from trackd.sinks.base import Record, SinkContext, SinkError
from trackd.sinks.jsonl import JsonlSink


class FlakySink(JsonlSink):
    """Fails its first `fail` writes (retriable), then works."""

    kind = "flaky"
    known_options = ("fail",)

    def write(self, batch: list[Record]) -> None:
        failures = int(self.options.get("fail", "50"))
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls <= failures:
            raise SinkError(f"flaky: injected failure {self.calls} of {failures}", retriable=True)
        super().write(batch)


class SlowSink(JsonlSink):
    """Sleeps `delay` seconds in every write."""

    kind = "slow"
    known_options = ("delay",)

    def write(self, batch: list[Record]) -> None:
        time.sleep(float(self.options.get("delay", "1")))
        super().write(batch)


class GatedSink(JsonlSink):
    """Fails (retriably) while the file named by `gate` exists: a sink down until a test says;
    with `open_gate`, its open() fails while that file exists (a backend not up at start)."""

    kind = "gated"
    known_options = ("gate", "open_gate")

    def open(self, context: SinkContext) -> None:
        if os.path.exists(self.options.get("open_gate", "")):
            raise SinkError("gated: the open gate is closed", retriable=True)
        super().open(context)

    def write(self, batch: list[Record]) -> None:
        if os.path.exists(self.options["gate"]):
            raise SinkError("gated: the gate is closed", retriable=True)
        super().write(batch)
