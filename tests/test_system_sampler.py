"""The sampler's GPU path, with the stand-in NVML of tests/helpers/fake_nvml (fixed readings;
this machine has no NVIDIA GPU), and with no driver at all."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import HELPERS, wait_for
from trackd.daemon.ledger import Ledger
from trackd.daemon.sampler import NodeSampler
from trackd.daemon.system import SystemMetrics, local_pids, node_name
from trackd.protocol import decode, encode, validate

GIB = 1024**3


@pytest.fixture
def stand_in_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """`import pynvml` finds the stand-in; returns the file naming processes' GPU memory."""
    monkeypatch.syspath_prepend(str(HELPERS / "fake_nvml"))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    stand_in = importlib.import_module("pynvml")
    del sys.modules["pynvml"]  # set again below, so that the test's end takes it out
    monkeypatch.setitem(sys.modules, "pynvml", stand_in)
    held = tmp_path / "held.json"
    monkeypatch.setenv("FAKE_NVML_PROCESSES", str(held))
    return held


@pytest.fixture
def processes() -> Iterator[list[int]]:
    """Two live processes, standing for two runs' training processes (not this one: its
    children are part of it)."""
    started = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in "ab"
    ]
    yield [process.pid for process in started]
    for process in started:
        process.kill()
        process.wait(10)


def test_stand_in_gpus_map_to_trackd_names_and_a_refused_field_is_absent(
    stand_in_nvml: Path, tmp_path: Path
) -> None:
    sampler = NodeSampler(tmp_path)
    sampler.open()
    node, _ = sampler.sample({})
    sampler.close()
    assert "gpus: 2 (Stand-in GPU 0, Stand-in GPU 1)" in sampler.found
    gpus = {key: value for key, value in node.items() if key.startswith("gpu.")}
    assert gpus == {
        "gpu.0.util": 37.0,
        "gpu.0.memory.used": 4.0 * GIB,
        "gpu.0.memory.total": 16.0 * GIB,
        "gpu.0.memory.percent": 25.0,
        "gpu.0.temp": 61.0,
        "gpu.0.power": 150.0,
        "gpu.0.power.percent": 50.0,
        "gpu.0.clock.sm": 1410.0,
        "gpu.1.util": 5.0,
        "gpu.1.memory.used": 1.0 * GIB,
        "gpu.1.memory.total": 16.0 * GIB,
        "gpu.1.memory.percent": 6.25,
        "gpu.1.clock.sm": 210.0,  # no temp (no permission), no power (not supported)
    }


def test_gpu_memory_is_attributed_to_the_run_whose_processes_hold_it(
    stand_in_nvml: Path, tmp_path: Path, processes: list[int]
) -> None:
    mine, other_process = processes
    stand_in_nvml.write_text(
        json.dumps({"0": {str(mine): 2 * GIB, str(other_process): GIB}, "1": {mine: 3 * GIB}})
    )
    sampler = NodeSampler(tmp_path)
    sampler.open()
    _, runs = sampler.sample({"a": [mine], "b": [other_process], "gone": [2**22 + 7]})
    sampler.close()
    assert set(runs) == {"a", "b"}  # a run with no live process gets no sample
    gpu_a = {key: value for key, value in runs["a"].items() if key.startswith("gpu.")}
    gpu_b = {key: value for key, value in runs["b"].items() if key.startswith("gpu.")}
    assert gpu_a == {"gpu.0.proc.memory": 2.0 * GIB, "gpu.1.proc.memory": 3.0 * GIB}
    assert gpu_b == {"gpu.0.proc.memory": 1.0 * GIB}


def test_without_a_driver_the_sampler_says_no_gpu_once_and_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, processes: list[int]
) -> None:
    """nvidia-ml-py is installed here, the driver is not: sampling goes on without GPUs."""
    caplog.set_level(logging.INFO, logger="trackd.system")
    sampler = NodeSampler(tmp_path)
    sampler.open()
    results = [sampler.sample({"run": processes[:1]}) for _ in range(3)]
    sampler.close()
    assert "gpus: none (NVML: driver not found)" in sampler.found
    assert [r.getMessage() for r in caplog.records].count(f"system sampler: {sampler.found}") == 1
    for node, runs in results:
        assert "cpu" in node
        assert "memory.percent" in node
        assert not any(key.startswith("gpu.") for key in node)
        assert runs["run"]["proc.count"] == 1
    assert "proc.cpu" in results[-1][1]["run"]  # measured from the second sample on


