"""The SDKs' private names the sinks use, each sink's listed in one place (comet `_Sdk`, aim
`_remote_repo`, mlflow `_rest_call_endpoint`, wandb's "private names" section, trackio's
`open()`): each test fails by name when the SDK changes them, before a sink fails in a
daemon; and where a public call can do the job, the fallback to it is tested too."""

from __future__ import annotations

import importlib.util
import inspect
import os
import time
from pathlib import Path
from typing import Any

import comet_ml
import pytest
from comet_ml.streamer.offline import OfflineStreamer

from helpers.comet_archive import comet_env
from mlflow_server import MlflowServer
from test_sink_mlflow import mlflow_client, server, server_process  # noqa: F401 (fixtures)
from test_sink_wandb import wandb_env
from trackd.sinks.base import Record, RunInfo, SinkContext
from trackd.sinks.comet import QUIET


def test_comet_experiment_sets_up_its_streamer_in_tmpdir_and_counts_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_setup_streamer` reads `tmpdir` (the session directory the sink moves), and the
    streamer's `_counter` counts every message queued, each one line of messages.json."""
    for name, value in comet_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    source = inspect.getsource(comet_ml.OfflineExperiment._setup_streamer)
    assert "tmp_dir=self.tmpdir" in source
    experiment = comet_ml.OfflineExperiment(offline_directory=str(tmp_path), **QUIET)
    try:
        streamer = experiment.streamer
        assert isinstance(streamer, OfflineStreamer)
        before = streamer._counter
        experiment.log_metrics({"a": 1.0, "b": 2.0}, step=3)
        assert streamer._counter > before
    finally:
        experiment.end()


def test_comet_keeps_one_global_experiment_through_config() -> None:
    """A new experiment ends the global one; the sink clears it through these two."""
    assert callable(comet_ml.config.get_global_experiment)
    assert callable(comet_ml.config.set_global_experiment)
    source = inspect.getsource(comet_ml.experiment.CometExperiment.__init__)
    assert "get_global_experiment()" in source


def aim_source(relative: str) -> str:
    """A file of Aim's as text, found without importing Aim (aim.sdk warns on import, and
    warnings are errors here)."""
    spec = importlib.util.find_spec("aim")
    assert spec is not None
    assert spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    return (root / relative).read_text(encoding="utf-8")


def test_aim_client_headers_and_the_name_the_repo_finds_it_by() -> None:
    """Aim's Client sets `request_headers` in its constructor and has `refresh_ws` and a
    `ws` property sending them; the Repo constructor looks up `Client` in aim.sdk.repo."""
    client = aim_source("ext/transport/client.py")
    assert "self.request_headers = {}" in client
    assert "def refresh_ws(self):" in client
    assert "additional_headers=self.request_headers" in client
    repo = aim_source("sdk/repo.py")
    assert "from aim.ext.transport.client import Client" in repo
    assert "self._client = Client(remote_path)" in repo


def parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_mlflow_rest_store_call_endpoint_and_the_client_store_it_is_found_through() -> None:
    """`MlflowClient._tracking_client.store` is a `RestStore` for an HTTP URI, and
    `RestStore._call_endpoint(api, json_body)` sends one request."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking import MlflowClient

    from trackd.sinks.mlflow import _rest_call_endpoint, _tracking_store

    store = MlflowClient(tracking_uri="http://127.0.0.1:9")._tracking_client.store
    assert isinstance(store, RestStore)
    assert {"api", "json_body"} <= parameters(RestStore._call_endpoint)
    assert _tracking_store(MlflowClient(tracking_uri="http://127.0.0.1:9")) is not None
    assert _rest_call_endpoint(store, RestStore)
    assert _rest_call_endpoint(object(), RestStore) is None  # the fallback's trigger
    # the crash check's step-range lookup: a REST endpoint, and every store's own method
    from mlflow.protos.service_pb2 import GetMetricHistoryBulkInterval

    assert {"run_ids", "metric_key", "start_step", "end_step", "max_results"} <= set(
        GetMetricHistoryBulkInterval.DESCRIPTOR.fields_by_name
    )
    assert {"run_ids", "metric_key", "max_results", "start_step", "end_step"} <= parameters(
        store.get_metric_history_bulk_interval
    )


def test_mlflow_rest_calls_look_up_rest_utils_http_request_on_every_call() -> None:
    """`rest_utils.call_endpoint` calls the module's `http_request` by name, so the
    sink's wrapper (`_use_http_settings`) is the one called, with the sink's settings."""
    from mlflow.utils import rest_utils

    assert "http_request" in rest_utils.call_endpoint.__code__.co_names
    assert {"max_retries", "timeout"} <= parameters(rest_utils.http_request)


def test_mlflow_without_call_endpoint_logs_every_point_once_through_log_batch(
    tmp_path: Path,
    server: MlflowServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An MLflow without the private call: the public `log_batch` stores the same points."""
    from trackd.sinks import mlflow as mlflow_sink

    monkeypatch.setattr(mlflow_sink, "_rest_call_endpoint", lambda client, store: None)
    sink = mlflow_sink.MlflowSink(server.uri)
    sink.open(SinkContext(None, tmp_path / "state"))
    run, now = RunInfo("f" * 32, "fallback", "public", started=time.time()), time.time()
    rows = [[step, now + step, {"loss": 1.0 / (step + 1), "acc": step / 10}] for step in range(7)]
    try:
        assert sink._call_endpoint is None
        sink.write(
            [
                Record((0, 1), "run_start", run, {"started": now}),
                Record((0, 2), "metrics", run, {"rows": rows}),
                Record((0, 3), "run_end", run, {"status": "finished", "ended": now + 9}),
            ]
        )
    finally:
        sink.close()
    client = mlflow_client(server.uri)
    experiment = client.get_experiment_by_name("fallback")
    (found,) = client.search_runs([experiment.experiment_id])
    for key in ("loss", "acc"):
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted(point.step for point in history) == list(range(7)), key


def test_wandb_add_local_file_takes_the_digest_the_public_add_file_computes(
    tmp_path: Path,
) -> None:
    """`Artifact._add_local_file(name, path, digest, policy)` exists, and the sink's file
    made through it is the entry the public `add_file` (the fallback) makes."""
    import wandb

    from trackd.sinks.wandb import _add_file

    assert {"name", "path", "digest", "policy"} <= parameters(wandb.Artifact._add_local_file)
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 5))

    class PublicOnly:
        """An Artifact as a wandb without `_add_local_file` would show it to the sink."""

        def __init__(self, artifact: Any) -> None:
            self.add_file = artifact.add_file

    entries = []
    for wrap in (lambda artifact: artifact, PublicOnly):
        artifact = wandb.Artifact("a", type="unspecified")
        _add_file(wrap(artifact), "dir/blob.bin", source)
        entries.append(artifact.manifest.entries["dir/blob.bin"])
    private, public = entries
    assert (private.path, private.digest, private.size) == (public.path, public.digest, public.size)


def test_wandb_run_interface_and_its_transaction_log_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Run._interface` with `_publish` and `publish_environment`; `settings.sync_file`,
    the transaction log, starts with the header the sink skips and holds the steps logged
    in the LevelDB block format the sink reads back."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    from trackd.sinks.wandb import FILE_HEADER, _identity, _last_step_in

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run = wandb.init(project="contract", settings=wandb.Settings(console="off", silent=True))
    try:
        interface = run._interface
        assert callable(interface._publish)
        assert callable(interface.publish_environment)
        log = Path(run.settings.sync_file)
        assert log.name == f"run-{run.id}.wandb"
        for step in range(5):
            run.log({"x": float(step)}, step=step)
    finally:
        run.finish()
        # wandb.init started a wandb-core service for this process and named it in
        # os.environ: later tests' daemons would inherit WANDB_SERVICE and share it
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
    header = log.read_bytes()[:FILE_HEADER]
    assert header == b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00"
    decode: Any = wandb_internal_pb2.Record.FromString  # type: ignore[attr-defined]
    assert _last_step_in(log, lambda payload: _identity(decode(payload))) == 4


def test_trackio_storage_names_and_the_keywords_the_sink_passes() -> None:
    """Trackio's internal storage calls, media path and constants, with every keyword the
    sink passes (a renamed keyword would fail only when the sink calls it)."""
    from trackio import media, utils
    from trackio.sqlite_storage import SQLiteStorage

    assert {"project", "run", "run_id", "metrics_list", "steps", "timestamps", "log_ids"} | {
        "config"
    } <= parameters(SQLiteStorage.bulk_log)
    assert {"project", "run", "run_id", "metrics_list", "timestamps", "log_ids"} <= parameters(
        SQLiteStorage.bulk_log_system
    )
    assert {"project", "run", "run_id", "titles", "texts", "levels", "steps"} | {
        "timestamps",
        "alert_ids",
    } <= parameters(SQLiteStorage.bulk_alert)
    assert {"project", "run_id"} <= parameters(SQLiteStorage.get_run_config)
    assert callable(SQLiteStorage.validate_project_name)
    assert {"project", "run", "step"} <= parameters(media.get_project_media_path)
    assert isinstance(utils.MEDIA_DIR, str | Path)
    assert {"step", "time"} <= set(utils.RESERVED_KEYS)
