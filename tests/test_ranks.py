"""Processes of one distributed job log into one trackd run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import Daemon, free_port, jsonl_runs

RANK_SCRIPT = r"""
import sys
import trackd

ranks, rows = sys.argv[1], int(sys.argv[2])
run = trackd.init(project="dist", name="job", config={"world": 4}, ranks=ranks)
for step in range(rows):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
run.finish()
"""


def launch(env: dict[str, str], ranks: str, rows: int) -> None:
    """Four processes as torchrun would start them: RANK 0-3, WORLD_SIZE 4, one rendezvous
    (a port of its own, so no job running beside it on the machine is the same job)."""
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, ranks, str(rows)],
            env={
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "4",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stderr=subprocess.PIPE,
        )
        for rank in range(4)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()


@pytest.mark.parametrize(("ranks", "expected"), [("zero", {"loss"}), ("all", None)])
def test_four_ranks_make_one_run(
    daemon: Daemon, env: dict[str, str], ranks: str, expected: set[str] | None
) -> None:
    """ranks="zero": only rank 0's rows; ranks="all": every rank's rows under rank{N}/ keys."""
    daemon.start()
    launch(env, ranks, 500)
    daemon.flush()
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert list(runs) == [next(iter(runs))], "one run for the whole job"
    rows = next(iter(runs.values()))
    keys = {key for row in rows for key in row if key not in ("step", "ts")}
    if ranks == "zero":
        assert keys == expected
        assert [row["step"] for row in rows] == list(range(500))
    else:
        assert keys == {f"rank{rank}/loss" for rank in range(4)}
        for rank in range(4):
            steps = [row["step"] for row in rows if f"rank{rank}/loss" in row]
            assert steps == list(range(500))
    (run,) = daemon.request("runs")
    assert run["status"] == "finished"
    assert run["name"] == "job"
