"""Damaged state files never stop the daemon (issue 12 §4): it starts, rebuilds what it can
from the WAL, and logs and counts what it could not read.

Before, a ledger checkpoint cut in half stopped it at start
(`ValueError: Unpack failed: incomplete input`), and so did a cut delivery progress file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import Daemon, finish_client, jsonl_runs, run_client

SMALL_SEGMENTS = {"TRACKD_WAL_SEGMENT_BYTES": str(16 * 1024)}


def cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9])
def test_cut_state_files_are_rebuilt_from_the_wal(
    daemon: Daemon, env: dict[str, str], fraction: float
) -> None:
    daemon.start(extra_env=SMALL_SEGMENTS)
    finish_client(run_client(env, "--name", "before", "--rows", "3000"))
    # acked before it starts, so its first commit opens a second segment (counts.json)
    finish_client(run_client(env, "--name", "second", "--rows", "10"))
    daemon.flush()
    assert daemon.stop() == 0
    data = daemon.data_dir
    counted = [data / "ledger.msgpack", *sorted(data.glob("sinks/*/cursor.json"))]
    assert len(counted) == 2
    recounted = data / "wal" / "counts.json"  # the WAL counts its segments again, unasked
    assert len(list(data.glob("wal/*.wal"))) >= 2
    for path in [*counted, recounted]:
        cut(path, fraction)

    daemon.start(extra_env=SMALL_SEGMENTS)
    state = daemon.status()["state"]
    assert state["unreadable_files"] == len(counted)
    assert "ledger.msgpack" in daemon.log()
    assert "cursor.json" in daemon.log()
    finish_client(run_client(env, "--name", "after", "--rows", "500"))
    daemon.flush()
    runs = {run["name"]: run for run in daemon.request("runs")}
    assert runs["before"]["rows"] == 3000, "the ledger rebuilt from the WAL knows the old run"
    assert runs["after"]["rows"] == 500
    (sink,) = daemon.status()["sinks"].values()
    assert sink["lag_records"] == 0
    delivered = jsonl_runs(data / "runs")
    steps = {
        name.rsplit("-", 1)[0]: Counter(row["step"] for row in rows)
        for name, rows in delivered.items()
    }
    assert set(steps["before"]) == set(range(3000)), "nothing lost (it may come again)"
    assert steps["after"] == Counter(range(500)), "every row once"
    assert daemon.stop() == 0
