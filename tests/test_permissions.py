"""Another user of the machine reads nothing of the daemon's data (issue 12 §4).

Checked with a real second, unprivileged user (`nobody`, through setpriv): before, the WAL,
spools and the default JSONL runs were created 0755/0644, so anyone could read every run's
config and metrics. A sink directory the user chose elsewhere keeps the user's umask.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, finish_client, run_client

OTHER_USER = ("--reuid=nobody", "--regid=nogroup", "--clear-groups")


def readable_by_other_user(path: Path) -> bool:
    done = subprocess.run(
        ["setpriv", *OTHER_USER, "cat", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory every user can enter (pytest's own tmp_path is 0700 to begin with)."""
    base = Path(tempfile.mkdtemp(prefix="trackd-perm-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_is_the_owners_alone(
    shared_base: Path, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    data, chosen = shared_base / "data", shared_base / "chosen"
    env = {**env, "TRACKD_DATA_DIR": str(data)}
    umask = os.umask(0o022)
    os.umask(umask)
    daemon = Daemon(env, dirs["runtime"], data)
    try:
        daemon.start("--sink", f"jsonl:{data / 'runs'}", "--sink", f"jsonl:{chosen}")
        finish_client(run_client(env, "--name", "private", "--rows", "100"))
        daemon.flush()
        assert daemon.stop() == 0
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)
    assert readable_by_other_user(Path("/etc/hostname")), "the other user can read what is open"
    for directory in (data, data / "wal", data / "spool"):
        assert mode(directory) == 0o700, directory
    private = [
        *data.glob("wal/*.wal"),
        data / "ledger.msgpack",
        *data.glob("sinks/*/cursor.json"),
        *data.glob("runs/*/*/config.json"),
    ]
    assert len(private) >= 5
    for path in private:
        assert not readable_by_other_user(path), path
        assert mode(path) & 0o077 == 0 or path.is_relative_to(data / "runs"), path
    (config,) = chosen.glob("*/*/config.json")
    assert mode(config) == 0o666 & ~umask, "a directory the user chose keeps the umask"
    assert readable_by_other_user(config)


def test_the_clients_spool_is_the_owners_alone(shared_base: Path, env: dict[str, str]) -> None:
    """An offline run (no daemon yet) creates the data directory and its spool 0700."""
    data = shared_base / "data"
    env = {**env, "TRACKD_DATA_DIR": str(data)}
    finish_client(run_client(env, "--name", "offline", "--rows", "50", "--mode", "offline"))
    assert mode(data) == 0o700
    assert mode(data / "spool") == 0o700
    (spool,) = (data / "spool").iterdir()
    assert mode(spool) == 0o600
    assert not readable_by_other_user(spool)


def test_a_runtime_dir_of_ours_that_others_could_read_is_made_0700(
    shared_base: Path, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """A runtime dir the user made by hand with the umask's 0755 holds the sockets 0700."""
    runtime = shared_base / "trackd-rt"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    daemon = Daemon({**env, "TRACKD_RUNTIME_DIR": str(runtime)}, runtime, dirs["data"])
    try:
        daemon.start()
        assert mode(runtime) == 0o700
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            assert daemon.stop() == 0
