"""Fan-out: jsonl + mlflow + tensorboard, with the MLflow server down for the first half."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import (
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)

from conftest import Daemon, finish_client, jsonl_runs, run_client, wait_for
from mlflow_server import MlflowServer

pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
ROWS = 10_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    handle = MlflowServer(tmp_path / "mlflow")
    handle.root.mkdir()
    yield handle
    handle.kill()


def sinks(daemon: Daemon) -> dict[str, dict[str, object]]:
    return {sink["spec"].split(":")[0]: sink for sink in daemon.status()["sinks"].values()}


def test_mlflow_down_for_the_first_half_holds_back_only_mlflow(
    tmp_path: Path, daemon: Daemon, env: dict[str, str], server: MlflowServer
) -> None:
    """jsonl and tensorboard finish while MLflow is down; MLflow completes once it is back."""
    out, logdir = tmp_path / "runs", tmp_path / "tb"
    daemon.start(
        *("--sink", f"jsonl:{out}", "--sink", f"mlflow:{server.uri}"),
        *("--sink", f"tensorboard:{logdir}"),
        extra_env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
    )
    client = run_client(env, "--name", "half", "--rows", str(ROWS), "--pace", "0.03")
    wait_for(lambda: sinks(daemon)["mlflow"]["retries"] > 0)
    during = sinks(daemon)
    assert during["mlflow"]["last_error"], "status names why mlflow is behind"
    assert during["mlflow"]["lag_records"] > 0
    finish_client(client)
    wait_for(
        lambda: all(sinks(daemon)[kind]["lag_records"] == 0 for kind in ("jsonl", "tensorboard"))
    )
    late = sinks(daemon)
    assert late["mlflow"]["delivered_rows"] == 0, "mlflow was down the whole time so far"
    assert late["mlflow"]["lag_records"] > 0
    assert [row["step"] for row in next(iter(jsonl_runs(out).values()))] == list(range(ROWS))
    (run_dir,) = (logdir / "p").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(ROWS))

    server.start()
    daemon.flush(timeout=120)
    client_api = MlflowClient(tracking_uri=server.uri)
    experiment = client_api.get_experiment_by_name("p")
    assert experiment is not None
    (run,) = client_api.search_runs([experiment.experiment_id])
    history = client_api.get_metric_history(run.info.run_id, "loss")
    assert sorted(metric.step for metric in history) == list(range(ROWS))
    assert run.info.status == "FINISHED"
    assert sinks(daemon)["mlflow"]["lag_records"] == 0
