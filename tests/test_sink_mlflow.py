"""The MLflow sink against the real thing: an `mlflow server` on 127.0.0.1, sqlite and file stores.

One server (sqlite store in the module's tmp dir) is started per module, by
PID, in its own process group (its uvicorn worker is a child); the outage test
SIGKILLs it and starts it again on the same store and port, and every test
first makes sure it is up. Each test uses its own MLflow experiment (project).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, finish_client, free_port, wait_for
from helpers.postgres import Postgres
from mlflow_server import MlflowServer
from trackd.sinks.base import Record, RunInfo, SinkContext, SinkError, SinkSpec

pytestmark = pytest.mark.filterwarnings(
    # reading a sqlite store in this process goes through SQLAlchemy 2.1, which warns about
    # MLflow's queries; the sink itself runs in the daemon, where warnings are not errors
    "ignore::sqlalchemy.exc.SADeprecationWarning"
)

# A training script: config (nested), tags, paced log() calls timed one by one, summary,
# an artifact; "fail" raises inside `with`, "conflict" re-logs a param with a new value
# and a metric name MLflow refuses.
CLIENT = r"""
import json, sys, time
import trackd

project, name, rows, pace, mode, artifact = sys.argv[1:7]
rows, pace = int(rows), float(pace)
worst = 0.0
run = trackd.init(
    project=project, name=name, tags={"team": "vision"},
    config={"rows": rows, "optimizer": {"name": "adam", "lr": 0.001}, "note": "x" * 7000},
)
try:
    with run:
        run.set_tags({"stage": "test"})
        for step in range(rows):
            began = time.perf_counter()
            run.log({"loss": 1.0 / (step + 1), "i": step})
            worst = max(worst, time.perf_counter() - began)
            if pace and step % 100 == 99:
                time.sleep(pace)
        if mode == "conflict":
            run.log_config({"optimizer": {"lr": 0.5}, "epochs": 3})
            run.log({"bad//key": 1.0, "ok": 2.0}, step=rows)
        run.set_summary({"best_acc": 0.99})
        if artifact != "-":
            run.log_artifact(artifact, name="notes.txt")
        if mode == "fail":
            raise RuntimeError("loss diverged")
except RuntimeError:
    pass
