"""End to end: client processes -> daemon -> WAL -> JSONL sink, through daemon crashes."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Daemon, finish_client, jsonl_runs, run_client, wait_for
from helpers import until_client

CLIENTS = 4
ROWS = 25_000
ROWS_BETWEEN_KILLS = 2000  # taken in by each daemon (of all clients) before it is killed


def assert_complete(root: Path, rows_by_name: dict[str, int]) -> None:
    """Each run named is delivered once, every one of its steps once and in order."""
    runs = jsonl_runs(root)
    assert sorted(run.rsplit("-", 1)[0] for run in runs) == sorted(rows_by_name)
    for run, rows_of_run in runs.items():
        rows = rows_by_name[run.rsplit("-", 1)[0]]
        assert [row["step"] for row in rows_of_run] == list(range(rows)), run
        assert [row["i"] for row in rows_of_run] == list(range(rows)), run


def test_four_clients_deliver_every_row_once_in_order(daemon: Daemon, env: dict[str, str]) -> None:
    """4 processes x 25,000 log() calls arrive as exactly 100,000 rows, each run in step order."""
    daemon.start()
    names = [f"c{i}" for i in range(CLIENTS)]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    for client in clients:
        finish_client(client)
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", dict.fromkeys(names, ROWS))
    assert daemon.status()["ingest"]["rows"] == CLIENTS * ROWS
    assert daemon.stop() == 0


def test_sigkill_three_times_mid_stream_loses_and_duplicates_nothing(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed and restarted 3 times while 4 clients log: every row logged
    arrives exactly once. The clients log until told to stop and each daemon is killed once
    it has taken rows in, so every kill lands mid-stream however slow the machine is."""
    daemon.start()
    stop = tmp_path / "stop"
    clients = {
        name: until_client.start(env, name, stop, per_tick=25, tick=0.01)
        for name in (f"k{i}" for i in range(CLIENTS))
    }
    for _ in range(3):
        wait_for(lambda: daemon.status()["ingest"]["rows"] >= ROWS_BETWEEN_KILLS, timeout=60)
        assert all(c.poll() is None for c in clients.values()), "a client ended mid-run"
        daemon.kill()
        daemon.start()
    wait_for(lambda: daemon.status()["ingest"]["rows"] >= ROWS_BETWEEN_KILLS, timeout=60)
    stop.touch()
    logged = {name: finish_client(client)["rows"] for name, client in clients.items()}
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", logged)
    assert sum(logged.values()) >= 4 * ROWS_BETWEEN_KILLS
    assert daemon.stop() == 0


def test_run_logged_without_daemon_is_delivered_when_it_starts(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A whole run logged with no daemon: the client exits; a daemon started later delivers it."""
    result = finish_client(
        run_client(env, "--name", "alone", "--rows", "5000", "--finish-timeout", "2")
    )
    spools = list((daemon.data_dir / "spool").glob("*.spool"))
    assert len(spools) == 1, "the run should wait in exactly one spool file"
    daemon.start()
    daemon.flush()
    for _ in range(100):
        if not spools[0].exists():
            break
        time.sleep(0.1)
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", {"alone": 5000})
    assert not spools[0].exists(), "a delivered spool is removed"
    assert result["id"]


def test_flush_takes_up_the_spools_of_finished_clients_first(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """An offline run's spool left while the daemon runs, its periodic scan an hour away: a
    flush still waits for it (it picks finished clients' spools up first), so every row is
    delivered once the flush returns."""
    daemon.start(extra_env={"TRACKD_SPOOL_SCAN_SECONDS": "3600"})
    finish_client(run_client(env, "--name", "offline", "--rows", "500", "--mode", "offline"))
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", {"offline": 500})
    assert daemon.stop() == 0
