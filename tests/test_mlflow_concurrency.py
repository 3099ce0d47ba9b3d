"""The MLflow sink's adaptive concurrency against a real `mlflow server` (issue 13 §3).

The daemon's sink talks to the server through the test proxy (helpers/auth_proxy.py),
which counts the `log-batch` calls at once and, on the test's word, delays them (a slow
server: a backlog builds) or answers them 503 instead of forwarding them. Adaptive: the
sink grows past one call while the server answers, falls back to one call at a time
under 503s (the proxy sees no more), and afterwards every point is in MLflow once.
Fixed: the same 503s meet `in_flight` calls at once. `trackd status` (text, --json)
and the Prometheus endpoint show the limit.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, cli, finish_client, free_port, wait_for
from helpers import auth_proxy, until_client
from mlflow_server import MlflowServer

pytestmark = [
    pytest.mark.timeout(240),
    # reading the sqlite store's answers goes through SQLAlchemy in the server, not here;
    # the MLflow client in this process still warns about its own deprecations
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

KEYS = ("i", "loss")  # what until_client.py logs, here up to 100 rows every 0.05 s
CEILING = 8
LOG_BATCH = "/runs/log-batch"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    made = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    made.start()
    yield made
    made.kill()


@pytest.fixture
def proxy(server: MlflowServer, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = auth_proxy.start(port, server.port, {}, tmp_path / "proxy.log", watch=LOG_BATCH)
    yield port
    process.kill()
    process.wait(10)


def sink_status(daemon: Daemon) -> dict[str, Any]:
    (status,) = daemon.status()["sinks"].values()
    result: dict[str, Any] = status
    return result


def histories(uri: str, name: str) -> dict[str, list[int]]:
    """The steps of each key of run `name` (until_client.py's project "p") in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("p")
    assert experiment is not None
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]
    return {
        key: sorted(point.step for point in client.get_metric_history(run.info.run_id, key))
        for key in KEYS
    }


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_503s_bring_an_adaptive_sink_down_to_one_call_and_every_point_lands_once(
    mode: str,
    server: MlflowServer,
    proxy: int,
    daemon: Daemon,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Under 503s the adaptive sink sends one call at a time, the fixed one `in_flight`;
    once the server answers again every point is in MLflow exactly once."""
    metrics_port = free_port()
    spec = f"mlflow:http://127.0.0.1:{proxy}?in_flight={CEILING}&concurrency={mode}"
    daemon.start("--sink", spec, "--metrics-addr", f"127.0.0.1:{metrics_port}")
    name, stop = f"concurrency-{mode}", tmp_path / "stop"
    client = until_client.start(env, name, stop, per_tick=100)  # logging until the test is done
    try:
        if mode == "adaptive":
            wait_for(lambda: sink_status(daemon)["concurrency"]["increases"] > 0, timeout=120)
        else:
            wait_for(lambda: sink_status(daemon)["delivered_rows"] > 0, timeout=120)

        # a slow server first: a backlog builds, so the batch the 503s meet holds several calls
        slowed = auth_proxy.set_fault(proxy, delay=1.0)["forwarded"]
        wait_for(lambda: auth_proxy.set_fault(proxy, read_only=True)["forwarded"] > slowed + 3, 60)
        auth_proxy.set_fault(proxy, status=503)
        if mode == "adaptive":
            try:
                wait_for(lambda: sink_status(daemon)["concurrency"]["limit"] == 1, timeout=60)
            except AssertionError as exc:
                counts = auth_proxy.set_fault(proxy, 503, read_only=True)
                raise AssertionError(f"{sink_status(daemon)}; proxy: {counts}") from exc
        before = auth_proxy.set_fault(proxy, status=503)  # counts from here: the limit is known
        faulted = before["faulted"] + 10  # 503s answered from here on, not counting earlier ones
        wait_for(lambda: auth_proxy.set_fault(proxy, read_only=True)["faulted"] >= faulted, 60)
        during = auth_proxy.set_fault(proxy)  # the server answers again
        status = sink_status(daemon)
        assert status["retries"] > 0
        assert "503" in status["last_error"]
        if mode == "adaptive":
            assert during["most_in_flight"] == 1, "under back pressure one call at a time"
            assert status["concurrency"]["decreases"] > 0
        else:
            assert during["most_in_flight"] > 1, "a fixed limit keeps sending in_flight calls"
            assert status["concurrency"]["limit"] == CEILING
        assert during["faulted"] > before["faulted"]
    finally:
        stop.touch()  # the client finishes its run and exits, also after a failure
    rows = finish_client(client)["rows"]
    daemon.flush(timeout=180)
    assert sink_status(daemon)["dead_letters"] == 0
    assert histories(f"http://127.0.0.1:{proxy}", name) == {
        key: list(range(rows)) for key in KEYS
    }, "every point once"

    shown = sink_status(daemon)["concurrency"]
    assert shown["mode"] == mode
    assert shown["ceiling"] == CEILING
    assert 1 <= shown["limit"] <= CEILING
    assert shown["in_flight"] == 0
    text = cli({**env, "COLUMNS": "300"}, "status").stdout  # one line per sink
    assert f"{shown['limit']}/{CEILING} {mode}" in text
    as_json = json.loads(cli(env, "status", "--json").stdout)
    (listed,) = as_json["sinks"].values()
    assert listed["concurrency"]["limit"] == shown["limit"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        scraped = {
            sample.name: sample.value
            for family in text_string_to_metric_families(answer.read().decode())
            for sample in family.samples
            if sample.name.startswith("trackd_sink_concurrency")
        }
    assert scraped == {
        "trackd_sink_concurrency_limit": shown["limit"],
        "trackd_sink_concurrency_ceiling": CEILING,
        "trackd_sink_concurrency_in_flight": 0,
    }
