"""How many calls a network sink may have in flight now: adaptive request concurrency.

A fleet of daemons with a fixed number of calls each puts that number times the
fleet on one server; past the server's ceiling the extra calls only queue, time
out and come back as retries, and the server's throughput falls below what it
could store (congestion collapse). So each sink adapts, after Vector's adaptive
request concurrency (its `controller.rs`; TCP congestion control underneath):

* every successful call's round-trip time (RTT) goes into the mean of the current
  window; a window lasts one past mean RTT (an exponentially weighted mean);
* at the end of a window in which any call met back pressure (429, 503, another
  retriable error, a timeout, a refused connection), the limit shrinks to
  `DECREASE_RATIO` of itself, by one at least (multiplicative decrease), as in
  Vector;
* otherwise, when the calls reached the limit, the latency says how many calls
  wait at the server, as TCP Vegas reads it: the limit's share of the window's
  RTT above the RTT of one call alone, `limit x (1 - alone / RTT)`. Fewer than
  `WAITING_LOW`: one call more (additive increase); more than `WAITING_HIGH`: the
  limit shrinks as under back pressure;
* one call's RTT alone is the least of the last `BASE_WINDOWS` windows at a limit
  of one. The limit starts at one for those windows, and `BASE_EVERY` windows after
  it last left one it goes back for as many and returns, so that the RTT alone is
  what the server does now (a store slows as it grows);
* the window after a change is no evidence (its calls started at the old limit);
* the limit stays between 1 and the sink's ceiling.

So a sink keeps three or four calls waiting at the server beyond those it serves:
enough that no worker idles between a sink's calls, although a multi-worker
server keeps each kept-alive connection with the worker that accepted it (two
calls can meet one worker while another idles); few enough that a server which
stores less the more calls it holds is not given the ceiling. Vector's own
increase (whenever the window's RTT is no worse than the past mean) drifts to
the ceiling on any server: each step's rise soon becomes the mean, and the next
increase passes on noise. A 1-worker sqlite `mlflow server` stored 7% less with
4 calls at once than with 1, and 15% less with a sink at 6 calls than at 4; a
2-worker one on PostgreSQL about its most from 5 (benchmarks/README.md, issue 13,
fifth and sixth passes).

With `adaptive=False` the limit is the ceiling, always: the calls are still
counted, so `trackd status` shows the same figures for both.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

EWMA_ALPHA = 0.4  # Vector's defaults, chosen there by simulation against varied servers
DECREASE_RATIO = 0.9
WAITING_LOW, WAITING_HIGH = 3, 4  # the calls a sink keeps waiting at the server (Vegas)
BASE_WINDOWS = 3  # windows at one call whose least RTT is one call's RTT alone
BASE_EVERY = 100  # windows after which one call's RTT alone is measured again


class Outcome(Enum):
    """How a call ended, as far as the limit cares."""

    OK = "ok"  # answered: its RTT counts
    BACK_PRESSURE = "back_pressure"  # the server or the network is overloaded: slow down
    ERROR = "error"  # refused for its content: says nothing about load
    UNSENT = "unsent"  # the slot was taken but the call never started


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
        self._past_rtt: float | None = None  # the windows' mean RTT, weighted to the last
        self._windows = 0
        self._changed_at = -1  # the window that last changed the limit
        # the RTT of windows with one call in flight, the last BASE_WINDOWS; the window the
        # limit last left one call; the limit a probe at one call comes back to
        self._alone: collections.deque[float] = collections.deque(maxlen=BASE_WINDOWS)
        self._based_at = 0
        self._come_back_to: int | None = None
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
        past = self._past_rtt
        if past is None:  # the first answer sets the baseline and the first window
            if current is not None:
                self._past_rtt = current
                self._window_end = now + current
            return
        if now < self._window_end:
            return
        if self.adaptive:
            self._adjust(current)
        if current is not None:
            self._past_rtt = past = past + EWMA_ALPHA * (current - past)
        self._window_end = now + past
        self._rtt_sum, self._rtt_count = 0.0, 0
        self._back_pressure = self._reached_limit = False

    def _adjust(self, current: float | None) -> None:
        self._windows += 1
        if self._back_pressure:
            self._come_back_to = None
            self._shrink()
            return
        if current is None or not self._reached_limit:
            return  # no call waited for a slot: no evidence either way
        if self._changed_at == self._windows - 1:
            return  # calls started at the limit before the change ended in this window
        if self._limit == 1:
            self._alone.append(current)
            if len(self._alone) < BASE_WINDOWS:
                return  # one call's RTT alone is still being measured
            if self._come_back_to is not None:
                self._change(self._come_back_to)  # measured: back where the probe left
                self._come_back_to = None
                return
        elif self._windows - self._based_at > BASE_EVERY:
            self._come_back_to = self._limit  # measure one call's RTT alone again
            self._alone.clear()
            self._change(1)
            return
        self._grow_or_shrink(current)

    def _grow_or_shrink(self, current: float) -> None:
        """Vegas: the calls waiting at the server are the limit's share of the RTT above
        one call's RTT alone; keep them between `WAITING_LOW` and `WAITING_HIGH`."""
        waiting = self._limit * (1 - min(self._alone) / current)
        if waiting < WAITING_LOW and self._limit < self.ceiling:
            self._change(self._limit + 1)
            self.increases += 1
        elif waiting > WAITING_HIGH:
            self._shrink()

    def _shrink(self) -> None:
        if self._limit > 1:
            self._change(min(self._limit - 1, int(self._limit * DECREASE_RATIO)))
            self.decreases += 1

    def _change(self, limit: int) -> None:
        if self._limit == 1 and limit > 1:
            self._based_at = self._windows
        self._limit = limit
        self._changed_at = self._windows

    def status(self) -> dict[str, Any]:
        """The figures `trackd status` and the metrics endpoint show for the sink."""
        return {
            "mode": "adaptive" if self.adaptive else "fixed",
            "limit": self._limit,
            "ceiling": self.ceiling,
            "in_flight": self._in_flight,
            "increases": self.increases,
            "decreases": self.decreases,
            "rtt_seconds": None if self._past_rtt is None else round(self._past_rtt, 4),
        }
