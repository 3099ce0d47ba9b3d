"""System samples in every backend, under the backend's own names, read back with its own
reader: one daemon feeding jsonl, a real `mlflow server`, TensorBoard, W&B offline, a local
Aim repo and Trackio, sampling every 0.5 s with real psutil readings and the stand-in NVML
of tests/helpers/fake_nvml (fixed GPU readings; this machine has no GPU), a run's process
holding GPU memory on GPU 0."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, PLUGINS, Daemon, wait_for
from helpers.wandb_log import read_runs
from mlflow_server import MlflowServer
from test_sink_aim import read_aim
from test_sink_tensorboard import load
from test_sink_trackio import read_trackio
from test_sink_wandb import wandb_env
from test_system_metrics import first_line, samples, start_load

GIB = 1024**3
SAMPLES = 4


@dataclass
class Delivered:
    """Where the one run's samples went, and what the jsonl sink holds of them."""

    root: Path
    env: dict[str, str]
    mlflow: MlflowServer
    rows: list[dict[str, Any]]
    run_id: str


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivered]:
    root = tmp_path_factory.mktemp("system-sinks")
    mlflow = MlflowServer(root)
    mlflow.start()
    held = root / "gpu-held.json"
    env = {
        **os.environ,
        **wandb_env(root),
        "PYTHONPATH": os.pathsep.join([str(HELPERS / "fake_nvml"), str(PLUGINS), str(HELPERS)]),
        "FAKE_NVML_PROCESSES": str(held),
        "TRACKIO_DIR": str(root / "trackio"),
        "TRACKD_RUNTIME_DIR": str(root / "rt"),
        "TRACKD_DATA_DIR": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "TRACKD_SYSTEM_INTERVAL": "0.5",
    }
    env.pop("TRACKD_ENDPOINT", None)
    sinks = [
        f"jsonl:{root / 'data' / 'runs'}",
        f"mlflow:{mlflow.uri}",
        f"tensorboard:{root / 'tb'}",
        "wandb:*?mode=offline",
        f"aim:{root / 'aim'}",
        "trackio:sys",
    ]
    daemon = Daemon(env, root / "rt", root / "data")
    stop = root / "stop"
    try:
        daemon.start(*(arg for spec in sinks for arg in ("--sink", spec)))
        client = start_load(env, "sampled", stop)
        started = first_line(client)
        held.write_text(json.dumps({"0": {str(started["pid"]): 2 * GIB}}))
        wait_for(
            lambda: (
                len(
                    [row for row in samples(root / "data", "sampled") if "gpu.0.proc.memory" in row]
                )
                >= SAMPLES
            ),
            timeout=120,
        )
        stop.touch()
        client.communicate(timeout=120)
        daemon.flush(timeout=120)
        assert daemon.stop() == 0
        yield Delivered(root, env, mlflow, samples(root / "data", "sampled"), started["id"])
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
        mlflow.kill()


def since_first(rows: list[dict[str, Any]], key: str) -> list[float]:
    """A counter since boot (as system.jsonl holds it) counted from the run's first sample,
    as wandb's and MLflow's own monitors count disk I/O and network bytes."""
    return [row[key] - rows[0][key] for row in rows]


def test_jsonl_holds_every_sample_with_gpu_readings_and_the_runs_gpu_memory(
    delivered: Delivered,
) -> None:
    rows = delivered.rows
    assert len(rows) >= SAMPLES
    for row in rows:
        assert row["node"] == os.uname().nodename
        assert row["gpu.0.util"] == 37
        assert row["gpu.0.power.percent"] == 50
        assert "gpu.1.temp" not in row  # the stand-in refuses it
        assert "gpu.1.proc.memory" not in row
    assert [row["gpu.0.proc.memory"] for row in rows if "gpu.0.proc.memory" in row][-1] == 2 * GIB


