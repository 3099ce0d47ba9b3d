"""How many calls a network sink may have in flight now: adaptive request concurrency.

A fleet of daemons with a fixed number of calls each puts that number times the
fleet on one server; past the server's ceiling the extra calls only queue, time
out and come back as retries, and the server's throughput falls below what it
could store (congestion collapse). So each sink adapts, as Vector's adaptive
request concurrency does (its `controller.rs`; TCP congestion control underneath):

* every call's round-trip time (RTT) of a successful call goes into the mean of
  the current window; a window lasts one past mean RTT;
* at the end of a window, against an exponentially weighted mean and variance
  of the past windows' RTTs: if the calls reached the limit, none met back
  pressure and the window's RTT was no worse than the past mean, the limit
  grows by one (additive increase); if any call met back pressure (429, 503,
  another retriable error, a timeout, a refused connection) or the RTT rose
  past the mean by more than `DEVIATION_SCALE` deviations, the limit shrinks to
  `DECREASE_RATIO` of itself, by one at least (multiplicative decrease);
* the limit stays between 1 and the sink's ceiling; it starts at 1.

With `adaptive=False` the limit is the ceiling, always: the calls are still
counted, so `trackd status` shows the same figures for both.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

EWMA_ALPHA = 0.4  # Vector's defaults, chosen there by simulation against varied servers
DECREASE_RATIO = 0.9
DEVIATION_SCALE = 2.5


class Outcome(Enum):
    """How a call ended, as far as the limit cares."""

    OK = "ok"  # answered: its RTT counts
    BACK_PRESSURE = "back_pressure"  # the server or the network is overloaded: slow down
    ERROR = "error"  # refused for its content: says nothing about load
    UNSENT = "unsent"  # the slot was taken but the call never started


class _Ewma:
    """An exponentially weighted mean and variance (West's incremental form, as Vector's)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.variance = 0.0

    def update(self, value: float) -> None:
        if self.mean is None:
            self.mean = value
            return
        difference = value - self.mean
        increment = self.alpha * difference
        self.mean += increment
        self.variance = (1 - self.alpha) * (self.variance + difference * increment)


class ConcurrencyLimit:
    """The gate a sink's concurrent calls pass: `acquire()` waits for a free slot and returns
    the call's start; `release(started, outcome)` frees the slot and teaches the limit.

    Thread-safe: the sink's writer acquires, its pool threads release. The clock is
    injected so that a test drives windows with exact RTTs.
    """

    def __init__(
        self, ceiling: int, *, adaptive: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"concurrency ceiling must be >= 1, not {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._clock = clock
        self._limit = 1 if adaptive else ceiling
        self._in_flight = 0
        self._changed = threading.Condition()
        self._past = _Ewma(EWMA_ALPHA)
        self._window_end = 0.0
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._back_pressure = False
        self._reached_limit = False
        self.increases = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> float:
        """Wait until fewer than `limit` calls are in flight, take a slot, return the start."""
        with self._changed:
            self._changed.wait_for(lambda: self._in_flight < self._limit)
            self._in_flight += 1
            if self._in_flight >= self._limit:
                self._reached_limit = True
            return self._clock()

    def release(self, started: float, outcome: Outcome) -> None:
        now = self._clock()
        with self._changed:
            self._in_flight -= 1
            if outcome is not Outcome.UNSENT:
                self._learn(now, now - started, outcome)
            self._changed.notify_all()

    def _learn(self, now: float, rtt: float, outcome: Outcome) -> None:
        if outcome is Outcome.BACK_PRESSURE:
            self._back_pressure = True
        elif outcome is Outcome.OK:
            self._rtt_sum += rtt
            self._rtt_count += 1
        current = self._rtt_sum / self._rtt_count if self._rtt_count else None
        past = self._past.mean
        if past is None:  # the first answer sets the baseline and the first window
            if current is not None:
                self._past.update(current)
                self._window_end = now + current
            return
        if now < self._window_end:
            return
        if self.adaptive:
            self._adjust(past, current)
        if current is not None:
            self._past.update(current)
        self._window_end = now + (self._past.mean or past)
        self._rtt_sum, self._rtt_count = 0.0, 0
        self._back_pressure = self._reached_limit = False

    def _adjust(self, past: float, current: float | None) -> None:
        threshold = math.sqrt(self._past.variance) * DEVIATION_SCALE
        if (
            self._limit < self.ceiling
            and self._reached_limit
            and not self._back_pressure
            and current is not None
            and current <= past
        ):
            self._limit += 1
            self.increases += 1
        elif self._limit > 1 and (
            self._back_pressure or (current is not None and current > past + threshold)
        ):
            self._limit = min(self._limit - 1, int(self._limit * DECREASE_RATIO))
            self.decreases += 1

    def status(self) -> dict[str, Any]:
        """The figures `trackd status` and the metrics endpoint show for the sink."""
        return {
            "mode": "adaptive" if self.adaptive else "fixed",
            "limit": self._limit,
            "ceiling": self.ceiling,
            "in_flight": self._in_flight,
            "increases": self.increases,
            "decreases": self.decreases,
            "rtt_seconds": None if self._past.mean is None else round(self._past.mean, 4),
        }
