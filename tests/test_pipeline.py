"""End to end: client processes -> daemon -> WAL -> JSONL sink, through daemon crashes."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Daemon, finish_client, jsonl_runs, run_client

CLIENTS = 4
ROWS = 25_000


def assert_complete(root: Path, names: list[str], rows: int) -> None:
    runs = jsonl_runs(root)
    assert sorted(name.rsplit("-", 1)[0] for name in runs) == sorted(names)
    for rows_of_run in runs.values():
        assert [row["step"] for row in rows_of_run] == list(range(rows))
        assert [row["i"] for row in rows_of_run] == list(range(rows))


def test_four_clients_deliver_every_row_once_in_order(daemon: Daemon, env: dict[str, str]) -> None:
    """4 processes x 25,000 log() calls arrive as exactly 100,000 rows, each run in step order."""
    daemon.start()
    names = [f"c{i}" for i in range(CLIENTS)]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    for client in clients:
        finish_client(client)
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", names, ROWS)
    assert daemon.status()["ingest"]["rows"] == CLIENTS * ROWS
    assert daemon.stop() == 0


def test_sigkill_three_times_mid_stream_loses_and_duplicates_nothing(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """The daemon SIGKILLed and restarted 3 times while 4 clients log: still 100,000 rows once."""
    daemon.start()
    names = [f"k{i}" for i in range(CLIENTS)]
    clients = [
        run_client(env, "--name", name, "--rows", str(ROWS), "--pace", "0.03") for name in names
    ]
    for _ in range(3):
        time.sleep(1.5)
        assert all(client.poll() is None for client in clients), "clients finished too early"
        daemon.kill()
        time.sleep(0.3)
        daemon.start()
    for client in clients:
        finish_client(client)
    daemon.flush()
    assert_complete(daemon.data_dir / "runs", names, ROWS)
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
    assert_complete(daemon.data_dir / "runs", ["alone"], 5000)
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
    assert_complete(daemon.data_dir / "runs", ["offline"], 500)
    assert daemon.stop() == 0
