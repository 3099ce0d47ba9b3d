"""Artifacts: stored (content-addressed) before log_artifact returns, streamed, delivered."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import trackd
from conftest import Daemon


def run_dir(daemon: Daemon) -> Path:
    (project,) = (daemon.data_dir / "runs").iterdir()
    (directory,) = project.iterdir()
    return directory


def test_original_deleted_right_after_the_call_still_arrives(
    tmp_path: Path, daemon: Daemon
) -> None:
    """The file is safe once log_artifact returns: deleted at once, it still reaches the sink."""
    daemon.start()
    original = tmp_path / "model.ckpt"
    content = os.urandom(300_000)
    original.write_bytes(content)
    run = trackd.init(project="art", name="r")
    run.log_artifact(original, name="best.ckpt")
    original.unlink()
    run.finish()
    daemon.flush()
    assert (run_dir(daemon) / "artifacts" / "best.ckpt").read_bytes() == content
    digest = hashlib.sha256(content).hexdigest()
    stored = daemon.data_dir / "artifacts" / digest[:2] / digest
    assert stored.read_bytes() == content


def test_same_content_twice_is_stored_once(tmp_path: Path, daemon: Daemon) -> None:
    """Two files with the same bytes share one entry in the store."""
    daemon.start()
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"same bytes" * 1000)
    run = trackd.init(project="art", name="twice")
    run.log_artifact(tmp_path / "a.bin")
    run.log_artifact(tmp_path / "b.bin")
    run.finish()
    daemon.flush()
    stored = [p for p in (daemon.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert len(stored) == 1
    assert sorted(p.name for p in (run_dir(daemon) / "artifacts").iterdir()) == ["a.bin", "b.bin"]


def test_a_large_file_is_streamed_not_read_into_memory(
    tmp_path: Path, daemon: Daemon, env: dict[str, str]
) -> None:
    """A 512 MiB artifact passes through a client whose peak memory stays far below its size."""
    daemon.start()
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(512 * 1024 * 1024)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) test process
    script = (
        "import json, sys, trackd\n"
        "run = trackd.init(project='art', name='big')\n"
        "run.log_artifact(sys.argv[1])\n"
        "run.finish()\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'peak_kib': int(hwm.split()[1])}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(big)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    peak_mib = json.loads(done.stdout)["peak_kib"] / 1024
    assert peak_mib < 200, f"the client peaked at {peak_mib:.0f} MiB for a 512 MiB file"
    daemon.flush(timeout=120)
    assert (run_dir(daemon) / "artifacts" / "big.bin").stat().st_size == 512 * 1024 * 1024


def test_a_1_gib_artifact_reaches_wandb_and_aim_streamed_by_the_daemon(
    tmp_path: Path, daemon: Daemon
) -> None:
    """A 1 GiB artifact into W&B (offline) and a local Aim repo: both hold it whole, and
    the daemon delivering it peaks far below the file's size (W&B hashes the store's file
    in chunks and points at it; Aim copies it streamed)."""
    from helpers.wandb_log import read_runs
    from test_sink_wandb import wandb_env

    size = 1 << 30
    repo = tmp_path / "aim"
    daemon.start("--sink", "wandb:*", "--sink", f"aim:{repo}", extra_env=wandb_env(tmp_path))
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(size)
    run = trackd.init(project="art", name="big")
    run.log({"loss": 1.0}, step=0)
    run.log_artifact(big)
    run.finish()
    daemon.flush(timeout=300)
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    peak_mib = int(hwm.split()[1]) / 1024
    assert daemon.stop() == 0
    assert peak_mib < 512, f"the daemon peaked at {peak_mib:.0f} MiB for a 1 GiB artifact"

    [[session]] = read_runs(tmp_path / "wandb" / "wandb").values()
    [artifact] = session.artifacts
    [entry] = artifact["files"]
    assert (artifact["name"], entry["path"], entry["size"]) == ("big.bin", "big.bin", size)
    assert Path(entry["local_path"]).parent.parent == daemon.data_dir / "artifacts"
    [copy] = (repo / "aim-artifacts").glob("*/big.bin")
    assert copy.stat().st_size == size
