"""Samples of a run that spans nodes: each node's under its own name, never mixed under one
key. Rank 0's node keeps the backend's plain names."""

from __future__ import annotations

from pathlib import Path

from test_sink_tensorboard import load
from trackd.sinks.base import Record, RunInfo, SinkContext, SinkSpec
from trackd.sinks.system_samples import system_node

RANK0 = RunInfo(id="r" * 32, project="p", name="multi", host="node-a", rank=0, started=100.0)


def sample(node: str, ts: float, cpu: float, position: int) -> Record:
    body = {"ts": ts, "node": node, "values": {"cpu": cpu, "gpu.0.util": cpu / 2}}
    return Record((1, position), "system", RANK0, body)


def test_only_rank_zeros_node_takes_the_plain_names() -> None:
    assert system_node(RANK0, "node-a") is None
    assert system_node(RANK0, "node-b") == "node-b"
    # node B's daemon knows the run from its own first rank there (rank 8, host node-b)
    on_b = RunInfo(id="r" * 32, project="p", name="multi", host="node-b", rank=8)
    assert system_node(on_b, "node-b") == "node-b"
    assert system_node(RunInfo(id="x", project="p", name="single"), "any-host") is None


def test_tensorboard_keeps_two_nodes_samples_apart(tmp_path: Path) -> None:
    sink = SinkSpec.parse(f"tensorboard:{tmp_path / 'tb'}").build()
    sink.open(SinkContext(None, tmp_path / "state"))
    sink.write(
        [
            sample("node-a", 101.0, 10.0, 1),
            sample("node-b", 101.5, 90.0, 2),
            sample("node-a", 102.0, 20.0, 3),
        ]
    )
    sink.checkpoint()
    sink.close()
    (run_dir,) = (tmp_path / "tb" / "p").glob("multi-*")
    events = load(run_dir)
    assert [point.value for point in events.Scalars("system/cpu")] == [10.0, 20.0]
    assert [point.value for point in events.Scalars("system/node-b/cpu")] == [90.0]
    assert [point.value for point in events.Scalars("system/node-b/gpu.0.util")] == [45.0]
