"""trackd.Histogram and trackd.alert through a real daemon into every sink, each backend
read back with its own reader; `trackd status` and `trackd tail` show the alerts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, start_helper, wait_for

EVEN = {"counts": [1, 2, 3, 4], "edges": [0.0, 0.75, 1.5, 2.25, 3.0]}
GIVEN = {"counts": [5, 0, 7], "edges": [0.0, 1.0, 3.0, 10.0]}
HISTOGRAMS = {"h/list": (0, EVEN), "h/given": (1, GIVEN), "h/tensor": (2, EVEN)}
ALERTS = [
    {"title": "loss is low", "text": "below 0.35", "level": "INFO"},
    {"title": "slow step", "text": "", "level": "WARN"},
    {"title": "diverged", "text": "loss is nan", "level": "ERROR"},
]


def log_histograms(daemon: Daemon, env: dict[str, str], *sink: str) -> str:
    daemon.start("--sink", *sink)
    run_id: str = finish_client(start_helper("histogram_client.py", env))["id"]
    daemon.flush()
    return run_id


def only_sink_notices(daemon: Daemon) -> dict[str, int]:
    [notices] = [sink["notices"] for sink in daemon.status()["sinks"].values()]
    return dict(notices)


def test_jsonl_indexes_histograms_inline_and_writes_alerts_jsonl(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Each histogram is an index row {"_type": "histogram", counts, edges} at its step;
    each alert one line of alerts.jsonl; status lists the alerts."""
    root = tmp_path / "runs"
    run_id = log_histograms(daemon, env, f"jsonl:{root}")
    status = daemon.status()
    assert [
        {key: alert[key] for key in ("title", "text", "level", "project", "name", "run")}
        for alert in status["alerts"]
    ] == [{**alert, "project": "p", "name": "hist", "run": run_id} for alert in ALERTS]
    shown = cli(env, "status").stdout
    assert "recent alerts:" in shown
    assert "p/hist [ERROR] diverged: loss is nan" in shown
    assert daemon.stop() == 0
    run_dir = root / "p" / f"hist-{run_id[:8]}"
    rows = jsonl_runs(root)[run_dir.name]
    found = {
        key: (row["step"], value)
        for row in rows
        for key, value in row.items()
        if isinstance(value, dict)
    }
    assert found == {
        key: (step, {"_type": "histogram", **value}) for key, (step, value) in HISTOGRAMS.items()
    }
    assert [(row["step"], row["loss"]) for row in rows if "loss" in row] == [
        (0, 0.5),
        (1, 0.4),
        (3, 0.3),
    ]
    assert not list(run_dir.glob("media/**/*.*"))  # no file for a histogram
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in alert.items() if k != "ts"} for alert in alerts] == ALERTS
    assert all(set(alert) == {"ts", "title", "text", "level"} for alert in alerts)


