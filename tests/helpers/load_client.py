"""A training process with a known footprint, for the system sampler's tests: it opens a
run, holds `--rss-mb` MiB of touched memory, spins one core (`--busy`) or sleeps, and
prints {"id", "pid", "threads"} once the run is open (stdout is flushed) and again at the
end. It finishes the run when the `--stop` file exists."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import trackd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--rss-mb", type=int, default=0)
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()

    ballast = bytearray(b"\x01") * (args.rss_mb * 1024 * 1024)  # every page touched
    run = trackd.init(project="sys", name=args.name)
    run.log({"up": 1})
    line = {"id": run.id, "pid": os.getpid(), "threads": threading.active_count()}
    print(json.dumps(line), flush=True)
    spins = 0
    while not os.path.exists(args.stop):
        if args.busy:
            for _ in range(100_000):
                spins += 1
        else:
            time.sleep(0.05)
    line["threads"] = threading.active_count()
    run.finish(timeout=60)
    print(json.dumps(line | {"ballast": len(ballast)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
