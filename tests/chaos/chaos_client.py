"""A chaos-test training script: log ROWS rows (one metric, "i" = step) at a steady rate.

Each `run.log()` call is timed on its own; the last line printed is JSON with the
run id, the worst call (and its step), the 99th and 99.9th percentiles, how many
calls took over 1 ms and over 10 ms, and how long `finish()` took.
One metric per row keeps the MLflow server (an sqlite store, a few thousand points a
second) able to take a million rows within the chaos test's time budget.
"""

from __future__ import annotations

import argparse
import json
import time
from array import array

import trackd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", default="chaos")
    parser.add_argument("--name", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="spread the rows over this")
    parser.add_argument("--finish-timeout", type=float, default=60.0)
    args = parser.parse_args()

    run = trackd.init(project=args.project, name=args.name, config={"rows": args.rows})
    durations = array("d", bytes(8 * args.rows))
    rate = args.rows / args.seconds if args.seconds > 0 else 0.0
    began = time.monotonic()
    for step in range(args.rows):
        started = time.perf_counter()
        run.log({"i": step})
        durations[step] = time.perf_counter() - started
        if rate and step % 100 == 99:
            ahead = began + (step + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    logged = time.monotonic() - began
    finishing = time.perf_counter()
    run.finish(timeout=args.finish_timeout)
    worst_step = max(range(args.rows), key=durations.__getitem__) if args.rows else 0
    ordered = sorted(durations)
    print(
        json.dumps(
            {
                "id": run.id,
                "rows": args.rows,
                "log_phase_seconds": round(logged, 3),
                "worst_log_seconds": ordered[-1],
                "worst_log_step": worst_step,
                "log_calls_over_1ms": sum(1 for d in durations if d > 0.001),
                "log_calls_over_10ms": sum(1 for d in durations if d > 0.01),
                "p99_log_seconds": ordered[int(0.99 * (len(ordered) - 1))],
                "p999_log_seconds": ordered[int(0.999 * (len(ordered) - 1))],
                "finish_seconds": round(time.perf_counter() - finishing, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