def test_tail_prints_alerts_with_their_level(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """`trackd tail --since-start` shows each alert as `PROJECT/RUN alert [LEVEL] title: text`."""
    log_histograms(daemon, env, f"jsonl:{tmp_path / 'runs'}")
    process = subprocess.Popen(
        [sys.executable, "-m", "trackd", "tail", "--since-start", "--lines"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    try:
        while len([line for line in lines if " alert " in line]) < len(ALERTS):
            lines.append(process.stdout.readline())
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
    assert [line.strip() for line in lines if " alert " in line] == [
        "p/hist alert [INFO] loss is low: below 0.35",
        "p/hist alert [WARN] slow step",
        "p/hist alert [ERROR] diverged: loss is nan",
    ]


def test_tensorboard_gets_histogram_summaries_and_alert_texts(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util  # type: ignore[import-untyped]

    logdir = tmp_path / "tb"
    run_id = log_histograms(daemon, env, f"tensorboard:{logdir}")
    assert only_sink_notices(daemon) == {}
    assert daemon.stop() == 0
    events = EventAccumulator(
        str(logdir / "p" / f"hist-{run_id[:8]}"), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE
    ).Reload()
    assert sorted(events.Tags()["histograms"]) == sorted(HISTOGRAMS)
    for key, (step, expected) in HISTOGRAMS.items():
        [event] = events.Histograms(key)
        value = event.histogram_value
        assert event.step == step
        assert (value.min, value.max, value.num) == (
            expected["edges"][0],
            expected["edges"][-1],
            sum(expected["counts"]),
        )
        assert list(value.bucket_limit) == expected["edges"][1:]
        assert list(value.bucket) == expected["counts"]
    texts = [
        tensor_util.make_ndarray(event.tensor_proto).item().decode()
        for event in events.Tensors("trackd/alerts")
    ]
    assert len(texts) == 3
    for text, alert in zip(texts, ALERTS, strict=True):
        assert f"| level | {alert['level']} |" in text
        assert f"| title | {alert['title']} |" in text


def test_mlflow_stores_histograms_and_alerts_as_json_artifacts(
    daemon: Daemon, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    uri = f"file:{tmp_path}/mlruns"
    log_histograms(daemon, env, f"mlflow:{uri}")
    assert daemon.stop() == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("p")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "down")))
    stored = {
        str(path.relative_to(local)): json.loads(path.read_text()) for path in local.rglob("*.json")
    }
    histograms = {name: value for name, value in stored.items() if name.startswith("histograms/")}
    assert histograms == {
        f"histograms/{key}/{step}.json": {"key": key, "step": step, **value}
        for key, (step, value) in HISTOGRAMS.items()
    }
    alerts = sorted(
        (value for name, value in stored.items() if name.startswith("alerts/")),
        key=lambda alert: alert["ts"],
    )
    assert [{k: v for k, v in alert.items() if k != "ts"} for alert in alerts] == ALERTS


def test_wandb_history_holds_histograms_and_the_log_holds_alerts(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    from helpers.wandb_log import read_runs
    from test_sink_wandb import wandb_env

    env = {**env, **wandb_env(tmp_path)}
    daemon.env = env
    run_id = log_histograms(daemon, env, "wandb:*")
    assert daemon.stop() == 0
    [[session]] = read_runs(tmp_path / "wandb" / "wandb").values()
    assert session.run_id == run_id
    for key, (step, expected) in HISTOGRAMS.items():
        row = session.history[step]
        assert row[f"{key}/_type"] == "histogram"
        assert row[f"{key}/values"] == expected["counts"]
        assert row[f"{key}/bins"] == pytest.approx(expected["edges"])
    assert session.alerts == ALERTS


AIM_READER = """
import json, logging, sys
from aim import Repo, Run
from aim.sdk.index_manager import RepoIndexManager
from aim.storage.context import Context

repo = Repo(sys.argv[1])
[run_hash] = list(repo.list_all_runs())
RepoIndexManager.get_index_manager(repo).index(run_hash)
run = Run(run_hash, repo=Repo(sys.argv[1]), read_only=True)
found = {}
for key in sys.argv[2:]:
    sequence = run.get_distribution_sequence(key, Context({}))
    steps, (values, _epochs, _times) = sequence.data.items_list()
    found[key] = [[s, v.weights.tolist(), list(v.range)] for s, v in zip(steps, values)]
logs = run.get_log_records()
_, (records, _epochs, _times) = logs.data.items_list()
found["logs"] = [[r.message, logging.getLevelName(r.level)] for r in records]
print(json.dumps(found))
"""


def test_aim_gets_distributions_and_log_records(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """A histogram is an aim.Distribution at its step (uneven bins spread evenly: a notice);
    an alert is a log record at its level."""
    repo = tmp_path / "aim"
    log_histograms(daemon, env, f"aim:{repo}")
    assert only_sink_notices(daemon) == {
        "histograms with uneven bins are shown with even bins in Aim": 1
    }
    assert daemon.stop() == 0
    out = subprocess.run(
        [sys.executable, "-c", AIM_READER, str(repo), *HISTOGRAMS],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    aim: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert aim.pop("logs") == [
        ["loss is low: below 0.35", "INFO"],
        ["slow step", "WARNING"],
        ["diverged: loss is nan", "ERROR"],
    ]
    assert aim == {
        key: [[step, value["counts"], [value["edges"][0], value["edges"][-1]]]]
        for key, (step, value) in HISTOGRAMS.items()
    }


def test_trackio_stores_histograms_and_alerts_as_trackio_would(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    from test_sink_trackio import read_trackio, read_trackio_alerts

    trackio_dir = tmp_path / "trackio"
    daemon.start("--sink", "trackio:fallback", extra_env={"TRACKIO_DIR": str(trackio_dir)})
    run_id = finish_client(start_helper("histogram_client.py", env))["id"]
    daemon.flush()
    assert only_sink_notices(daemon) == {}
    assert daemon.stop() == 0
    [run] = read_trackio(env, trackio_dir)["p"].values()
    assert run["id"] == run_id
    logs = run["logs"]
    found = {key: (log["step"], log[key]) for log in logs for key in HISTOGRAMS if key in log}
    assert found == {
        key: (step, {"_type": "trackio.histogram", "bins": v["edges"], "values": v["counts"]})
        for key, (step, v) in HISTOGRAMS.items()
    }
    alerts = read_trackio_alerts(env, trackio_dir, "p")
    assert sorted((a["title"], a["text"], a["level"], a["run"]) for a in alerts) == sorted(
        (a["title"], a["text"] or None, a["level"].lower(), "hist") for a in ALERTS
    )


def test_alerts_jsonl_holds_every_alert_once_across_a_daemon_kill(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """alerts.jsonl is appended exactly once per alert although the daemon is killed -9
    while alerts stream in and the sink's batches are re-sent after the restart."""
    root = tmp_path / "runs"
    daemon.start("--sink", f"jsonl:{root}")
    rows = 3000
    client = run_client(
        env, "--name", "alerts", "--rows", str(rows), "--alert-every", "2", "--pace", "0.1"
    )
    wait_for(lambda: daemon.status()["ingest"]["messages"] > 50, timeout=60)
    daemon.kill()
    daemon.start("--sink", f"jsonl:{root}")
    run_id = finish_client(client)["id"]
    daemon.flush()
    lines = (root / "p" / f"alerts-{run_id[:8]}" / "alerts.jsonl").read_text().splitlines()
    titles = [json.loads(line)["title"] for line in lines]
    assert titles == [f"row {step}" for step in range(0, rows, 2)]
