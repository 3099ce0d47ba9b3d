"""The WAL's disk budget: `on_full = "block"` keeps everything, `"drop_oldest"` counts what went."""

from __future__ import annotations

from pathlib import Path

from conftest import Daemon, finish_client, jsonl_runs, run_client, wait_for

SEGMENT = 32 * 1024
BUDGET = 128 * 1024
ROWS = 20_000


def budget_env(policy: str) -> dict[str, str]:
    return {
        "TRACKD_WAL_SEGMENT_BYTES": str(SEGMENT),
        "TRACKD_MAX_WAL_BYTES": str(BUDGET),
        "TRACKD_ON_FULL": policy,
    }


def test_block_stops_acking_at_the_budget_and_loses_nothing(
    tmp_path: Path, daemon: Daemon, env: dict[str, str]
) -> None:
    """Over budget with a sink down, ingest stops at the budget; later all arrives, once."""
    gate = tmp_path / "gate"
    gate.touch()
    out = tmp_path / "out"
    daemon.start("--sink", f"gated:{out}?gate={gate}", extra_env=budget_env("block"))
    client = run_client(env, "--name", "blocked", "--rows", str(ROWS), "--pace", "0.01")
    wait_for(lambda: daemon.status()["ingest"]["blocked"] > 0)
    status = daemon.status()
    assert status["wal"]["bytes"] <= BUDGET + 64 * 1024, "the WAL stays within one message"
    assert status["ingest"]["rows"] < ROWS, "not everything fit: the client kept the rest"
    gate.unlink()
    finish_client(client)
    daemon.flush()
    wait_for(lambda: daemon.status()["ingest"]["rows"] == ROWS)
    daemon.flush()
    rows = next(iter(jsonl_runs(out).values()))
    assert [row["step"] for row in rows] == list(range(ROWS))
    assert daemon.status()["wal"]["dropped_rows"] == 0


def test_drop_oldest_drops_whole_segments_and_counts_exactly_what_went(
    tmp_path: Path, daemon: Daemon, env: dict[str, str]
) -> None:
    """Over budget with a sink down, the oldest segments go; kept + counted-dropped = logged."""
    gate = tmp_path / "gate"
    gate.touch()
    out = tmp_path / "out"
    daemon.start("--sink", f"gated:{out}?gate={gate}", extra_env=budget_env("drop_oldest"))
    # paced, so that messages are small beside a segment and whole segments can go
    finish_client(run_client(env, "--name", "dropped", "--rows", str(ROWS), "--pace", "0.005"))
    wait_for(lambda: daemon.status()["wal"]["dropped_segments"] > 0)
    wait_for(lambda: daemon.status()["wal"]["bytes"] <= BUDGET)
    gate.unlink()
    daemon.flush()
    status = daemon.status()
    assert status["ingest"]["rows"] == ROWS, "drop_oldest never refuses a message"
    assert status["ingest"]["blocked"] == 0
    rows = next(iter(jsonl_runs(out).values()))
    steps = [row["step"] for row in rows]
    dropped = status["wal"]["dropped_rows"]
    assert dropped > 0
    assert len(steps) + dropped == ROWS
    assert len(set(steps)) == len(steps), "nothing twice"
    missing = sorted(set(range(ROWS)) - set(steps))
    assert len(missing) == dropped, "exactly the rows counted as dropped are missing"
    assert missing == list(range(missing[0], missing[-1] + 1)), "whole oldest segments went"
