"""A training script stand-in: log N rows to one run, then print a JSON result line."""

from __future__ import annotations

import argparse
import json
import time

import trackd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", default="p")
    parser.add_argument("--name", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--mode", default="online")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds to sleep every 100 rows")
    parser.add_argument("--finish-timeout", type=float, default=60.0)
    parser.add_argument("--resume", default=None, help="init(resume=...)")
    parser.add_argument("--media-last", action="store_true", help="end on a histogram's step")
    parser.add_argument("--alert-every", type=int, default=0, help="an alert every N rows")
    args = parser.parse_args()

    run = trackd.init(
        project=args.project,
        name=args.name,
        config={"rows": args.rows},
        mode=args.mode,
        resume=args.resume,
    )
    worst = 0.0
    for step in range(args.rows):
        started = time.perf_counter()
        run.log({"loss": 1.0 / (step + 1), "acc": step / args.rows, "i": step})
        worst = max(worst, time.perf_counter() - started)
        if args.alert_every and step % args.alert_every == 0:
            run.alert(f"row {step}", "", level="WARN")
        if args.pace and step % 100 == 99:
            time.sleep(args.pace)
    if args.media_last:
        run.log({"weights": trackd.Histogram([1.0, 2.0, 3.0], num_bins=2)})
    began = time.perf_counter()
    run.finish(timeout=args.finish_timeout)
    print(
        json.dumps(
            {
                "id": run.id,
                "worst_log_seconds": worst,
                "finish_seconds": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()
