"""Where the slow calls of a timed loop come from (issue 13 §4): a garbage collection, trackd's
delivery thread, or neither (the OS running something else instead of this process).

While a `StallProbe` is installed it records, on the same `perf_counter_ns` clock as the
loop: every collection (`gc.callbacks`: start, end, generation) and every pass of trackd's
delivery thread over its queue, socket and acks, with the CPU that thread used in it (by
wrapping three `Transport` methods of this process; no-ops for a case without trackd).
The loop hands it each call over `SLOW_NS` with its start and length; `attribute()` then
names, per slow call, what overlapped it: a collection first (it stops every thread), else
a delivery pass that ran on a CPU for at least half the stall ("delivery thread"), else a
pass that did not ("os, delivery thread descheduled": it held or awaited the GIL while the
OS ran something else), else "os" (this process was simply not running: the timer
harness, which has no second thread and allocates nothing, shows how often).
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Callable
from typing import Any

SLOW_NS = 100_000  # the p99.99 bound: every call over it is attributed
DELIVERY_METHODS = ("_pack_queue", "_send", "_read_acks")


class StallProbe:
    def __init__(self) -> None:
        self.slow: list[tuple[int, int]] = []  # (start ns, length ns) of each slow call
        self.collections: list[tuple[int, int, int]] = []  # (start, end, generation)
        self.delivery: list[tuple[int, int, int]] = []  # (start, end, thread CPU) of a pass
        self._gc_started = 0
        self._restore: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            from trackd.client.transport import Transport
        except ImportError:
            return
        for name in DELIVERY_METHODS:
            original = getattr(Transport, name)
            setattr(Transport, name, self._timed(original))
            self._restore.append((Transport, name, original))

    def uninstall(self) -> None:
        gc.callbacks.remove(self._on_gc)
        for owner, name, original in self._restore:
            setattr(owner, name, original)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self._gc_started = now
        else:
            self.collections.append((self._gc_started, now, info["generation"]))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        spans = self.delivery
        clock, cpu = time.perf_counter_ns, time.thread_time_ns

        def timed(*args: Any) -> Any:
            started, cpu_started = clock(), cpu()
            try:
                return method(*args)
            finally:
                spans.append((started, clock(), cpu() - cpu_started))

        return timed

    def attribute(self) -> dict[str, Any]:
        """Per cause, the slow calls it overlapped: how many over 100 µs, over 1 ms, over
        10 ms, and the worst; plus how many collections of each generation ran and their
        longest (a collection outside a timed call delays no call)."""
        collections = sorted(self.collections)
        delivery = sorted(self.delivery)
        causes: dict[str, list[int]] = {}
        for start, length in self.slow:
            end = start + length
            collection = _overlapping(collections, start, end)
            busy = _overlapping(delivery, start, end)
            if collection is not None:
                cause = f"gc gen{collection[2]}"
            elif busy is not None and busy[2] >= length // 2:
                cause = "delivery thread"  # it ran (on a CPU) for at least half the stall
            elif busy is not None:
                cause = "os, delivery thread descheduled"  # it held or awaited the GIL, not a CPU
            else:
                cause = "os"
            causes.setdefault(cause, []).append(length)
        by_generation: dict[str, list[int]] = {}
        for start, end, generation in collections:
            by_generation.setdefault(f"gen{generation}", []).append(end - start)
        return {
            "slow_calls": {
                cause: {
                    "over_100us": len(lengths),
                    "over_1ms": sum(length > 1_000_000 for length in lengths),
                    "over_10ms": sum(length > 10_000_000 for length in lengths),
                    "worst_us": max(lengths) / 1e3,
                }
                for cause, lengths in sorted(causes.items())
            },
            "collections": {
                generation: {"count": len(spans), "longest_us": max(spans) / 1e3}
                for generation, spans in sorted(by_generation.items())
            },
            "delivery_passes": len(delivery),
            "delivery_longest_us": max((end - start for start, end, _ in delivery), default=0)
            / 1e3,
            "delivery_most_cpu_us": max((cpu for _, _, cpu in delivery), default=0) / 1e3,
        }


def _overlapping(spans: list[tuple[int, ...]], start: int, end: int) -> tuple[int, ...] | None:
    """The span of `spans` (sorted, none overlapping another) that overlaps [start, end]: the
    last one to start before `end`, if it had not ended before `start`; or None."""
    index = bisect.bisect_right(spans, end, key=lambda span: span[0]) - 1
    if index >= 0 and spans[index][1] >= start:
        return spans[index]
    return None
