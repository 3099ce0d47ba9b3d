"""The MLflow sink's check after a crash, before and after issue 13: does it grow with the run?

    .venv/bin/python benchmarks/mlflow_recovery.py                  # 200,000 and 1,000,000 points
    .venv/bin/python benchmarks/mlflow_recovery.py --points 1000000 --keys 50

After a crash the fan-out sends again what it delivered since its last saved
cursor, and the sink must not store those points twice. For each run length:

* a fresh `mlflow server` (sqlite, 1 worker, 127.0.0.1; benchmarks/sinks.py) holds one
  run of POINTS points in KEYS keys (steps 0..POINTS/KEYS-1). The rows are put into its
  database with SQL, as MLflow's own store writes them (metrics and latest_metrics):
  a million points through the REST API take over ten minutes on this machine, and the
  checks read them through the server like any other run.
* before (the sink up to issue 13): for each key the whole metric history,
  `MlflowClient.get_metric_history` (what `_stored` fetched, one key at a time).
* after: the sink's own check of the doubtful points, `MlflowSink._not_stored`, given
  the points of one full batch (`batch_rows` log calls, or as many as the batcher's
  MAX_BATCH_BYTES holds where that stops it first, x KEYS keys; the last steps of the
  run, all of them stored: the worst case, as when the batch in flight at
  the crash had been stored whole). Records before it are skipped unasked (the sink
  knows them delivered), so this is the whole of the check.

Both must find every point; the time of each and the load average go to stdout.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sinks import MlflowServer  # the benchmark's own server, ended by PID

BASE_MS = 1_700_000_000_000


def fill(database: Path, run_id: str, points: int, keys: list[str]) -> None:
    """POINTS points of the run, as MLflow's SQL store stores them (no NaN)."""
    steps = points // len(keys)
    with sqlite3.connect(database) as connection:
        connection.executemany(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)"
            " VALUES (?, ?, ?, ?, ?, 0)",
            (
                (key, float(step + index), BASE_MS + step, run_id, step)
                for step in range(steps)
                for index, key in enumerate(keys)
            ),
        )
        connection.executemany(
            "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)"
            " VALUES (?, ?, ?, ?, 0, ?)",
            (
                (key, float(steps - 1 + index), BASE_MS + steps - 1, steps - 1, run_id)
                for index, key in enumerate(keys)
            ),
        )


def measure(points: int, keys: list[str]) -> dict[str, Any]:
    import msgpack
    from mlflow.tracking import MlflowClient

    from trackd.daemon.batcher import MAX_BATCH_BYTES
    from trackd.sinks.base import SinkContext
    from trackd.sinks.mlflow import MlflowSink

    work = Path(tempfile.mkdtemp(prefix="trackd-recovery-"))
    server = MlflowServer(work / "mlflow")
    try:
        client = MlflowClient(tracking_uri=server.uri)
        run_id = client.create_run(client.create_experiment("recovery")).info.run_id
        fill(work / "mlflow" / "mlflow.db", run_id, points, keys)
        steps = points // len(keys)
        load = os.getloadavg()[0]

        began = time.perf_counter()
        histories = [client.get_metric_history(run_id, key) for key in keys]
        before = time.perf_counter() - began
        assert sum(map(len, histories)) == points, "the run does not hold every point"

        sink = MlflowSink(server.uri)
        sink.open(SinkContext(None, work / "state"))
        row = msgpack.packb([steps, BASE_MS / 1000, dict.fromkeys(keys, 0.5)])
        batch = min(MlflowSink.batch_rows, MAX_BATCH_BYTES // len(row))  # rows, as batcher.py
        last = range(max(0, steps - batch), steps)
        doubtful = [
            (key, float(step + index), BASE_MS + step, step)
            for step in last
            for index, key in enumerate(keys)
        ]
        began = time.perf_counter()
        fresh = sink._not_stored(run_id, doubtful)  # the whole post-crash check
        after = time.perf_counter() - began
        sink.close()
        assert fresh == [], f"{len(fresh)} stored points not found"
        return {
            "points": points,
            "keys": len(keys),
            "before": before,
            "after": after,
            "checked": len(doubtful),
            "load": load,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--keys", type=int, default=50)
    args = parser.parse_args()
    keys = [f"metric_{index:02d}" for index in range(args.keys)]
    print(f"{'points':>10}{'keys':>6}{'before s':>10}{'after s':>9}{'doubtful':>10}{'load':>6}")
    for points in args.points:
        result = measure(points, keys)
        print(
            f"{result['points']:>10,}{result['keys']:>6}{result['before']:>10.2f}"
            f"{result['after']:>9.2f}{result['checked']:>10,}{result['load']:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
