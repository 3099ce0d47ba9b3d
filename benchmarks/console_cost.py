"""What console capture and code saving cost the training process (issue 11, section 5).

    python benchmarks/console_cost.py                    # everything
    python benchmarks/console_cost.py --lines 100000 --repeats 3 --init-runs 9
    python benchmarks/console_cost.py --save benchmarks/results/console_cost.json

* `print()` per line: a worker prints `--lines` lines (`print(f"step {i} loss {x}")`: two
  writes, the text and the newline; `print(a, b, c)` makes one write per argument and
  separator, and the tee costs per write)
  to a file, timed with `perf_counter_ns` around the whole loop, and the process's
  CPU (`time.process_time()`, all threads: the delivery thread's line splitting and
  packing included) from the loop's start until the lines are delivered (`flush()`;
  for wandb, `finish()`). Cases: no tracker at all, trackd `console="off"`, trackd
  `console="wrap"` (online, through a daemon of this script's own), and wandb offline
  with its own console capture (`console="wrap"`). Added per line = wrap - off.
* `init()`: a fresh process per call, in a git checkout (this repository, as it is)
  and outside any repository; `save_code=True` against `False`, alternated, the
  median of `--init-runs` calls each. Added = True - False.

Each measured thing runs in a fresh subprocess of this script (`--worker ...`); the
daemon runs in a temporary directory on ipc:// sockets and is ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import provenance, wait_for_quiet

ROOT = Path(__file__).resolve().parents[1]
PRINT_CASES = ("none", "trackd-off", "trackd-wrap", "wandb-wrap")


# --- workers (in their own processes) ----------------------------------------------------


def print_worker(case: str, lines: int, out: str) -> dict[str, Any]:
    """Print `lines` lines to `out` under `case`; wall ns and CPU ns per line."""
    sys.stdout = open(out, "w", buffering=8192)  # noqa: SIM115 (the process's stdout to the end)
    run: Any = None
    if case.startswith("trackd"):
        import trackd

        run = trackd.init(project="bench", console=case.removeprefix("trackd-"), save_code=False)
    elif case == "wandb-wrap":
        import wandb

        run = wandb.init(project="bench", mode="offline", settings=wandb.Settings(console="wrap"))
    for index in range(min(2000, lines // 50)):  # warm-up
        print("warm", index)
    if run is not None and case.startswith("trackd"):
        run.flush(timeout=60)
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for index in range(lines):
        print(f"step {index} loss {0.5 * index}")
    wall = time.perf_counter_ns() - start
    if case.startswith("trackd"):
        assert run.flush(timeout=300), "trackd did not deliver the lines"
    elif case == "wandb-wrap":
        run.finish()  # where wandb hands over what it still holds
    sys.stdout.flush()
    cpu = time.process_time_ns() - cpu
    if case.startswith("trackd"):
        run.finish()
    return {"wall_ns_per_line": wall / lines, "cpu_ns_per_line": cpu / lines}


def init_worker(save_code: bool) -> dict[str, Any]:
    import trackd

    start = time.perf_counter_ns()
    run = trackd.init(project="bench", save_code=save_code, console="off")
    elapsed = time.perf_counter_ns() - start
    run.finish()
    return {"init_ms": elapsed / 1e6}


# --- the driver ------------------------------------------------------------------------


def worker(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stderr.strip().splitlines()[-1])
    return result


def start_daemon(env: dict[str, str]) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "trackd", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [sys.executable, "-m", "trackd", "status", "--json"],
            env=env,
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return daemon
        time.sleep(0.5)
    daemon.kill()
    raise RuntimeError("the daemon did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5, help="print runs per case")
    parser.add_argument(
        "--wandb-lines", type=int, default=5_000, help="lines for wandb (ms a line: fewer)"
    )
    parser.add_argument("--init-runs", type=int, default=15, help="init() calls per case")
    parser.add_argument("--cases", default=",".join(PRINT_CASES))
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = (
            print_worker(rest[0], int(rest[1]), rest[2])
            if kind == "print"
            else init_worker(rest[0] == "1")
        )
        print(json.dumps(result), file=sys.stderr)
        return

    temporary = Path(tempfile.mkdtemp(prefix="trackd-console-bench-"))
    env = {
        **os.environ,
        "TRACKD_DATA_DIR": str(temporary / "data"),
        "TRACKD_RUNTIME_DIR": str(temporary / "rt"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(temporary / "wandb"),
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }
    (temporary / "wandb").mkdir()
    outside = temporary / "plain"
    outside.mkdir()
    report: dict[str, Any] = {"provenance": provenance(sys.executable), "lines": args.lines}
    daemon = start_daemon(env)
    try:
        report["machine_busy_before"] = wait_for_quiet(args.quiet_wait)
        prints: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):
            for case in args.cases.split(","):
                out = str(temporary / f"{case}.out")
                wandb = case.startswith("wandb")
                lines = min(args.lines, args.wandb_lines) if wandb else args.lines
                prints.setdefault(case, []).append(
                    worker(env, outside, "print", case, str(lines), out)
                )
        report["print"] = {
            case: {
                key: statistics.median(r[key] for r in runs)
                for key in ("wall_ns_per_line", "cpu_ns_per_line")
            }
            for case, runs in prints.items()
        }
        inits: dict[str, list[float]] = {}
        for _ in range(args.init_runs):
            for where, cwd in (("git-checkout", ROOT), ("no-repo", outside)):
                for save in ("1", "0"):
                    result = worker(env, cwd, "init", save)
                    inits.setdefault(f"{where}/save_code={save == '1'}", []).append(
                        result["init_ms"]
                    )
        report["init_ms_median"] = {case: statistics.median(v) for case, v in inits.items()}
        report["machine_busy_after"] = wait_for_quiet(0)
    finally:
        stop(daemon)
        shutil.rmtree(temporary, ignore_errors=True)

    print(f"print() per line, {args.lines} lines, median of {args.repeats} runs:")
    for case, figures in report["print"].items():
        print(
            f"  {case:12} wall {figures['wall_ns_per_line'] / 1000:6.2f} µs"
            f"  CPU {figures['cpu_ns_per_line'] / 1000:6.2f} µs"
        )
    off, wrap = report["print"].get("trackd-off"), report["print"].get("trackd-wrap")
    if off and wrap:
        for key in ("wall_ns_per_line", "cpu_ns_per_line"):
            print(f"  added by console='wrap' ({key}): {(wrap[key] - off[key]) / 1000:.2f} µs")
    print(f"init() ms, median of {args.init_runs} fresh processes:")
    for case, value in report["init_ms_median"].items():
        print(f"  {case:32} {value:7.1f} ms")
    print(
        f"machine busy before/after: {report['machine_busy_before']:.0%} / "
        f"{report['machine_busy_after']:.0%}"
    )
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
