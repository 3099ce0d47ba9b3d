"""Sink faults: a flaky and a slow sink beside a healthy one, and a permanently rejected record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Daemon, finish_client, jsonl_runs, run_client, wait_for
from trackd.sinks.base import SinkSpec

ROWS = 20_000
ARTIFACT_CLIENT = """
import sys
import trackd

run = trackd.init(project="p", name="art", mode="offline")
for step in range(100):
    run.log({"i": step}, step=step)
run.log_artifact(sys.argv[1], name="weights.bin")
for step in range(100, 200):
    run.log({"i": step}, step=step)
run.finish()
"""


def start_with_three_sinks(daemon: Daemon, root: Path) -> dict[str, tuple[str, Path]]:
    """Start the daemon with a healthy, a flaky (50 failures) and a slow (1 s per write) sink.

    Returns {role: (sink name in status, sink root)}.
    """
    specs = {
        "healthy": ("jsonl", root / "healthy", ""),
        "flaky": ("flaky", root / "flaky", "?fail=50"),
        "slow": ("slow", root / "slow", "?delay=1"),
    }
    texts = {role: f"{kind}:{path}{query}" for role, (kind, path, query) in specs.items()}
    args = [arg for text in texts.values() for arg in ("--sink", text)]
    daemon.start(*args, extra_env={"TRACKD_RETRY_CAP": "0.1"})
    return {role: (SinkSpec.parse(texts[role]).name, specs[role][1]) for role in specs}


def assert_one_complete_run(root: Path, name: str, rows: int) -> None:
    runs = jsonl_runs(root)
    assert [run.rsplit("-", 1)[0] for run in runs] == [name], f"runs under {root}: {list(runs)}"
    (logged,) = runs.values()
    assert [row["step"] for row in logged] == list(range(rows)), f"rows under {root}"


def test_every_sink_gets_every_row_exactly_once(daemon: Daemon, env: dict[str, str]) -> None:
    """Healthy, flaky and slow sinks each end up with the whole run, every row once, in order."""
    sinks = start_with_three_sinks(daemon, daemon.data_dir.parent / "sinks")
    finish_client(run_client(env, "--name", "all", "--rows", str(ROWS), "--pace", "0.01"))
    daemon.flush()
    for _, root in sinks.values():
        assert_one_complete_run(root, "all", ROWS)
        (run_json,) = root.glob("*/*/run.json")
        assert json.loads(run_json.read_text())["status"] == "finished"
    assert daemon.stop() == 0


def test_the_healthy_sink_is_not_held_back_by_the_slow_one(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """When the healthy sink has delivered the whole run, the slow sink is still behind."""
    sinks = start_with_three_sinks(daemon, daemon.data_dir.parent / "sinks")
    healthy, slow = sinks["healthy"][0], sinks["slow"][0]
    client = run_client(env, "--name", "pace", "--rows", str(ROWS), "--pace", "0.01")

    def healthy_has_everything() -> dict[str, Any] | None:
        status: dict[str, Any] = daemon.status()["sinks"]
        done = status[healthy]["delivered_rows"] == ROWS and status[healthy]["lag_bytes"] == 0
        return status if done else None

    status = wait_for(healthy_has_everything, timeout=60, interval=0.02)
    assert status[slow]["lag_bytes"] > 0, status[slow]
    assert status[slow]["delivered_rows"] < ROWS, status[slow]
    finish_client(client)
    daemon.flush()
    assert_one_complete_run(sinks["healthy"][1], "pace", ROWS)


def test_the_flaky_sinks_retries_are_counted_in_status(daemon: Daemon, env: dict[str, str]) -> None:
    """A sink failing its first 50 writes shows >= 50 retries and its last error in status."""
    sinks = start_with_three_sinks(daemon, daemon.data_dir.parent / "sinks")
    finish_client(run_client(env, "--name", "retry", "--rows", "2000"))
    daemon.flush()
    flaky = daemon.status()["sinks"][sinks["flaky"][0]]
    assert flaky["retries"] >= 50
    assert "flaky: injected failure" in flaky["last_error"]
    assert_one_complete_run(sinks["flaky"][1], "retry", 2000)
    assert daemon.stop() == 0


def deliver_run_with_missing_artifact(daemon: Daemon, env: dict[str, str]) -> tuple[str, Path]:
    """Log a run offline with an artifact, lose the stored copy, then start the daemon.

    log_artifact() stores the file in DATA_DIR/artifacts before it returns, so deleting
    the original is harmless; removing the stored copy is what makes a record that
    no sink can ever deliver. Returns (the JSONL sink's name, its root) once the
    daemon has delivered the spool.
    """
    artifact = daemon.data_dir.parent / "weights.bin"
    artifact.write_bytes(b"\0" * 1000)
    subprocess.run([sys.executable, "-c", ARTIFACT_CLIENT, str(artifact)], env=env, check=True)
    (stored,) = [path for path in (daemon.data_dir / "artifacts").rglob("*") if path.is_file()]
    stored.unlink()
    root = daemon.data_dir.parent / "sink"
    daemon.start("--sink", f"jsonl:{root}")
    wait_for(lambda: not list((daemon.data_dir / "spool").glob("*.spool")))
    daemon.flush()
    return SinkSpec.parse(f"jsonl:{root}").name, root


def test_a_permanently_rejected_record_goes_to_the_dead_letter_file(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """An artifact whose file is gone is dead-lettered with its reason, and counted in status."""
    name, _ = deliver_run_with_missing_artifact(daemon, env)
    assert [path.name for path in (daemon.data_dir / "deadletter").iterdir()] == [f"{name}.jsonl"]
    lines = (daemon.data_dir / "deadletter" / f"{name}.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["type"] == "artifact"
    assert entry["body"]["name"] == "weights.bin"
    assert "no longer exists" in entry["reason"]
    assert daemon.status()["sinks"][name]["dead_letters"] == 1
    assert daemon.stop() == 0


def test_the_rest_of_a_run_arrives_once_beside_a_dead_letter(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """The records around a dead-lettered one are each delivered exactly once."""
    _, root = deliver_run_with_missing_artifact(daemon, env)
    assert_one_complete_run(root, "art", 200)
    (run_json,) = root.glob("*/*/run.json")
    assert json.loads(run_json.read_text())["status"] == "finished"
    assert daemon.stop() == 0


def test_status_says_whether_each_sink_is_open(daemon: Daemon, tmp_path: Path) -> None:
    """`open` is false until the sink's open() returns (an SDK's import, a backend not up
    yet): a tool can tell a sink that is not delivering yet from one that is behind."""
    gate = tmp_path / "open-gate"
    gate.touch()
    daemon.start(
        "--sink",
        f"gated:{tmp_path / 'out'}?gate={tmp_path / 'no-gate'}&open_gate={gate}",
        "--sink",
        f"jsonl:{tmp_path / 'plain'}",
    )

    def opened() -> dict[str, bool]:
        sinks = daemon.status()["sinks"].values()
        return {sink["spec"].split(":")[0]: sink["open"] for sink in sinks}

    wait_for(lambda: opened()["jsonl"], timeout=30)
    assert opened() == {"gated": False, "jsonl": True}
    gate.unlink()
    wait_for(lambda: opened()["gated"], timeout=30)
    assert opened() == {"gated": True, "jsonl": True}
