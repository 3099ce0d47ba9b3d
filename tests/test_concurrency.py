"""The adaptive concurrency limit in-process: outcomes and latencies in, limits out, on an
injected clock, so each window's round-trip time is exact (issue 13 §3)."""

from __future__ import annotations

import threading

import pytest

from trackd.sinks.concurrency import ConcurrencyLimit, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(
    limit: ConcurrencyLimit, clock: Clock, rtt: float, outcome: Outcome = Outcome.OK, calls: int = 0
) -> int:
    """`calls` calls (the limit's worth unless given) start now and end `rtt` later, each with
    `outcome`; a window closes once a past mean RTT has passed. Returns the limit after."""
    started = [limit.acquire() for _ in range(calls or limit.limit)]
    clock.now += rtt
    for start in started:
        limit.release(start, outcome)
    return limit.limit


def test_an_adaptive_limit_starts_at_one_call_and_a_fixed_one_at_its_ceiling() -> None:
    assert ConcurrencyLimit(8, adaptive=True).limit == 1
    assert ConcurrencyLimit(8, adaptive=False).limit == 8


def test_steady_latency_with_calls_at_the_limit_adds_one_call_a_window_up_to_the_ceiling() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(5, adaptive=True, clock=clock)
    limits = [window(limit, clock, 0.5) for _ in range(8)]
    assert limits == [1, 2, 3, 4, 5, 5, 5, 5]
    assert limit.increases == 4
    assert limit.decreases == 0


def test_the_limit_grows_only_when_the_calls_reached_it() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    for _ in range(4):
        window(limit, clock, 0.5)
    assert limit.limit == 4
    limits = [window(limit, clock, 0.5, calls=1) for _ in range(5)]
    assert limits == [4] * 5, "one call at a time is no evidence the server takes more"


def test_back_pressure_cuts_the_limit_by_a_tenth_at_least_one_down_to_one() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(40, adaptive=True, clock=clock)
    while limit.limit < 30:
        window(limit, clock, 0.5)
    limits = [window(limit, clock, 0.5, Outcome.BACK_PRESSURE, calls=1) for _ in range(6)]
    assert limits == [27, 24, 21, 18, 16, 14]
    while limit.limit > 1:
        window(limit, clock, 0.5, Outcome.BACK_PRESSURE, calls=1)
    assert window(limit, clock, 0.5, Outcome.BACK_PRESSURE, calls=1) == 1, "never below one"


def test_a_latency_rise_past_the_usual_spread_cuts_the_limit() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(16, adaptive=True, clock=clock)
    for _ in range(6):
        window(limit, clock, 0.5)
    assert limit.limit == 6
    assert window(limit, clock, 2.0) == 5, "four times the usual latency: the server queues"
    assert limit.decreases == 1


def test_errors_about_content_and_unsent_calls_do_not_move_the_limit() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    for _ in range(3):
        window(limit, clock, 0.5)
    assert limit.limit == 3
    assert [window(limit, clock, 0.5, Outcome.ERROR, calls=1) for _ in range(3)] == [3, 3, 3]
    assert [window(limit, clock, 0.5, Outcome.UNSENT) for _ in range(3)] == [3, 3, 3]


def test_a_fixed_limit_stays_at_its_ceiling_whatever_the_server_answers() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(4, adaptive=False, clock=clock)
    for outcome, rtt in [(Outcome.OK, 0.5)] * 3 + [(Outcome.BACK_PRESSURE, 5.0)] * 5:
        assert window(limit, clock, rtt, outcome) == 4
    assert limit.status() == {
        "mode": "fixed",
        "limit": 4,
        "ceiling": 4,
        "in_flight": 0,
        "increases": 0,
        "decreases": 0,
        "rtt_seconds": 0.5,
    }


def test_acquire_waits_while_the_limit_is_in_flight_and_goes_on_when_a_call_ends() -> None:
    limit = ConcurrencyLimit(4, adaptive=True)
    first = limit.acquire()
    second = threading.Thread(target=limit.acquire)
    second.start()
    second.join(0.2)
    assert second.is_alive(), "a second call waits at a limit of one"
    assert limit.in_flight == 1
    limit.release(first, Outcome.OK)
    second.join(10)
    assert not second.is_alive()
    assert limit.in_flight == 1


def test_a_ceiling_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="ceiling"):
        ConcurrencyLimit(0, adaptive=True)
