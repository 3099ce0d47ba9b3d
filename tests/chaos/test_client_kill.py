"""A client SIGKILLed mid-run: what it had acked is there, once; what arrives is a clean prefix.

A training process can die at any instant. What it loses is only what the
daemon had not yet received and it had not yet spilled to its spool: rows
still in its memory. Everything `flush()` reported durable must arrive, and
whatever arrives is steps 0..M-1 with no row twice and no hole.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from conftest import Daemon, jsonl_runs, wait_for
from trackd.daemon.wal import intact_records

# Logs `rows` rows; after `durable_at` rows it calls flush() and reports the result,
# then keeps logging flat out until it is killed.
CLIENT = r"""
import sys, time
import trackd

rows, durable_at = int(sys.argv[1]), int(sys.argv[2])
run = trackd.init(project="killed", name="victim")
for step in range(rows):
    run.log({"i": step})
    if step + 1 == durable_at:
        print("flushed", run.flush(timeout=60), durable_at, flush=True)
print("logged", rows, flush=True)
time.sleep(600)
"""


def start(env: dict[str, str], rows: int, durable_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(rows), str(durable_at)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(client: subprocess.Popen[str]) -> None:
    """SIGKILL the client by its PID, reap it and close its pipes."""
    if client.poll() is None:
        client.send_signal(signal.SIGKILL)
    client.communicate(timeout=10)


def delivered_steps(root: Path) -> list[int]:
    runs = jsonl_runs(root)
    assert len(runs) <= 1
    return [row["step"] for rows in runs.values() for row in rows]


def spooled_rows(spool: Path) -> int:
    """Metric rows in the spool files so far (a record being written is not counted)."""
    return sum(
        len(message["b"]["rows"])
        for path in spool.glob("*.spool")
        for message in map(msgpack.unpackb, intact_records(path))
        if message["t"] == "metrics"
    )


def assert_clean_prefix(steps: list[int]) -> None:
    repeated = [step for step, times in Counter(steps).items() if times > 1]
    assert not repeated, f"rows delivered twice: {repeated[:5]}"
    assert sorted(steps) == list(range(len(steps))), "what arrives is steps 0..M-1, no hole"


def echo(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[client-kill] {text}", flush=True)


def test_sigkill_after_flush_keeps_every_acked_row_once(
    daemon: Daemon, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL while logging flat out, after flush() returned True at 50,000 rows: those
    50,000 arrive, and everything that arrives is one clean prefix of the run, each row once."""
    daemon.start()
    client = start(env, 2_000_000, 50_000)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().split() == ["flushed", "True", "50000"]
        time.sleep(0.3)  # mid-stream: the client is still logging (2,000,000 rows take longer)
        assert client.poll() is None
    finally:
        kill(client)
    spool = daemon.data_dir / "spool"
    wait_for(lambda: not list(spool.glob("*.spool")), timeout=30)
    daemon.flush()
    steps = delivered_steps(daemon.data_dir / "runs")
    echo(capsys, f"acked 50000 rows, then SIGKILL: {len(steps)} rows arrived, a clean prefix")
    assert len(steps) >= 50_000, "every row flush() called durable is there"
    assert len(steps) < 2_000_000, "the kill landed mid-run"
    assert_clean_prefix(steps)


def test_sigkill_with_the_daemon_down_keeps_what_was_spilled_to_the_spool(
    daemon: Daemon, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """No daemon, a 64 KiB in-memory budget: the client spills its unacked rows to its spool.
    SIGKILLed, it leaves at most its last 64 KiB of frames unspilled; a daemon started later
    delivers the rest, a clean prefix, each row once."""
    rows, budget = 100_000, 64 * 1024
    client = start({**env, "TRACKD_CLIENT_MEMORY_BYTES": str(budget)}, rows, rows + 1)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().split() == ["logged", str(rows)]
        # the sender thread packs the queue and spills past the budget: wait until it has
        wait_for(lambda: spooled_rows(daemon.data_dir / "spool") > rows - budget // 4)
    finally:
        kill(client)
    spool = daemon.data_dir / "spool"
    assert len(list(spool.glob("*.spool"))) == 1, "the run waits in its spool"
    daemon.start()
    wait_for(lambda: not list(spool.glob("*.spool")), timeout=30)
    daemon.flush()
    steps = delivered_steps(daemon.data_dir / "runs")
    echo(capsys, f"daemon down, SIGKILL after {rows} rows: {len(steps)} arrived from the spool")
    assert_clean_prefix(steps)
    # a row is at least 4 bytes of its frame: 64 KiB unspilled is under 16,384 rows
    assert len(steps) > rows - budget // 4, f"only {len(steps)} of {rows} rows survived"
