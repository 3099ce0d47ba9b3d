"""Each MLflow sink's HTTP retries and timeout are its own (issue 12 §4).

Before, `open()` wrote them into the process environment, where MLflow reads
them on every request: the last sink opened set them for every other, and a sink
without the option inherited another's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trackd.sinks.base import Record, RunInfo, SinkContext, SinkError
from trackd.sinks.mlflow import MlflowSink


@pytest.fixture
def unanswering_server() -> Iterator[str]:
    """A loopback port whose connections are accepted by the kernel and never answered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_two_mlflow_sinks_keep_their_own_http_timeout(
    tmp_path: Path, unanswering_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(variable, raising=False)
    quick = MlflowSink(unanswering_server, http_timeout="1")
    patient = MlflowSink(unanswering_server, http_timeout="600")
    quick.open(SinkContext(None, tmp_path / "quick"))
    patient.open(SinkContext(None, tmp_path / "patient"))  # opened last: it used to win
    try:
        assert not [name for name in os.environ if name.startswith("MLFLOW_HTTP_REQUEST")]
        start = {"project": "p", "name": "n", "started": time.time()}
        record = Record((1, 1), "run_start", RunInfo(id="r1", project="p", name="n"), start)
        began = time.monotonic()
        with pytest.raises(SinkError) as raised:
            quick.write([record])
        assert raised.value.retriable
        # its own 1 s (no retries), far from the other sink's 600 s
        assert time.monotonic() - began < 120
        # and only inside the sink's calls: this thread's own MLflow requests keep their defaults
        from mlflow.utils import rest_utils

        assert getattr(rest_utils.http_request, "trackd_http", False)
        from trackd.sinks import mlflow as mlflow_sink

        assert getattr(mlflow_sink._REQUESTS, "settings", {}) == {}
    finally:
        quick.close()
        patient.close()
