"""Parity: each script of tests/parity/ runs twice, with the real library (W&B offline,
MLflow on an sqlite store) and with its one import line swapped for trackd's shim, through
a real daemon into the same backend's sink. Both results are read back with the backend's
own reader, flattened to {field: value}, and must be equal but for ALLOWED."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from helpers.wandb_log import Session, read_runs, wandb_env

pytestmark = pytest.mark.filterwarnings(
    # reading an sqlite store in this process goes through SQLAlchemy 2.1, which warns about
    # MLflow's queries
    "ignore::sqlalchemy.exc.SADeprecationWarning"
)

CORPUS = Path(__file__).parent / "parity"
SWAPS = {
    "import wandb\n": "import trackd.wandb as wandb\n",
    "import mlflow\n": "import trackd.mlflow as mlflow\n",
}
# Every difference by design between the real library's run and the shim's, as a pattern of
# flattened fields, with its reason. Anything not matched here must be equal.
ALLOWED = {
    "config.trackd": "the W&B sink stores trackd's run metadata (run id, host, pid) in config",
    "config._wandb": "W&B's own bookkeeping (versions, runtime) of whichever process ran wandb",
    "summary.trackd/*": "the W&B sink records the trackd end status and error in the summary",
    "summary._*": "W&B's wall-clock bookkeeping (_runtime, _timestamp) of two processes",
    "history.*/path": "a media file's name holds wandb's step counter when the object was made",
    "summary.*/path": "a media file's name holds wandb's step counter when the object was made",
    "history.*/*artifact_path": "a table's artifact path holds a random W&B client id",
    "summary.*/*artifact_path": "a table's artifact path holds a random W&B client id",
    "history.*._runtime": "wall-clock times of two different processes",
    "history.*._timestamp": "wall-clock times of two different processes",
    "summary.val/loss*": "define_metric(summary='min') is a no-op: the summary is the last value",
    "tags.trackd.ignored.*": "a documented no-op (define_metric) is marked once on the run",
    "artifact.*.type": "trackd artifacts have no type: the W&B sink logs them 'unspecified'",
    "artifact.*.files": "a trackd artifact is one file, named after the artifact",
    "runs.*.tags.trackd.*": "the MLflow sink records trackd's run metadata as tags",
    "runs.*.tags.mlflow.user": "MLflow records the logging process's user; the daemon logs",
    "runs.*.tags.mlflow.source.*": "MLflow records the logging process's script; the daemon logs",
    "runs.*.tags.mlflow.parentRunId": "run ids differ; the parent is compared by name (.parent)",
    "runs.*.ts.*": "wall-clock times of two processes (a timestamp the script gives is compared)",
}


def swapped(script: Path, folder: Path) -> Path:
    """The script with its one import line changed to trackd's shim, and nothing else."""
    lines = script.read_text().splitlines(keepends=True)
    changed = [index for index, line in enumerate(lines) if line in SWAPS]
    assert len(changed) == 1, f"{script.name}: expected one import line to swap"
    lines[changed[0]] = SWAPS[lines[changed[0]]]
    target = folder / script.name
    target.write_text("".join(lines))
    return target


def run_script(script: Path, cwd: Path, env: dict[str, str]) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stderr[-4000:]}"