def test_a_process_that_exited_but_is_not_reaped_yet_is_gone(
    tmp_path: Path, processes: list[int]
) -> None:
    """A zombie still has its /proc entry: it must not count as a live process of its run."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: psutil.Process(exited.pid).status() == psutil.STATUS_ZOMBIE)
        sampler = NodeSampler(tmp_path)
        _, runs = sampler.sample({"exited": [exited.pid], "live": processes[:1]})
        assert set(runs) == {"live"}
        assert runs["live"]["proc.count"] == 1
    finally:
        exited.wait(10)


def test_nvml_not_installed_is_said_and_not_raised(tmp_path: Path) -> None:
    sampler = NodeSampler(tmp_path, nvml_module="trackd_no_such_nvml")
    sampler.open()
    assert "gpus: none (NVML: nvidia-ml-py is not installed)" in sampler.found
    assert "cpu" in sampler.sample({})[0]


class FailingOnce(NodeSampler):
    """The real sampler, with a fault injected into its first reading."""

    failed = False

    def sample(
        self, runs: Mapping[str, list[int]]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected")
        return super().sample(runs)


def test_a_failed_sample_is_counted_and_sampling_goes_on(tmp_path: Path) -> None:
    """Messages go to ingest as valid `system` messages (ingest takes them as built, so the
    test checks them as a client's frame), with consecutive sequence numbers."""
    frames: list[dict[str, Any]] = []
    enough = asyncio.Event()

    def receive(message: dict[str, Any], _reply: object) -> bool:
        frames.append(decode(encode(message)))
        if len(frames) >= 3:
            enough.set()
        return True

    run = {"status": "running", "host": node_name(), "pid": os.getpid()}
    ended = {"status": "finished", "host": node_name(), "pid": os.getpid()}
    metrics = SystemMetrics(0.05, FailingOnce(tmp_path), lambda: {"r": run, "e": ended}, receive)

    async def sample_a_while() -> None:
        task = asyncio.create_task(metrics.run())
        await asyncio.wait_for(enough.wait(), 30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(sample_a_while())
    assert metrics.status()["errors"] == 1
    assert [frame["q"] for frame in frames] == list(range(1, len(frames) + 1))
    assert {frame["r"] for frame in frames} == {"r"}  # an ended run is not sampled
    assert {frame["t"] for frame in frames} == {"system"}
    assert all(frame["b"]["values"]["proc.count"] >= 1 for frame in frames)


def test_ranks_that_joined_the_run_are_measured_on_their_own_node() -> None:
    """A joined rank's host and pid stay in its `joined` record and the run table."""
    joined_body = {"values": {}, "host": "node-a", "pid": 202}
    ledger = Ledger()
    start = {"project": "p", "name": "n", "host": "node-a", "pid": 101, "started": 1.0}
    ledger.apply({"v": 1, "s": "a", "q": 1, "t": "run_start", "r": "run", "b": start})
    for session, body in (("b", joined_body), ("c", {**joined_body, "host": "node-b"})):
        message = {"v": 1, "s": session, "q": 1, "t": "joined", "r": "run", "b": body}
        validate(message)
        ledger.apply(message)
    assert local_pids(ledger.runs["run"], "node-a") == [101, 202]
    assert local_pids(ledger.runs["run"], "node-b") == [202]


def test_a_runs_children_and_grandchildren_count_and_new_ones_are_found_at_the_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read of the process table serves every run: each run gets its own descendants
    (a DataLoader worker and its child), never another run's, and a child started after
    the tree was read is counted once it is read again."""
    family = (
        "import subprocess, sys\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
        "spawner = 'import subprocess, sys; subprocess.Popen(sys.argv[1:]); sys.stdin.read()'\n"
        "subprocess.Popen([sys.executable, '-c', spawner, *sleeper])\n"
        "sys.stdin.readline()\n"
        "subprocess.Popen(sleeper)\n"
        "print('spawned', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", family], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    }
    sampler = NodeSampler(tmp_path)
    pids = {name: [process.pid] for name, process in runs.items()}

    def counts() -> dict[str, float]:
        return {name: values["proc.count"] for name, values in sampler.sample(pids)[1].items()}

    try:
        monkeypatch.setattr("trackd.daemon.sampler.CHILDREN_RESCAN_SECONDS", 0.0)
        wait_for(lambda: counts() == {"a": 3, "b": 3})  # itself, its child, its grandchild
        monkeypatch.setattr("trackd.daemon.sampler.CHILDREN_RESCAN_SECONDS", 3600.0)
        runs["a"].stdin.write("\n")  # type: ignore[union-attr]
        runs["a"].stdin.flush()  # type: ignore[union-attr]
        assert runs["a"].stdout.readline() == "spawned\n"  # type: ignore[union-attr]
        assert counts() == {"a": 3, "b": 3}  # the tree is not read again before it is due
        monkeypatch.setattr("trackd.daemon.sampler.CHILDREN_RESCAN_SECONDS", 0.0)
        assert counts() == {"a": 4, "b": 3}
    finally:
        for process in runs.values():
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.communicate(timeout=10)  # also closes its pipes
