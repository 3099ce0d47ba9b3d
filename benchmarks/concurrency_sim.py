"""The adaptive concurrency limit against simulated servers: where its limit settles, and what
the server stores (issue 13 §2 and §3).

    .venv/bin/python benchmarks/concurrency_sim.py                       # this checkout's
    .venv/bin/python benchmarks/concurrency_sim.py --src /tmp/other/src  # another tree's

An event-driven model, no network and no threads: N sinks, each with its own
`trackd.sinks.concurrency.ConcurrencyLimit` (of `--src`) on the simulated clock, send
calls to one server with `workers` that serve a FIFO queue. A call takes `service`
seconds times lognormal noise, times (1 + `contention` x (calls in the server - 1)):
an `mlflow server` runs every request it holds at once in its thread pool, and a
1-worker sqlite server stored 3,880 steps/s with 1 call at once and 3,583 with 4 on
2026-12-02 (about 4% a call). Between a call's end and the sink's next call, `gap`
seconds pass (the body built, the request sent). Each case runs 3 seeds; the table
shows the stored calls/s against the server's best (all workers busy, no contention)
and the sinks' mean limit in the last three quarters of the run.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES: list[tuple[str, dict[str, Any]]] = [
    ("1 worker, 1 sink", {"sinks": 1, "workers": 1, "contention": 0.04}),
    ("1 worker, 1 sink, no contention", {"sinks": 1, "workers": 1}),
    ("2 workers, 1 sink", {"sinks": 1, "workers": 2, "contention": 0.04}),
    ("4 workers, 1 sink", {"sinks": 1, "workers": 4, "contention": 0.04}),
    ("8 workers, 1 sink", {"sinks": 1, "workers": 8, "contention": 0.04}),
    ("2 workers, 8 sinks", {"sinks": 8, "workers": 2, "contention": 0.04}),
    ("2 workers, 8 sinks, no contention", {"sinks": 8, "workers": 2}),
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    sinks: int,
    workers: int,
    contention: float = 0.0,
    service: float = 0.115,
    noise: float = 0.15,
    gap: float = 0.003,
    ceiling: int = 8,
    seconds: float = 600.0,
    seed: int = 0,
) -> tuple[float, float]:
    """(calls stored per second, the sinks' mean limit after the first quarter)."""
    from trackd.sinks.concurrency import ConcurrencyLimit, Outcome

    rng = random.Random(seed)
    clock = Clock()
    limits = [ConcurrencyLimit(ceiling, adaptive=True, clock=clock) for _ in range(sinks)]
    events: list[tuple[float, int, str, int, float]] = []
    queue: list[tuple[int, float]] = []
    busy = stored = order = 0
    samples: list[int] = []
    next_sample = 0.0

    def schedule(at: float, kind: str, sink: int, started: float) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, sink, started))

    def send(sink: int) -> None:
        limit = limits[sink]
        while limit.in_flight < limit.limit:
            schedule(clock.now + gap, "arrive", sink, limit.acquire())

    def serve() -> None:
        nonlocal busy
        while busy < workers and queue:
            sink, started = queue.pop(0)
            busy += 1
            inside = busy + len(queue)
            took = service * rng.lognormvariate(0, noise) * (1 + contention * (inside - 1))
            schedule(clock.now + took, "done", sink, started)

    for sink in range(sinks):
        send(sink)
    while events:
        at, _, kind, sink, started = heapq.heappop(events)
        if at > seconds:
            break
        clock.now = at
        if at >= next_sample:
            if at > seconds / 4:
                samples.extend(limit.limit for limit in limits)
            next_sample += 1.0
        if kind == "arrive":
            queue.append((sink, started))
            serve()
        else:
            busy -= 1
            stored += 1
            limits[sink].release(started, Outcome.OK)
            serve()
            send(sink)
    return stored / seconds, statistics.mean(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="trackd's tree")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    print(f"{'server, sinks':36} {'stored / best':>14} {'mean limit':>11}")
    for label, case in CASES:
        runs = [simulate(seed=seed, **case) for seed in range(3)]
        best = case["workers"] / 0.115
        stored = statistics.mean(rate for rate, _ in runs) / best
        limit = statistics.mean(mean for _, mean in runs)
        print(f"{label:36} {stored:>13.0%} {limit:>11.1f}")


if __name__ == "__main__":
    main()
