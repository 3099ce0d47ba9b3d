"""The SDKs' private names the Comet and Aim sinks use (listed in `_Sdk` and `_remote_repo`):
each test fails by name when the SDK changes them, before a sink fails in a daemon."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import comet_ml
import pytest
from comet_ml.streamer.offline import OfflineStreamer

from helpers.comet_archive import comet_env
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
