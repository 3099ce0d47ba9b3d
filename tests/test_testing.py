"""`trackd.testing.LocalDaemon`: a user's test asserts on what a run delivered, no backend."""

from __future__ import annotations

from pathlib import Path

import pytest

import trackd
from trackd.testing import LocalDaemon, memory_sink


def test_a_run_logged_in_process_is_read_back_from_the_memory_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRACKD_ENDPOINT", raising=False)
    with LocalDaemon(tmp_path) as daemon:
        with trackd.init(project="p", name="unit", config={"lr": 0.1}) as run:
            for step in range(100):
                run.log({"loss": 1.0 / (step + 1)})
        daemon.flush()
        records = daemon.sink.records()
        assert records[0].type == "run_start"
        assert records[0].run.project == "p"
        assert records[0].run.config == {"lr": 0.1}
        assert [row[0] for row in daemon.sink.rows("unit")] == list(range(100))
        assert records[-1].type == "run_end"
        assert records[-1].body["status"] == "finished"
    assert daemon.exit_code == 0


def test_an_unknown_memory_sink_is_named() -> None:
    with pytest.raises(KeyError, match="nowhere"):
        memory_sink("nowhere")
