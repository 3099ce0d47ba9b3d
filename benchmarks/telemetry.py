"""What node telemetry costs: one function per case, each returning its figures.

    python benchmarks/telemetry.py                          # every case
    python benchmarks/telemetry.py --cases sampler --save benchmarks/results/telemetry.json

Cases (`CASES`; add one by writing a function `(args) -> dict` and listing it there):

* `sampler`: the daemon's CPU for system metrics with 4 runs open on the node. For each
  `system_interval` (off, 1 s, 10 s) a fresh daemon (default JSONL sink) and 4 client
  processes that open a run, log one row and then sleep; after a settling period the
  daemon's CPU seconds are read over `--window` seconds (each thread's run time from
  /proc/PID/task/TID/schedstat, to the nanosecond: the 10 ms clock ticks of
  /proc/PID/stat are too coarse for a figure of half a percent). The cost of sampling
  is the difference from the daemon with sampling off, over the same window: per
  sampling round (one round = one `system` message per run, sampled, made durable in the
  WAL and written to system.jsonl) and as a share of one core. Rounds are counted from
  the daemon's own `trackd status` (samples acked / 4), which also gives the sampler
  thread's own CPU (psutil and NVML reads only): the rest is the pipeline every message
  takes (WAL commit, fan-out, the JSONL sink's appends and checkpoints).
* `threads`: the training process's thread count (/proc/PID/status `Threads`, after
  `init()` and a `log()`) with system metrics on (1 s) and off: the daemon samples, so
  the training process runs no sampler thread of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import proc_run_seconds, proc_status_kb, provenance, wait_for_quiet
from throughput import Daemon

RUNS = 4
# A training process stand-in: open a run, log a row, report its thread count, then idle
# until stdin closes.
CLIENT = """
import json, sys, trackd
from pathlib import Path
run = trackd.init(project="telemetry", name=sys.argv[1])
run.log({"up": 1})
run.flush(timeout=30)
status = Path("/proc/self/status").read_text().splitlines()
threads = int(next(line for line in status if line.startswith("Threads:")).split()[1])
print(json.dumps({"threads": threads}), flush=True)
sys.stdin.read()
run.finish(timeout=30)
"""


def _with_runs(
    args: argparse.Namespace, interval: float, measure: Callable[[Daemon, list[int]], Any]
) -> Any:
    """A fresh daemon sampling every `interval` s (0: off) and RUNS open runs; `measure` it."""
    work = Path(tempfile.mkdtemp(prefix=f"trackd-telemetry-{interval:g}-"))
    env = {"TRACKD_SYSTEM_INTERVAL": str(interval)}
    daemon = Daemon(args.python, work, None, "trackd", env)
    clients: list[subprocess.Popen[str]] = []
    try:
        for index in range(RUNS):
            clients.append(
                subprocess.Popen(
                    [args.python, "-c", CLIENT, f"run-{index}"],
                    env={**os.environ, **daemon.env()},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        threads = [json.loads(client.stdout.readline())["threads"] for client in clients]  # type: ignore[union-attr]
        return measure(daemon, threads)
    finally:
        for client in clients:
            client.communicate(timeout=60)
        daemon.stop()


def sampler(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for interval in (0.0, 1.0, 10.0):

        def measure(daemon: Daemon, threads: list[int]) -> dict[str, Any]:
            time.sleep(args.settle)
            busy = wait_for_quiet(args.quiet_wait)
            before = daemon.request("status")["system"]
            cpu_before, started = proc_run_seconds(daemon.pid), time.monotonic()
            time.sleep(args.window)
            cpu = proc_run_seconds(daemon.pid) - cpu_before
            elapsed = time.monotonic() - started
            after = daemon.request("status")["system"]
            samples = after.get("samples", 0) - before.get("samples", 0)
            reading = after.get("cpu_seconds", 0.0) - before.get("cpu_seconds", 0.0)
            rounds = samples / RUNS
            return {
                "sampler_thread_cpu_ms_per_round": round(1000 * reading / rounds, 3)
                if rounds
                else None,
                "machine_busy_before": round(busy, 3),
                "window_seconds": round(elapsed, 2),
                "daemon_cpu_seconds": round(cpu, 3),
                "rounds": rounds,
                "daemon_rss_kb": proc_status_kb(daemon.pid, "VmRSS"),
            }

        results[f"{interval:g}"] = _with_runs(args, interval, measure)
    off = results["0"]
    for interval in ("1", "10"):
        on = results[interval]
        added = on["daemon_cpu_seconds"] / on["window_seconds"]
        added -= off["daemon_cpu_seconds"] / off["window_seconds"]
        on["added_share_of_one_core_percent"] = round(100 * added, 3)
        rounds = on["rounds"] / on["window_seconds"]
        on["added_cpu_ms_per_round"] = round(1000 * added / rounds, 3) if rounds else None
    return results


def threads(args: argparse.Namespace) -> dict[str, Any]:
    counts = {
        label: _with_runs(args, interval, lambda _daemon, found: found)
        for label, interval in (("off", 0.0), ("on_1s", 1.0))
    }
    return {**counts, "equal": counts["off"] == counts["on_1s"]}


CASES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "sampler": sampler,
    "threads": threads,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of CPU measured")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"provenance": provenance(args.python)}
    for name in args.cases.split(","):
        report[name] = CASES[name](args)
        print(json.dumps({name: report[name]}, indent=2), flush=True)
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