print(json.dumps({"id": run.id, "worst_log_seconds": worst}))
"""


class Clients:
    """Training scripts (CLIENT) started by a test; any still running at its end are killed."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        project: str,
        name: str,
        rows: int,
        pace: float = 0.0,
        mode: str = "ok",
        artifact: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        arguments = [project, name, str(rows), str(pace), mode, str(artifact or "-")]
        process = subprocess.Popen(
            [sys.executable, "-c", CLIENT, *arguments],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.started.append(process)
        return process


@pytest.fixture
def clients(env: dict[str, str]) -> Iterator[Clients]:
    handle = Clients(env)
    yield handle
    for process in handle.started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.kill()


@pytest.fixture
def server(server_process: MlflowServer) -> MlflowServer:
    server_process.ensure_running()
    return server_process


@pytest.fixture
def postgres_server(postgres: Postgres, tmp_path: Path) -> Iterator[MlflowServer]:
    """MLflow's setup for a shared server: a PostgreSQL store (a fresh database) and 2 workers."""
    database = postgres.create_database(f"mlflow_{free_port()}")
    server = MlflowServer(tmp_path / "mlflow-postgres", database, workers=2)
    server.root.mkdir()
    server.start()
    yield server
    server.kill()


def mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, project: str) -> dict[str, Any]:
    """{run name: MLflow run} of the experiment named `project`; one run per name."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(project)
    assert experiment is not None, f"no experiment {project!r}"
    runs = client.search_runs([experiment.experiment_id])
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)), f"a trackd run became several MLflow runs: {names}"
    return {run.info.run_name: run for run in runs}


def assert_complete(uri: str, run: Any, rows: int, status: str = "FINISHED") -> None:
    client = mlflow_client(uri)
    for key in ("loss", "i"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(metric.step for metric in history) == list(range(rows)), key
    values = {
        metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, "i")
    }
    assert values == {step: float(step) for step in range(rows)}
    assert run.data.params["rows"] == str(rows)
    assert run.data.params["optimizer/name"] == "adam"
    assert run.data.params["optimizer/lr"] == "0.001"
    assert run.data.params["note"] == "x" * 6000, "a long param is truncated, not dropped"
    tags = run.data.tags
    assert (tags["team"], tags["stage"], tags["summary/best_acc"]) == ("vision", "test", "0.99")
    assert all(tags[f"trackd.{name}"] for name in ("run_id", "host", "pid"))
    assert run.info.status == status


def sink_status(daemon: Daemon) -> dict[str, Any]:
    (status,) = daemon.status()["sinks"].values()
    result: dict[str, Any] = status
    return result


def test_runs_arrive_whole_with_params_tags_status_and_artifact(
    server: MlflowServer, daemon: Daemon, clients: Clients, tmp_path: Path
) -> None:
    """Two runs at once through the daemon: every step once, params, tags, FINISHED / FAILED."""
    notes = tmp_path / "notes-source.txt"
    notes.write_text("hello")
    daemon.start("--sink", f"mlflow:{server.uri}")
    good = clients.start("whole", "good", 5000, artifact=notes)
    bad = clients.start("whole", "bad", 1000, mode="fail")
    finish_client(good)
    finish_client(bad)
    daemon.flush()
    runs = runs_of(server.uri, "whole")
    assert sorted(runs) == ["bad", "good"]
    assert_complete(server.uri, runs["good"], 5000)
    assert_complete(server.uri, runs["bad"], 1000, status="FAILED")
    assert "loss diverged" in runs["bad"].data.tags["trackd.error"]
    assert "trackd.error" not in runs["good"].data.tags
    artifacts = mlflow_client(server.uri).list_artifacts(runs["good"].info.run_id)
    assert [artifact.path for artifact in artifacts] == ["notes.txt"]
    assert sink_status(daemon)["dead_letters"] == 0
    assert daemon.stop() == 0


def test_server_killed_mid_run_and_back_15s_later_loses_and_duplicates_nothing(
    server: MlflowServer, daemon: Daemon, clients: Clients
) -> None:
    """The issue's outage: SIGKILL 4 s into 20,000 steps, restart 15 s later, all there once."""
    daemon.start("--sink", f"mlflow:{server.uri}")
    client = clients.start("outage", "long", 20_000, pace=0.04)
    time.sleep(4)
    assert client.poll() is None, "the run should still be logging when the server dies"
    server.kill()
    killed = time.monotonic()
    failing = wait_for(
        lambda: (status := sink_status(daemon))["retries"] > 0 and status["last_error"] and status,
        timeout=12,
    )
    assert "mlflow" in failing["last_error"]
    time.sleep(max(0.0, 15 - (time.monotonic() - killed)))
    assert sink_status(daemon)["lag_bytes"] > 0, "the sink should be behind while MLflow is down"
    server.start()
    result = finish_client(client)
    daemon.flush(timeout=120)
    assert result["worst_log_seconds"] < 0.05, "log() must never wait on MLflow"
    runs = runs_of(server.uri, "outage")
    assert list(runs) == ["long"]
    assert_complete(server.uri, runs["long"], 20_000)
    assert sink_status(daemon)["dead_letters"] == 0
    assert daemon.stop() == 0


