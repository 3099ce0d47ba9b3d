"""What `trackd status --json` costs against the backlog of a stopped sink (issue 12 §2).

For each backlog size: a data directory with that many records in the WAL
(tests/backlog.py), a daemon whose only sink is held down (the test
plugin `gated`, its gate closed, so its cursor stays at the start), then
`trackd status --json` run `--repeat` times through the CLI; the median and
the worst wall time are printed with the lag the daemon reported. The CLI gives
up after 2 s (the client's control timeout), so the same request is also timed
without that limit (`direct_*`): what the daemon's event loop spends answering.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import provenance, wait_for_quiet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from backlog import write_backlog  # noqa: E402
from trackd.client.control import DaemonUnreachable, request  # noqa: E402


def measure(records: int, repeat: int, python: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="trackd-status-") as scratch:
        root = Path(scratch)
        data, runtime, gate = root / "data", root / "rt", root / "gate"
        gate.touch()
        if records:
            write_backlog(data, records)
        env = {
            **os.environ,
            "TRACKD_DATA_DIR": str(data),
            "TRACKD_RUNTIME_DIR": str(runtime),
            "TRACKD_SINKS": f"gated:{root / 'out'}?gate={gate}",
            # a tree exported with `git archive` (to measure a commit) may come first on the path
            "PYTHONPATH": os.pathsep.join(
                filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "tests" / "plugins")])
            ),
        }
        env.pop("TRACKD_ENDPOINT", None)
        daemon = subprocess.Popen(
            [python, "-m", "trackd", "serve"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            status = _wait_answering(runtime)
            wait_for_quiet(20)
            times, failed, direct = [], 0, []
            for _ in range(repeat):
                began = time.perf_counter()
                try:
                    _status(python, env)
                    times.append(time.perf_counter() - began)
                except subprocess.CalledProcessError:
                    failed += 1
                began = time.perf_counter()
                status = request("status", runtime_dir=str(runtime), timeout=300)
                direct.append(time.perf_counter() - began)
        finally:
            daemon.kill()
            daemon.wait()
    sink = next(iter(status["sinks"].values()))
    return {
        "records": records,
        "lag_records": sink["lag_records"],
        "cli_median_s": round(statistics.median(times), 3) if times else None,
        "cli_worst_s": round(max(times), 3) if times else None,
        "cli_failed": failed,
        "direct_median_s": round(statistics.median(direct), 3),
        "direct_worst_s": round(max(direct), 3),
    }


def _wait_answering(runtime: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while True:
        try:
            status: dict[str, Any] = request("status", runtime_dir=str(runtime), timeout=300)
            return status
        except DaemonUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _status(python: str, env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [python, "-m", "trackd", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    status: dict[str, object] = json.loads(done.stdout)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, nargs="+", default=[0, 1_000_000, 5_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    arguments = parser.parse_args()
    print(json.dumps({"provenance": provenance(arguments.python)}))
    for records in arguments.records:
        print(json.dumps(measure(records, arguments.repeat, arguments.python)), flush=True)


if __name__ == "__main__":
    main()
