"""Resuming through the shims as W&B (`id=`, `resume=`) and MLflow (`start_run(run_id=...)`)
resume: each session its own process, with the daemon up, and with no daemon at all (both
sessions spooled, the daemon started afterwards). Either way the backend holds one run,
under its first name, with every step once and in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from helpers.wandb_log import read_runs, wandb_env

pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")

WANDB_SESSION = r"""
import json, sys
import trackd.wandb as wandb

run_id, resume, name, rows = sys.argv[1:5]
run = wandb.init(project="resumed", id=run_id, name=None if name == "-" else name,
                 resume=None if resume == "-" else resume)
first = run.step
for _ in range(int(rows)):
    wandb.log({"loss": 0.5, "first": first})
print(json.dumps({"id": run.id, "name": run.name, "first": first}))
wandb.finish()
"""

MLFLOW_SESSION = r"""
import json, sys
import trackd.mlflow as mlflow

run_id, steps = sys.argv[1], [int(step) for step in sys.argv[2].split(",")]
mlflow.set_experiment("resumed")
with mlflow.start_run(run_id=None if run_id == "-" else run_id, run_name="m") as run:
    for step in steps:
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
print(json.dumps({"id": run.info.run_id, "name": run.info.run_name}))
"""


def session(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


@pytest.mark.parametrize("daemon_up", [True, False], ids=["daemon", "no-daemon"])
def test_wandb_resume_by_id_continues_one_w_and_b_run(
    daemon_up: bool, daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """`init(id=X, name=N)`, then `init(id=X, resume="must")` (no name) and
    `init(id=X, resume="allow")`: one W&B run X named N, steps 0..6 once, each session
    starting after the last; resume="must" of an unknown id fails (with a daemon)."""
    shim_env = wandb_env(tmp_path / "w")
    if daemon_up:
        daemon.start("--sink", "wandb:*", extra_env=shim_env)
    first = result(session(WANDB_SESSION, env, "run-x", "-", "first-name", "3"))
    second = result(session(WANDB_SESSION, env, "run-x", "must", "-", "2"))
    third = result(session(WANDB_SESSION, env, "run-x", "allow", "-", "2"))
    assert [first["first"], second["first"], third["first"]] == [0, 3, 5]
    assert {first["name"], second["name"], third["name"]} == {"first-name"}
    if daemon_up:
        unknown = session(WANDB_SESSION, env, "run-y", "must", "-", "1")
        assert unknown.returncode == 1
        assert "resume='must'" in unknown.stderr
    else:
        daemon.start("--sink", "wandb:*", extra_env=shim_env)
    daemon.flush()
    assert daemon.stop() == 0
    runs = read_runs(tmp_path / "w" / "wandb" / "wandb")
    assert sorted(runs) == ["run-x"]
    history = [row for logged in runs["run-x"] for row in logged.history]
    assert [row["_step"] for row in history] == list(range(7))
    assert [row["first"] for row in history] == [0, 0, 0, 3, 3, 5, 5]
    assert {logged.name for logged in runs["run-x"]} == {"first-name"}
    assert runs["run-x"][-1].exit_code == 0


@pytest.mark.parametrize("daemon_up", [True, False], ids=["daemon", "no-daemon"])
def test_mlflow_start_run_with_run_id_resumes_one_mlflow_run(
    daemon_up: bool, daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """`start_run(run_name="m")`, then `start_run(run_id=its id)` in another process: one
    MLflow run "m" in the same experiment with loss at steps 0..4 once, FINISHED."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if daemon_up:
        daemon.start("--sink", f"mlflow:{uri}")
    first = result(session(MLFLOW_SESSION, env, "-", "0,1,2"))
    second = result(session(MLFLOW_SESSION, env, first["id"], "3,4"))
    assert second == first
    if daemon_up:
        unknown = session(MLFLOW_SESSION, env, "0" * 32, "0")
        assert unknown.returncode == 1
        assert "resume='must'" in unknown.stderr
    else:
        daemon.start("--sink", f"mlflow:{uri}")
    daemon.flush()
    assert daemon.stop() == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resumed")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("m", "FINISHED")
    assert run.data.tags["trackd.run_id"] == first["id"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(5)]