def compared(real: dict[str, Any], shim: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (real, shim)} for every field that differs and no ALLOWED pattern covers."""
    fields = set(real) | set(shim)
    return {
        field: (real.get(field), shim.get(field))
        for field in sorted(fields)
        if real.get(field) != shim.get(field)
        and not any(fnmatch.fnmatchcase(field, pattern) for pattern in ALLOWED)
    }


def flat(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flat(f"{prefix}.{key}", item, into)
    else:
        into[prefix] = value


# --- W&B ----------------------------------------------------------------------------------


def wandb_fields(session: Session) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "project": session.project,
        "name": session.name,
        "exit_code": session.exit_code,
    }
    for label in session.tags:
        fields[f"tags.{label}"] = True
    for key, value in session.config.items():
        fields[f"config.{key}"] = value.get("value") if isinstance(value, dict) else value
    flat("summary", session.summary, fields)
    for row in session.history:
        flat(f"history.{row['_step']}", {k: v for k, v in row.items() if k != "_step"}, fields)
    for artifact in session.artifacts:
        fields[f"artifact.{artifact['name']}.type"] = artifact["type"]
        fields[f"artifact.{artifact['name']}.files"] = sorted(f["path"] for f in artifact["files"])
    return fields


def the_session(wandb_dir: Path) -> Session:
    runs = read_runs(wandb_dir / "wandb")
    assert len(runs) == 1, f"expected one W&B run, found {sorted(runs)}"
    (sessions,) = runs.values()
    assert len(sessions) == 1
    return sessions[0]


@pytest.mark.parametrize("script", ["wandb_quickstart.py", "wandb_steps.py", "noether_tracker.py"])
def test_wandb_scripts_give_the_same_w_and_b_run(
    script: str, daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Real wandb offline vs trackd.wandb through the daemon's W&B sink: the same run."""
    real_env = wandb_env(tmp_path / "real")
    run_script(CORPUS / script, tmp_path / "real-cwd", {**env, **real_env})
    shim_env = wandb_env(tmp_path / "shim")
    daemon.start("--sink", "wandb:*", extra_env=shim_env)
    run_script(swapped(CORPUS / script, tmp_path), tmp_path / "shim-cwd", env)
    daemon.flush()
    assert daemon.stop() == 0
    real = wandb_fields(the_session(tmp_path / "real" / "wandb"))
    shim = wandb_fields(the_session(tmp_path / "shim" / "wandb"))
    assert any(field.startswith("history.") for field in real)
    assert compared(real, shim) == {}


# --- MLflow -------------------------------------------------------------------------------


def mlflow_fields(uri: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    fields: dict[str, Any] = {}
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    names = {run.info.run_id: run.info.run_name for run in runs}
    assert len(set(names.values())) == len(runs), f"a run name twice: {sorted(names.values())}"
    experiment_names = {e.experiment_id: e.name for e in experiments}
    for run in runs:
        prefix = f"runs.{run.info.run_name}"
        fields[f"{prefix}.experiment"] = experiment_names[run.info.experiment_id]
        fields[f"{prefix}.status"] = run.info.status
        for key, value in run.data.params.items():
            fields[f"{prefix}.params.{key}"] = value
        for key, value in run.data.tags.items():
            fields[f"{prefix}.tags.{key}"] = value
        parent = run.data.tags.get("mlflow.parentRunId")
        fields[f"{prefix}.parent"] = names.get(parent, parent) if parent else None
        for key in run.data.metrics:
            history = sorted(
                client.get_metric_history(run.info.run_id, key),
                key=lambda m: (m.step, m.timestamp),
            )
            fields[f"{prefix}.metrics.{key}"] = [(m.step, m.value) for m in history]
            stamps = [m.timestamp for m in history]
            if key.startswith("stamped_"):  # the script gave the timestamp: it must be kept
                fields[f"{prefix}.given_ts.{key}"] = stamps
            fields[f"{prefix}.ts.{key}"] = stamps
        fields[f"{prefix}.artifacts"] = sorted(artifact_paths(client, run.info.run_id, None))
    return fields


def artifact_paths(client: Any, run_id: str, path: str | None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found += artifact_paths(client, run_id, item.path)
        else:
            found.append(item.path)
    return found


@pytest.mark.parametrize("script", ["mlflow_tracking.py", "batteryml_tracker.py"])
def test_mlflow_scripts_give_the_same_mlflow_runs(
    script: str, daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Real mlflow on sqlite vs trackd.mlflow through the daemon's MLflow sink: the same
    runs, params, tags, per-key series, parents, statuses and artifact names."""
    real_uri = f"sqlite:///{tmp_path / 'real' / 'mlflow.db'}"
    (tmp_path / "real").mkdir()
    run_script(CORPUS / script, tmp_path / "real-cwd", {**env, "MLFLOW_TRACKING_URI": real_uri})
    shim_uri = f"sqlite:///{tmp_path / 'shim' / 'mlflow.db'}"
    daemon.start("--sink", f"mlflow:{shim_uri}")
    run_script(swapped(CORPUS / script, tmp_path), tmp_path / "shim-cwd", env)
    daemon.flush()
    assert daemon.stop() == 0
    real, shim = mlflow_fields(real_uri), mlflow_fields(shim_uri)
    assert any(".metrics." in field for field in real)
    assert compared(real, shim) == {}
