"""log() takes torch tensors: CPU ones read at once, CUDA ones resolved off the caller's thread."""

from __future__ import annotations

import pytest
import torch

import trackd
from conftest import Daemon, jsonl_runs


def test_cpu_tensors_and_zero_dim_values_arrive_as_numbers(daemon: Daemon) -> None:
    """0-d CPU tensors of several dtypes arrive as plain numbers; a 3-element one is refused."""
    daemon.start()
    run = trackd.init(project="t", name="cpu")
    run.log({"f32": torch.tensor(0.5), "i64": torch.tensor(7), "b": torch.tensor(True)})
    run.log({"nested": {"half": torch.tensor(1.5, dtype=torch.float16)}})
    with pytest.raises(ValueError, match="'bad' must be a single number"):
        run.log({"bad": torch.tensor([1.0, 2.0, 3.0])})
    run.finish()
    daemon.flush()
    rows = next(iter(jsonl_runs(daemon.data_dir / "runs").values()))
    assert {k: rows[0][k] for k in ("f32", "i64", "b")} == {"f32": 0.5, "i64": 7, "b": True}
    assert rows[1]["nested/half"] == 1.5
    assert len(rows) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch reports no CUDA device")
def test_cuda_tensors_are_resolved_by_the_delivery_thread(daemon: Daemon) -> None:
    """A CUDA scalar is logged without a sync in log() and arrives with its value."""
    daemon.start()
    run = trackd.init(project="t", name="cuda")
    for step in range(100):
        run.log({"loss": torch.tensor(float(step), device="cuda") * 2})
    run.finish()
    daemon.flush()
    rows = next(iter(jsonl_runs(daemon.data_dir / "runs").values()))
    assert [row["loss"] for row in rows] == [2.0 * step for step in range(100)]
