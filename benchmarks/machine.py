"""What the benchmark scripts ask of the machine: how busy it is, what a process costs, and
which trackd tree is being measured. Shared by log_latency.py, throughput.py and soak.py
(each run as `python benchmarks/SCRIPT.py`, so this directory is on their path)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def proc_run_seconds(pid: int) -> float:
    """Seconds the process's live threads ran on a CPU, in nanoseconds' precision.

    From each thread's /proc/PID/task/TID/schedstat, not the 10 ms clock ticks of
    /proc/PID/stat: a daemon that costs half a percent of a core runs 50 ticks a
    minute, so ticks alone put ±0.1% on a figure meant to be read to 0.05%.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended since the listing
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def wait_for_quiet(max_seconds: float, busy_below: float = 0.15) -> float:
    """Wait (up to `max_seconds`) for a second in which the CPUs are mostly idle; the busy share.

    Other people's processes on a shared 2-core machine distort a latency
    benchmark badly; this at least starts each measurement on a quiet machine
    and records how busy it was.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    deadline = time.monotonic() + max_seconds
    while True:
        total, idle = sample()
        time.sleep(1.0)
        total2, idle2 = sample()
        busy = 1 - (idle2 - idle) / max(1, total2 - total)
        if busy < busy_below or time.monotonic() > deadline:
            return busy


def provenance(python: str) -> dict[str, Any]:
    """Which trackd `python` imports: its source tree, commit, and uncommitted changes there.

    A tree exported with `git archive` (to measure a commit while others edit the
    checkout) has no .git; a file COMMIT beside its src/ names the commit.
    """
    done = subprocess.run(
        [python, "-c", "import trackd; print(trackd.__file__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"trackd_source": None, "commit": None, "src_changes_not_committed": []}
    root = Path(done.stdout.strip()).resolve().parents[2]  # ROOT/src/trackd/__init__.py

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit and (root / "COMMIT").exists():
        commit = (root / "COMMIT").read_text().strip()
    return {
        "trackd_source": str(root),
        "commit": commit,
        "src_changes_not_committed": git("status", "--short", "--", "src").splitlines(),
    }
