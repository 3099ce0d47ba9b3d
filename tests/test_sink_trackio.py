"""Trackio sink, through a real daemon and real clients, read back through Trackio's own
storage layer and API in a process of its own (Trackio fixes its TRACKIO_DIR at import)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, finish_client, meta_client, run_client

ROWS = 3000
READER = """
import json
from trackio import Api
from trackio.sqlite_storage import SQLiteStorage

found = {}
for project in SQLiteStorage.get_projects():
    runs = found[project] = {}
    for run in Api().runs(project):
        logs = SQLiteStorage.get_logs(project, run.name, run_id=run.id)
        runs[run.name] = {"id": run.id, "config": run.config, "logs": logs}
print(json.dumps(found, default=str))
"""


def read_trackio(env: dict[str, str], trackio_dir: Path) -> dict[str, dict[str, Any]]:
    """{project: {run name: {"id", "config", "logs"}}} as Trackio itself reads them."""
    out = subprocess.run(
        [sys.executable, "-c", READER],
        env={**env, "TRACKIO_DIR": str(trackio_dir)},
        capture_output=True,
        check=True,
        timeout=120,
    )
    found: dict[str, dict[str, Any]] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return found


ALERTS_READER = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_alerts(sys.argv[1])))
"""


def read_trackio_alerts(env: dict[str, str], trackio_dir: Path, project: str) -> list[Any]:
    """The project's alerts as Trackio's storage lists them (newest first)."""
    out = subprocess.run(
        [sys.executable, "-c", ALERTS_READER, project],
        env={**env, "TRACKIO_DIR": str(trackio_dir)},
        capture_output=True,
        check=True,
        timeout=120,
    )
    alerts: list[Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return alerts


def assert_every_step_once(run: dict[str, Any], rows: int) -> None:
    assert [log["step"] for log in run["logs"]] == list(range(rows))
    assert [log["i"] for log in run["logs"]] == list(range(rows))


def test_runs_keep_their_project_name_steps_config_and_status(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Two runs at once and a run using every record type: each is one Trackio run in the
    trackd project, named as in trackd, every step once, config and status in its config;
    a project name Trackio refuses goes to the spec's fallback project."""
    trackio_dir = tmp_path / "trackio"
    daemon.start("--sink", "trackio:fallback", extra_env={"TRACKIO_DIR": str(trackio_dir)})
    names = ["alpha", "beta"]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    meta = meta_client(env, "--name", "meta")
    refused = meta_client(env, "--project", "registry-models", "--name", "refused")
    ids = {name: finish_client(client)["id"] for name, client in zip(names, clients, strict=True)}
    meta_result = finish_client(meta)
    refused_result = finish_client(refused)
    daemon.flush()
    assert daemon.stop() == 0

    found = read_trackio(env, trackio_dir)
    assert sorted(found) == ["fallback", "p", "vision"]
    assert sorted(found["p"]) == names
    for name, run_id in ids.items():
        run = found["p"][name]
        assert run["id"] == run_id
        assert_every_step_once(run, ROWS)
        assert run["config"]["rows"] == ROWS
        assert run["config"]["_Status"] == "finished"

    meta_run = found["vision"]["meta"]
    assert meta_run["id"] == meta_result["id"]
    assert [log["step"] for log in meta_run["logs"]] == list(range(meta_result["rows"]))
    assert [log["__step"] for log in meta_run["logs"]] == list(range(meta_result["rows"]))
    config = meta_run["config"]
    assert config["lr"] == 0.001
    assert config["optimizer"] == {"name": "adam", "betas": [0.9, 0.99]}
    assert config["epochs"] == 3
    assert config["_Tags"] == {"team": "cv", "stage": "ablation"}
    assert config["_Summary"] == {"best_loss": 0.02}
    assert list(config["_Artifacts"]) == ["weights.bin"]
    assert (config["_Status"], config["_Error"]) == ("failed", None)
    assert config["_Ended"] is not None

    assert list(found["fallback"]) == ["refused"]
    assert found["fallback"]["refused"]["id"] == refused_result["id"]


def test_sigkill_mid_run_and_restart_still_exactly_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while two runs log: every step is in Trackio once,
    because re-sent rows carry the log_id they were first written with."""
    trackio_dir = tmp_path / "trackio"
    args = ("--sink", "trackio:fallback")
    extra_env = {"TRACKIO_DIR": str(trackio_dir)}
    rows = 20_000
    daemon.start(*args, extra_env=extra_env)
    names = ["k0", "k1"]
    clients = [
        run_client(env, "--name", name, "--rows", str(rows), "--pace", "0.04") for name in names
    ]
    for _ in range(2):
        time.sleep(1.5)
        assert all(client.poll() is None for client in clients), "clients finished too early"
        daemon.kill()
        daemon.start(*args, extra_env=extra_env)
    ids = [finish_client(client)["id"] for client in clients]
    daemon.flush()
    assert daemon.stop() == 0
    found = read_trackio(env, trackio_dir)
    assert sorted(found["p"]) == names
    for name, run_id in zip(names, ids, strict=True):
        run = found["p"][name]
        assert run["id"] == run_id
        assert_every_step_once(run, rows)
        assert run["config"]["_Status"] == "finished"
