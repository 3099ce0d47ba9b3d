"""What a drop-in call costs over the same `run.log`, measured in one process, interleaved.

    python benchmarks/dropin_overhead.py                  # a daemon of its own, 20 x 5,000 calls

`dropin.py` times each library in its own process, so on a shared machine a slow moment
lands on one case and not another. Here `run.log(values, step)`, `wandb.log(values)`
(trackd.wandb) and `mlflow.log_metrics(values, step=step)` (trackd.mlflow) take turns in
blocks of calls in one process, three runs logging through one daemon, and each call is
timed with `perf_counter_ns`; the medians are compared (target: at most 1 µs more).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Log = Callable[[dict[str, float], int], None]


def measure(blocks: int, calls: int) -> dict[str, list[int]]:
    import trackd
    from trackd import mlflow, wandb

    base = trackd.init(project="bench", name="overhead-run-log")
    shim_run = wandb.init(project="bench", name="overhead-wandb")
    mlflow.set_experiment("bench")
    mlflow.start_run(run_name="overhead-mlflow")
    log_metrics = mlflow.log_metrics
    cases: dict[str, Log] = {
        # wrapped in a lambda as the others are, so that the wrapper's cost cancels out
        "trackd run.log": lambda values, step: base.log(values, step),  # noqa: PLW0108
        "trackd.wandb run.log": lambda values, step: shim_run.log(values),
        "trackd.wandb wandb.log": lambda values, step: wandb.log(values),
        "trackd.mlflow log_metrics": lambda values, step: log_metrics(values, step=step),
    }
    times: dict[str, list[int]] = {case: [] for case in cases}
    timer = time.perf_counter_ns
    for block in range(blocks):
        for case, log in cases.items():
            kept = times[case]
            for index in range(calls):
                step = block * calls + index
                values = {"loss": 1.0 / (step + 1), "acc": 0.5, "lr": 3e-4}
                began = timer()
                log(values, step)
                kept.append(timer() - began)
    base.finish()
    shim_run.finish()
    mlflow.end_run()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trackd-overhead-") as folder:
        os.environ["TRACKD_RUNTIME_DIR"] = f"{folder}/rt"
        os.environ["TRACKD_DATA_DIR"] = f"{folder}/data"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "trackd", "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not Path(f"{folder}/rt/control.sock").exists():
                time.sleep(0.1)
            times = measure(args.blocks, args.calls)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    medians = {case: statistics.median(kept) / 1e3 for case, kept in times.items()}
    base = medians["trackd run.log"]
    for case, median in medians.items():
        extra = "" if case == "trackd run.log" else f"  ({median - base:+.2f} µs over run.log)"
        print(f"{case:<28} p50 {median:6.2f} µs{extra}")
    if args.json:
        args.json.write_text(json.dumps({"p50_us": medians}, indent=1) + "\n")


if __name__ == "__main__":
    main()
