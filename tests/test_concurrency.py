"""The adaptive concurrency limit in-process: outcomes and latencies in, limits out, on an
injected clock, so each window's round-trip time is exact (issue 13 §3)."""

from __future__ import annotations

import itertools
import threading

import pytest

from trackd.sinks.concurrency import BASE_EVERY, BASE_WINDOWS, ConcurrencyLimit, Outcome


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


def test_steady_latency_at_the_limit_adds_one_call_every_other_window_to_the_ceiling() -> None:
    """One call's RTT alone is measured first (the windows at one after the first answer's);
    then the window right after a change is no evidence: its calls started at the old limit.
    Steady latency: no call waits at the server, so one more, up to the ceiling."""
    clock = Clock()
    limit = ConcurrencyLimit(5, adaptive=True, clock=clock)
    limits = [window(limit, clock, 0.5) for _ in range(12)]
    assert limits == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert limit.increases == 4
    assert limit.decreases == 0


def test_a_limit_held_a_while_goes_back_to_one_call_a_few_windows_and_returns() -> None:
    """One call's RTT alone is measured again `BASE_EVERY` windows after the limit left one
    call: the server may have slowed or sped up since, and the waiting calls are counted
    against what it does now."""
    clock = Clock()
    limit = ConcurrencyLimit(5, adaptive=True, clock=clock)
    limits = "".join(str(window(limit, clock, 0.5)) for _ in range(BASE_EVERY + 30))
    held = limits[limits.index("5") :]
    probe = "5" + "1" * (BASE_WINDOWS + 1) + "5"  # the window after the change, then measured
    assert held.count(probe) == 1, held
    assert set(held.replace(probe, "55")) == {"5"}, held
    assert (limit.increases, limit.decreases) == (4, 0), "a probe is neither"


def test_the_limit_grows_only_when_the_calls_reached_it() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    for _ in range(9):
        window(limit, clock, 0.5)
    assert limit.limit == 4
    limits = [window(limit, clock, 0.5, calls=1) for _ in range(5)]
    assert limits == [4] * 5, "one call at a time is no evidence the server takes more"


JITTER = (1.0, 1.04, 0.97, 1.02, 0.96, 1.03)


def serve(
    limit: ConcurrencyLimit, clock: Clock, workers: int, slowness: float, windows: int
) -> str:
    """`windows` windows of a server with `workers` that each take `slowness` s a call, with
    a few % of jitter: RTTs in proportion to the calls waiting. The limits after, as digits."""
    jitter = itertools.cycle(JITTER)
    return "".join(
        str(window(limit, clock, slowness * max(1.0, limit.limit / workers) * next(jitter)))
        for _ in range(windows)
    )


def held(limits: str, workers: int) -> None:
    """Three or four calls more than the workers, but for the windows of a probe at one call."""
    assert set(limits) - {"1"} <= {str(workers + 3), str(workers + 4)}, limits
    assert limits.count("1") <= 0.1 * len(limits), limits


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_server_with_few_workers_is_given_three_or_four_calls_more_than_it_serves(
    workers: int,
) -> None:
    """Past the calls a server serves at once, each call more only waits and raises the RTT
    by one call's time: the sink keeps three or four waiting, so that no worker idles between
    its calls, and no more (a 1-worker sqlite `mlflow server` stores less the more calls it
    holds). Vector's rule (grow while the RTT is no worse than the past mean) drifted to the
    ceiling here: each step's rise soon became the mean."""
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    held(serve(limit, clock, workers, 0.1, BASE_EVERY + 50)[40:], workers)


def test_a_server_that_slows_down_for_good_is_given_fewer_calls() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    held(serve(limit, clock, 4, 0.1, 60)[30:], 4)
    slower = serve(limit, clock, 2, 0.2, BASE_EVERY + 50)  # 2 workers left, twice as slow
    probe = slower.index("1" * BASE_WINDOWS)  # one call's RTT alone, measured again
    assert max(slower[10:probe]) <= "6", "fewer calls within a few windows"
    held(slower[probe + 20 :], 2)


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


def test_a_latency_that_says_calls_wait_cuts_the_limit() -> None:
    """Four times one call's RTT alone: of 7 calls, 5.25 wait, more than `WAITING_HIGH`. (The
    first slow window still holds five answers of the window before, so it reads 2 waiting
    and adds one; the next is the one after a change, no evidence.)"""
    clock = Clock()
    limit = ConcurrencyLimit(16, adaptive=True, clock=clock)
    for _ in range(13):
        window(limit, clock, 0.5)
    assert limit.limit == 6
    assert [window(limit, clock, 2.0) for _ in range(3)] == [7, 7, 6]
    assert limit.decreases == 1


def test_errors_about_content_and_unsent_calls_do_not_move_the_limit() -> None:
    clock = Clock()
    limit = ConcurrencyLimit(8, adaptive=True, clock=clock)
    for _ in range(7):
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
