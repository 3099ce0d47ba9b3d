"""A million records behind a stopped sink cost `status` and the watchdog nothing (issue 12 §2).

Before, the lag in records was counted by walking every record header past the
sink's cursor, on the event loop, for every `status`, every scrape and every
watchdog tick: about 2 s per million records, so a lagging sink could get the
daemon killed by systemd's watchdog while it caught up.
"""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

from backlog import write_backlog
from conftest import Daemon, wait_for

RECORDS = 1_000_000
WATCHDOG_SECONDS = 3.0  # WATCHDOG_USEC: the daemon pings every half of it


def test_watchdog_and_status_keep_their_pace_with_a_million_records_behind(
    tmp_path: Path, daemon: Daemon
) -> None:
    write_backlog(daemon.data_dir, RECORDS)
    gate = tmp_path / "gate"
    gate.touch()  # the sink fails every write while this exists: held stopped
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(2 * WATCHDOG_SECONDS)
    pings: list[float] = []
    answers: list[dict[str, int]] = []

    def pinged() -> None:
        if "WATCHDOG=1" in listener.recv(4096).decode().splitlines():
            pings.append(time.monotonic())

    def sink_status() -> dict[str, int]:
        started = time.monotonic()
        status = daemon.request("status", timeout=WATCHDOG_SECONDS)
        assert time.monotonic() - started < WATCHDOG_SECONDS
        (sink,) = status["sinks"].values()
        answers.append(sink)
        return dict(sink)

    try:
        daemon.start(
            "--sink",
            f"gated:{tmp_path / 'out'}?gate={gate}",
            extra_env={
                "NOTIFY_SOCKET": str(path),
                "WATCHDOG_USEC": str(int(WATCHDOG_SECONDS * 1e6)),
            },
        )
        for _ in range(3):
            pinged()
            assert sink_status()["lag_records"] == RECORDS
        gate.unlink()  # the sink comes back: the backlog drains
        wait_for(lambda: sink_status()["delivered_records"] > 0, timeout=60)
        for _ in range(3):
            pinged()
            sink_status()
    finally:
        listener.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert len(gaps) >= 4
    assert max(gaps) < WATCHDOG_SECONDS, f"watchdog pings {gaps} s apart"
    lags = [sink["lag_records"] for sink in answers]
    assert lags[-1] < RECORDS, "drained"
    assert lags == sorted(lags, reverse=True), lags
    assert all(sink["lag_records"] + sink["delivered_records"] == RECORDS for sink in answers), (
        "lag plus delivered is every record"
    )