def test_mlflow_gets_system_metrics_under_its_monitor_names_once_each(
    delivered: Delivered,
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=delivered.mlflow.uri)
    experiment = client.get_experiment_by_name("sys")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])

    def history(key: str) -> list[float]:
        points = client.get_metric_history(run.info.run_id, key)
        return [point.value for point in sorted(points, key=lambda point: point.timestamp)]

    count = len(delivered.rows)
    assert history("system/gpu_0_utilization_percentage") == [37.0] * count
    assert history("system/gpu_0_power_usage_percentage") == [50.0] * count
    assert history("system/gpu_0_memory_usage_megabytes") == [4 * GIB / 1e6] * count
    assert len(history("system/cpu_utilization_percentage")) == count
    assert len(history("system/system_memory_usage_megabytes")) == count
    assert len(history("system/disk_usage_percentage")) == count
    memory = [
        row["gpu.0.proc.memory"] / 1e6 for row in delivered.rows if "gpu.0.proc.memory" in row
    ]
    assert history("system/gpu_1_process_memory_usage_megabytes") == []
    assert history("system/gpu_0_process_memory_usage_megabytes") == memory
    sent = [value / 1e6 for value in since_first(delivered.rows, "network.sent")]
    assert history("system/network_transmit_megabytes") == pytest.approx(sent)
    assert history("system/disk_write_megabytes")[0] == 0


def test_tensorboard_gets_system_scalars(delivered: Delivered) -> None:
    (run_dir,) = (delivered.root / "tb" / "sys").glob("sampled-*")
    events = load(run_dir)
    count = len(delivered.rows)
    assert [point.value for point in events.Scalars("system/gpu.0.util")] == [37.0] * count
    assert len(events.Scalars("system/memory.percent")) == count
    assert "system/gpu.1.temp" not in events.Tags()["scalars"]
    received = [point.value for point in events.Scalars("system/network.recv")]
    assert received == pytest.approx(since_first(delivered.rows, "network.recv"), abs=1)


def test_wandb_gets_stats_records_under_its_system_monitor_names(delivered: Delivered) -> None:
    sessions = read_runs(delivered.root / "wandb" / "wandb")[delivered.run_id]
    stats = [sample for session in sessions for sample in session.stats]
    assert [sample["_timestamp"] for sample in stats] == [row["ts"] for row in delivered.rows]
    for sample in stats:
        assert sample["gpu.0.gpu"] == 37
        assert sample["gpu.0.powerPercent"] == 50
        assert sample["gpu.0.memoryAllocated"] == 25
        assert sample["proc.memory.rssMB"] > 1
        assert "memory_percent" in sample
        assert "gpu.1.temp" not in sample
    assert [s["gpu.process.0.memoryAllocatedBytes"] for s in stats if len(s) > 20][-1] == 2 * GIB
    # network bytes counted from the run's first sample, as wandb's own monitor counts them
    assert [sample["network.sent"] for sample in stats] == since_first(
        delivered.rows, "network.sent"
    )


def test_aim_gets_system_metrics_with_a_gpu_context(delivered: Delivered) -> None:
    (run,) = read_aim(delivered.env, delivered.root / "aim").values()
    metrics = run["metrics"]
    count = len(delivered.rows)
    assert metrics['__system__gpu {"gpu": 0}']["values"] == [37.0] * count
    assert metrics['__system__gpu {"gpu": 1}']["values"] == [5.0] * count
    assert metrics['__system__gpu_power_watts {"gpu": 0}']["values"] == [150.0] * count
    assert '__system__gpu_temp {"gpu": 1}' not in metrics
    assert len(metrics["__system__memory_percent"]["values"]) == count
    assert len(metrics["__system__disk_percent"]["values"]) == count
    sent = metrics["__system__network_sent"]["values"]
    assert sent == since_first(delivered.rows, "network.sent")
    times = metrics["__system__memory_percent"]["times"]
    assert times == pytest.approx([row["ts"] for row in delivered.rows])


def test_trackio_gets_system_logs_under_its_monitor_names(delivered: Delivered) -> None:
    run = read_trackio(delivered.env, delivered.root / "trackio")["sys"]["sampled"]
    system = run["system"]
    assert len(system) == len(delivered.rows)
    for entry in system:
        assert entry["gpu/0/utilization"] == 37
        assert entry["gpu/0/memory_usage"] == pytest.approx(0.25)
        assert "memory/percent" in entry
        assert "cpu/utilization" in entry
        assert "gpu/1/temp" not in entry
    sent = [entry["network/sent_bytes"] for entry in system]
    assert sent == since_first(delivered.rows, "network.sent")
