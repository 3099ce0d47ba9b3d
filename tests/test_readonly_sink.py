"""A sink directory that turns read-only mid-run, then writable again: retried, nothing lost.

Tests run as root, so chmod stops nothing; the directory is made read-only by a
real mount instead. The daemon runs in a mount namespace of its own (`unshare
--mount`), and mid-run a read-only bind mount of the sink directory is stacked
onto it there (`nsenter ... mount --bind -o ro`); removing it later makes the
directory writable again. The rest of the machine never sees the change.

Stacking is what the kernel allows: remounting the directory's own mount
read-only fails with EBUSY while a sink holds a file open for writing on it.
So files the sinks had open before keep taking appends, while everything that
opens, creates, renames or truncates a path fails with EROFS, which is what
the sinks see on a disk that went read-only.

EROFS and EACCES are retriable (`is_retriable_os_error` in sinks/base.py): an
operator can fix either, and giving up would send every record to the dead
letters. The test proves the sink retries as long as the directory stays
read-only, shows it in `trackd status --json`, and delivers every row once
after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from test_sink_tensorboard import assert_every_step_once

UNSHARE = ("unshare", "--mount", "--propagation", "private")
# More than delivery.UNMAPPED_RETRIES, after which an error a sink does not map is given up on.
RETRIES_WHILE_READ_ONLY = 12


class NamespacedDaemon(Daemon):
    """`trackd serve` exec'd by `unshare --mount`: its PID is the daemon's and its namespace's."""

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> Daemon:
        assert self.process is None or self.process.poll() is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*UNSHARE, sys.executable, "-m", "trackd", "serve", *args],
                env={**self.env, **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout=30)
        return self

    def mount(self, *command: str) -> None:
        """Run a mount command inside the daemon's mount namespace."""
        assert self.process is not None
        done = subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-m", *command],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr.strip()}"


@pytest.fixture
def namespaced(env: dict[str, str], dirs: dict[str, Path]) -> Iterator[NamespacedDaemon]:
    probe = dirs["root"] / "probe"
    probe.mkdir()
    done = subprocess.run(
        [*UNSHARE, "mount", "--bind", "-o", "ro", str(probe), str(probe)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"the kernel refuses a private mount namespace or a bind mount: {done.stderr}")
    handle = NamespacedDaemon(env, dirs["runtime"], dirs["data"])
    yield handle
    if handle.process is not None and handle.process.poll() is None:
        handle.process.kill()
        handle.process.wait(10)


def row_count(root: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in root.glob("*/*/metrics.jsonl"))


def sinks_status(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The sinks as `trackd status --json` shows them, by kind."""
    done = cli(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    sinks = json.loads(done.stdout)["sinks"]
    return {sink["spec"].split(":", 1)[0]: sink for sink in sinks.values()}


def retrying_on_read_only(env: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    sinks = sinks_status(env)
    if all(
        sink["retries"] >= RETRIES_WHILE_READ_ONLY
        and "Read-only file system" in (sink["last_error"] or "")
        for sink in sinks.values()
    ):
        return sinks
    return None


def test_a_sink_directory_read_only_mid_run_is_retried_and_every_row_lands_once(
    namespaced: NamespacedDaemon, env: dict[str, str], tmp_path: Path
) -> None:
    """jsonl and tensorboard sinks under one directory, made read-only while run "first" is
    being delivered and run "second" starts: both sinks retry (no dead letters) and say why
    in status; once writable again, both runs are complete in both sinks, every step once."""
    out = tmp_path / "out"
    jsonl, tensorboard = out / "jsonl", out / "tb"
    out.mkdir()
    namespaced.start("--sink", f"jsonl:{jsonl}", "--sink", f"tensorboard:{tensorboard}")
    clients = [run_client(env, "--name", "first", "--rows", "6000", "--pace", "0.05")]
    try:
        wait_for(lambda: row_count(jsonl) >= 500, timeout=60)
        namespaced.mount("mount", "--bind", "-o", "ro", str(out), str(out))
        clients.append(run_client(env, "--name", "second", "--rows", "2000"))
        sinks = wait_for(lambda: retrying_on_read_only(env), timeout=120, interval=0.2)
        assert {kind: sink["dead_letters"] for kind, sink in sinks.items()} == {
            "jsonl": 0,
            "tensorboard": 0,
        }
        assert all(sink["lag_records"] > 0 for sink in sinks.values())
        figures = {kind: [sink["retries"], sink["lag_records"]] for kind, sink in sinks.items()}
        print(f"retries and records behind while read-only: {figures}")
        namespaced.mount("umount", "--lazy", str(out))
        for client in clients:
            finish_client(client)
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.communicate(timeout=10)
    namespaced.flush(timeout=120)
    sinks = sinks_status(env)
    assert {kind: sink["dead_letters"] for kind, sink in sinks.items()} == {
        "jsonl": 0,
        "tensorboard": 0,
    }
    assert namespaced.stop() == 0
    assert not (namespaced.data_dir / "deadletter").exists()

    runs = {name.rsplit("-", 1)[0]: rows for name, rows in jsonl_runs(jsonl).items()}
    assert sorted(runs) == ["first", "second"]
    assert [row["step"] for row in runs["first"]] == list(range(6000))
    assert [row["step"] for row in runs["second"]] == list(range(2000))
    for name, rows in (("first", 6000), ("second", 2000)):
        (run_dir,) = tensorboard.glob(f"p/{name}-*")
        assert_every_step_once(run_dir, rows)