def test_a_run_arrives_whole_in_a_server_on_postgresql_with_two_workers(
    postgres_server: MlflowServer, daemon: Daemon, clients: Clients
) -> None:
    """Into an MLflow server on PostgreSQL with 2 workers: every step of two runs once,
    params, tags and end status, as with sqlite."""
    uri = postgres_server.uri
    daemon.start("--sink", f"mlflow:{uri}")
    good = clients.start("postgres", "good", 5000)
    bad = clients.start("postgres", "bad", 1000, mode="fail")
    finish_client(good)
    finish_client(bad)
    daemon.flush()
    runs = runs_of(uri, "postgres")
    assert sorted(runs) == ["bad", "good"]
    assert_complete(uri, runs["good"], 5000)
    assert_complete(uri, runs["bad"], 1000, status="FAILED")
    assert sink_status(daemon)["dead_letters"] == 0
    assert daemon.stop() == 0


@pytest.mark.parametrize("store", ["server", "file"])
def test_daemon_killed_mid_delivery_still_exactly_once(
    store: str,
    request: pytest.FixtureRequest,
    daemon: Daemon,
    clients: Clients,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL the daemon twice while its sink delivers, with the cursor saved at most every
    5 s so that what it delivered is sent again: every point once, one MLflow run per trackd
    run, also in the file store, which would store a repeated point twice."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    uri = request.getfixturevalue("server").uri if store == "server" else f"file:{tmp_path}/mlruns"
    serve = ("--sink", f"mlflow:{uri}")
    settings = {"TRACKD_CHECKPOINT_SECONDS": "5"}
    daemon.start(*serve, extra_env=settings)
    running = [clients.start(f"crash-{store}", name, 6000, pace=0.12) for name in "ab"]
    kill_twice_mid_delivery(daemon, serve, settings)
    for client in running:
        finish_client(client)
    daemon.flush(timeout=120)
    runs = runs_of(uri, f"crash-{store}")
    assert sorted(runs) == ["a", "b"]
    for run in runs.values():
        assert_complete(uri, run, 6000)
    assert daemon.stop() == 0


def kill_twice_mid_delivery(
    daemon: Daemon, serve: tuple[str, ...], settings: dict[str, str]
) -> None:
    """SIGKILL the daemon twice once its sink has delivered some rows, restarting it each time."""
    for _ in range(2):
        wait_for(lambda: sink_status(daemon)["delivered_rows"] > 0, timeout=30)
        time.sleep(0.3)
        daemon.kill()
        daemon.start(*serve, extra_env=settings)


def refused_points(postgres: Postgres) -> list[str]:
    """The metric points PostgreSQL refused as duplicates (an IntegrityError on the metrics
    table's key, which sends MLflow into its duplicate-key recovery), with their details."""
    lines = postgres.log().splitlines()
    return [
        "\n".join(lines[index : index + 3])
        for index, line in enumerate(lines)
        if 'violates unique constraint "metric_pk"' in line
    ]


def test_daemon_killed_mid_delivery_into_postgresql_never_sends_a_stored_point_again(
    postgres: Postgres, postgres_server: MlflowServer, daemon: Daemon, clients: Clients
) -> None:
    """SIGKILL the daemon twice mid-delivery into MLflow on PostgreSQL: every point once, and
    PostgreSQL never refused a duplicate, so MLflow never ran its duplicate-key recovery
    (mlflow#24577), whose cost grows with the run; a point sent twice shows in its log."""
    uri = postgres_server.uri
    serve = ("--sink", f"mlflow:{uri}")
    settings = {"TRACKD_CHECKPOINT_SECONDS": "5"}
    refused_before = len(refused_points(postgres))
    daemon.start(*serve, extra_env=settings)
    running = [clients.start("crash-postgres", name, 6000, pace=0.12) for name in "ab"]
    kill_twice_mid_delivery(daemon, serve, settings)
    for client in running:
        finish_client(client)
    daemon.flush(timeout=120)
    runs = runs_of(uri, "crash-postgres")
    assert sorted(runs) == ["a", "b"]
    for run in runs.values():
        assert_complete(uri, run, 6000)
    assert refused_points(postgres)[refused_before:] == [], "trackd sent a stored point again"
    assert daemon.stop() == 0
    from mlflow.entities import Metric

    (stored,) = mlflow_client(uri).get_metric_history(runs["a"].info.run_id, "i")[:1]
    again = Metric(stored.key, stored.value, stored.timestamp, stored.step)
    mlflow_client(uri).log_batch(runs["a"].info.run_id, metrics=[again])
    assert len(refused_points(postgres)) == refused_before + 1, "a duplicate would show"


def test_recovery_looks_up_only_the_last_batch_whatever_the_run_length(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash the fan-out sends everything since its saved cursor again: points of
    writes that returned are skipped unasked, and only the steps of the batch in flight at
    the crash are looked up (never a key's whole history), then every point is there once."""
    from trackd.sinks.mlflow import MlflowSink

    run = RunInfo("c" * 32, "recovery-cost", "long", started=time.time())
    batches = [[Record((0, 1), "run_start", run, {})]]
    for number in range(10):
        steps = range(number * 1000, (number + 1) * 1000)
        rows = [[step, 1.7e9 + step, {"a": float(step), "b": 0.5}] for step in steps]
        batches.append([Record((1, number), "metrics", run, {"rows": rows})])
    looked_up: list[int] = []

    def opened() -> MlflowSink:
        sink = MlflowSink(server.uri)
        sink.open(SinkContext(None, tmp_path / "state"))
        between = sink._history_between

        def counted(run_id: str, key: str, low: int, high: int) -> list[Any]:
            found = between(run_id, key, low, high)
            looked_up.append(len(found))
            return found

        def whole_history(*args: Any) -> None:
            raise AssertionError("a key's whole history was fetched")

        monkeypatch.setattr(sink, "_history_between", counted)
        monkeypatch.setattr(sink._client, "get_metric_history", whole_history)
        return sink

    sink = opened()
    for batch in batches:
        sink.write(batch)
    sink.close()  # the fan-out saved no cursor: everything comes again
    assert looked_up == []
    sink = opened()
    for batch in batches:
        sink.write(batch)
    assert len(looked_up) == 2, "one lookup per key of the last batch"
    assert sum(looked_up) == 2000, "the last batch's points, found there"
    extra = [[10_000, 1.8e9, {"a": 1.0, "b": 0.5}]]
    sink.write([Record((2, 0), "metrics", run, {"rows": extra})])
    assert len(looked_up) == 2, "past the mark nothing is looked up"
    sink.close()
    (found,) = runs_of(server.uri, "recovery-cost").values()
    for key in ("a", "b"):
        history = mlflow_client(server.uri).get_metric_history(found.info.run_id, key)
        assert sorted(metric.step for metric in history) == list(range(10_001)), key


@pytest.mark.parametrize("wrapped", [True, False], ids=["as-encoded", "unwrapped"])
def test_a_metric_batch_goes_out_as_encoded_or_else_mlflows_way(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    """The sink hands its encoded log_batch body to its wrapper of MLflow's `http_request`,
    past `call_endpoint`'s decoding and `requests`' encoding; where something replaced that
    wrapper, the body goes through `call_endpoint` after all, and no point is lost."""
    from mlflow.utils import rest_utils

    from trackd.sinks.mlflow import MlflowSink

    project = f"encoded-body-{wrapped}"  # a run of its own: one already stored is only checked
    run = RunInfo(("e" if wrapped else "f") * 32, project, "r", time.time())
    rows = [[step, 1.7e9 + step, {"a": float(step), "b": -0.5}] for step in range(700)]
    sink = MlflowSink(server.uri)
    sink.open(SinkContext(None, tmp_path / "state"))
    sink.write([Record((0, 1), "run_start", run, {})])
    sent: list[bool] = []  # per log-batch request: its body passed as bytes (`data`)
    send = rest_utils._get_http_response_with_retries

    def recorded(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if url.endswith("/runs/log-batch"):
            sent.append("data" in kwargs)
        return send(method, url, *args, **kwargs)

    monkeypatch.setattr(rest_utils, "_get_http_response_with_retries", recorded)
    if not wrapped:  # MLflow's own function in its place, though it passes for the wrapper
        original = rest_utils.http_request.__wrapped__

        def impostor(*args: Any, **kwargs: Any) -> Any:
            return original(*args, **kwargs)

        impostor.trackd_http = True  # type: ignore[attr-defined]
        monkeypatch.setattr(rest_utils, "http_request", impostor)
    sink.write([Record((1, 0), "metrics", run, {"rows": rows})])
    sink.close()
    # 1,400 points, 2 calls; unwrapped, each is an empty batch, then the batch MLflow's way
    assert sent == ([True] * 2 if wrapped else [False] * 4)
    (found,) = runs_of(server.uri, project).values()
    client = mlflow_client(server.uri)
    a = client.get_metric_history(found.info.run_id, "a")
    b = client.get_metric_history(found.info.run_id, "b")
    assert sorted((metric.step, metric.value) for metric in a) == [(s, s) for s in range(700)]
    assert sorted((metric.step, metric.value) for metric in b) == [(s, -0.5) for s in range(700)]


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_sqlite_and_file_targets(
    store: str, daemon: Daemon, clients: Clients, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlflow:sqlite:///...` (a directory made for it) and `mlflow:file:...` in the daemon."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    uri = f"sqlite:///{tmp_path}/new/mlflow.db" if store == "sqlite" else f"file:{tmp_path}/mlruns"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    daemon.start("--sink", f"mlflow:{uri}")
    finish_client(clients.start("local", "short", 1500, artifact=notes))
    finish_client(clients.start("local", "failed", 200, mode="fail"))
    daemon.flush()
    runs = runs_of(uri, "local")
    assert_complete(uri, runs["short"], 1500)
    assert_complete(uri, runs["failed"], 200, status="FAILED")
    artifacts = mlflow_client(uri).list_artifacts(runs["short"].info.run_id)
    assert [artifact.path for artifact in artifacts] == ["notes.txt"]
    assert daemon.stop() == 0


def test_permanent_errors_go_to_dead_letters_and_the_rest_arrives(
    server: MlflowServer, daemon: Daemon, clients: Clients
) -> None:
    """A param re-logged with a new value and a metric name MLflow refuses: two dead letters
    with their reasons; every other value of the run, of those records too, is stored."""
    spec = f"mlflow:{server.uri}"
    daemon.start("--sink", spec)
    finish_client(clients.start("refused", "conflict", 3000, mode="conflict"))
    daemon.flush()
    run = runs_of(server.uri, "refused")["conflict"]
    assert_complete(server.uri, run, 3000)
    assert run.data.params["epochs"] == "3"
    assert mlflow_client(server.uri).get_metric_history(run.info.run_id, "ok")[0].step == 3000
    path = daemon.data_dir / "deadletter" / f"{SinkSpec.parse(spec).name}.jsonl"
    letters = {entry["type"]: entry for entry in map(json.loads, path.read_text().splitlines())}
    assert sorted(letters) == ["config", "metrics"]
    assert "optimizer/lr" in letters["config"]["reason"]
    assert "bad//key" in letters["metrics"]["reason"]
    status = sink_status(daemon)
    assert status["dead_letters"] == 2
    assert daemon.stop() == 0


def test_sink_limits_truncation_and_redelivery_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, on a file store: log_batch calls within MLflow's limits; a batch written
    again after a "crash" (no checkpoint) adds nothing; a batch past it is written whole."""
    from trackd.sinks.mlflow import MlflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path}/mlruns"
    config = {f"k{index}": index for index in range(250)}
    run = RunInfo("f" * 32, "unit", "limits", started=time.time(), config=config)
    tags = {f"t{index}": "v" * 9000 for index in range(150)}
    rows = [[step, 1.7e9 + step, {"a": float(step), "b": float("nan")}] for step in range(2500)]
    batch = [
        Record((0, 1), "run_start", run, {}),
        Record((0, 2), "tags", run, {"values": tags}),
        Record((0, 3), "metrics", run, {"rows": rows[:1800]}),
        Record((0, 4), "metrics", run, {"rows": rows[1800:]}),
    ]
    calls: list[tuple[int, int, int]] = []

    def opened() -> MlflowSink:
        sink = MlflowSink(uri)
        sink.open(SinkContext(None, tmp_path / "state"))
        log_batch = sink._client.log_batch

        def counted(
            run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **kw: Any
        ) -> Any:
            calls.append((len(metrics), len(params), len(tags)))
            return log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw)

        monkeypatch.setattr(sink._client, "log_batch", counted)
        return sink

    sink = opened()
    sink.write(batch[:3])
    sink.close()  # the fan-out saved no cursor: all of it comes again
    sink = opened()
    sink.write(batch)
    end = Record((0, 5), "run_end", run, {"status": "finished", "error": None, "ended": 2e9})
    sink.write([Record((0, 5), "metrics", run, {"rows": [[9, 1.8e9, {"a": 9.0}]]}), end])
    assert sink._notices.counts, "truncated tag values are noticed"
    sink.close()
    assert all(m <= 1000 and p <= 100 and t <= 100 for m, p, t in calls), calls
    client = mlflow_client(uri)
    (found,) = runs_of(uri, "unit").values()
    history = client.get_metric_history(found.info.run_id, "a")
    assert sorted((m.step, m.timestamp) for m in history) == sorted(
        [(step, int((1.7e9 + step) * 1000)) for step in range(2500)] + [(9, int(1.8e12))]
    )
    assert len(client.get_metric_history(found.info.run_id, "b")) == 2500
    assert len(found.data.params) == 250
    assert found.data.tags["t149"] == "v" * 8000
    assert found.info.status == "FINISHED"


@pytest.mark.parametrize("retry", ["same", "reopened"])
@pytest.mark.parametrize("store", ["server", "file"])
def test_a_failed_call_among_several_in_flight_leaves_every_point_once(
    store: str,
    retry: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two metric calls in flight at once; one fails after MLflow stored its points while the
    other is still running: write() raises only once nothing is in flight, and the retry (by
    the same sink, or by a new one as after a SIGKILL) stores every point exactly once, NaN
    and infinities included, also in the file store, which would store a repeat twice."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    from trackd.sinks.mlflow import MlflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = request.getfixturevalue("server").uri if store == "server" else f"file:{tmp_path}/mlruns"
    project = f"siblings-{store}-{retry}"
    run = RunInfo(f"{store}-{retry}".ljust(32, "0"), project, "r", started=time.time())
    odd = (float("nan"), float("inf"), -float("inf"))  # sent as JSON strings, checked on retry
    rows = [[step, 1.7e9 + step, {"a": float(step), "b": odd[step % 3]}] for step in range(3000)]
    batch = [
        Record((0, 1), "run_start", run, {}),
        Record((0, 2), "metrics", run, {"rows": rows[:1700]}),
        Record((0, 3), "metrics", run, {"rows": rows[1700:]}),
    ]
    sizes: list[int] = []
    in_flight: list[int] = []
    lock = threading.Lock()
    together = threading.Barrier(2, timeout=60)  # broken, failing the test, unless 2 run at once
    failed = threading.Event()

    def opened() -> MlflowSink:
        sink = MlflowSink(uri, in_flight="2", concurrency="fixed")
        sink.open(SinkContext(None, tmp_path / "state"))
        assert (sink._call_endpoint is not None) == (store == "server")
        log_metrics = sink._log_metrics

        def faulty(run_id: str, points: list[Any]) -> None:
            with lock:
                sizes.append(len(points))
                number = len(sizes)
                in_flight.append(number)
            try:
                if number <= 2:
                    together.wait()
                if number == 2:
                    log_metrics(run_id, points)  # stored, but the answer is lost
                    failed.set()
                    raise MlflowException("lost", error_code=codes.TEMPORARILY_UNAVAILABLE)
                if number == 1:
                    failed.wait(60)
                    time.sleep(0.5)  # still in flight after its sibling failed
                log_metrics(run_id, points)
            finally:
                with lock:
                    in_flight.remove(number)

        monkeypatch.setattr(sink, "_log_metrics", faulty)
        return sink

    sink = opened()
    with pytest.raises(SinkError) as caught:
        sink.write(batch)
    assert caught.value.retriable
    assert in_flight == [], "write() raised while a call of its batch was still in flight"
    if retry == "reopened":
        sink.close()
        sink = opened()
    sink.write(batch)
    end = {"status": "finished", "error": None, "ended": 2e9}
    sink.write([Record((0, 4), "run_end", run, end)])
    sink.close()
    assert max(sizes) <= 1000
    client = mlflow_client(uri)
    (found,) = runs_of(uri, project).values()
    for key in ("a", "b"):
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted(metric.step for metric in history) == list(range(3000)), key
    assert found.info.status == "FINISHED"


def test_errors_map_to_retriable_or_permanent_and_fail_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection refused is retriable and returns in seconds, not MLflow's minutes of retries;
    MLflow's validation codes are permanent, 5xx and 429 retriable."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    from trackd.sinks.mlflow import MlflowSink, _errors

    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(variable, "-")  # so that it is restored after the test
        monkeypatch.delenv(variable)  # and the sink's own default applies
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}")
    sink.open(SinkContext(None, tmp_path / "state"))
    run = RunInfo("e" * 32, "nowhere", "r", started=time.time())
    began = time.monotonic()
    with pytest.raises(SinkError) as caught:
        sink.write([Record((0, 1), "run_start", run, {})])
    assert caught.value.retriable
    assert time.monotonic() - began < 10
    sink.close()
    for code, retriable in [
        (codes.INVALID_PARAMETER_VALUE, False),
        (codes.RESOURCE_DOES_NOT_EXIST, False),
        (codes.INTERNAL_ERROR, True),
        (codes.TEMPORARILY_UNAVAILABLE, True),
        (codes.REQUEST_LIMIT_EXCEEDED, True),
    ]:
        error = _errors().error(MlflowException("x", error_code=code))
        assert error is not None
        assert error.retriable is retriable, code
    assert _errors().error(KeyError("a bug")) is None


def test_a_nested_run_before_its_parent_gets_the_parent_tag_when_the_parent_arrives(
    tmp_path: Path,
) -> None:
    """Runs of different sessions arrive in any order: a nested run delivered before its
    parent carries no parent tag until the parent's MLflow run is made, then the parent's
    MLflow run id (never the trackd id, which MLflow cannot resolve); across a reopen too."""
    from trackd.sinks.mlflow import PARENT_TAG, MlflowSink

    uri, now = f"file:{tmp_path}/mlruns", time.time()
    parent = RunInfo("a" * 32, "nested", "train", started=now)
    child = RunInfo("b" * 32, "nested", "fold-0", started=now, tags={PARENT_TAG: parent.id})
    sink = MlflowSink(uri)
    sink.open(SinkContext(None, tmp_path / "state"))
    sink.write([Record((0, 1), "run_start", child, {"started": now})])
    saved = sink.checkpoint()
    sink.close()
    client = mlflow_client(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("nested").experiment_id])
    assert PARENT_TAG not in found.data.tags
    reopened = MlflowSink(uri)
    reopened.open(SinkContext(saved, tmp_path / "state"))
    reopened.write([Record((0, 2), "run_start", parent, {"started": now})])
    reopened.close()
    runs = {r.info.run_name: r for r in client.search_runs([found.info.experiment_id])}
    assert runs["fold-0"].data.tags[PARENT_TAG] == runs["train"].info.run_id
