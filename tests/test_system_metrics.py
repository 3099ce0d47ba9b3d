"""System metrics sampled by the daemon: real psutil readings at a short interval, written
as `system` messages to the WAL and read back from the jsonl sink, `trackd status` and the
Prometheus endpoint; per-run process metrics for two runs on one node; no acked sample
lost to a SIGKILL; the setting's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, Daemon, cli, free_port, wait_for
from trackd.daemon.settings import SettingsError, load

SAMPLING = {"TRACKD_SYSTEM_INTERVAL": "0.5"}
NODE_KEYS = {"cpu", "cpu.count", "memory.used", "memory.available", "memory.percent"}
NODE_KEYS |= {"swap.used", "disk.used", "disk.free", "disk.percent", "network.sent"}
PROCESS_KEYS = {"proc.rss", "proc.threads", "proc.count", "proc.memory.percent"}


def start_load(env: dict[str, str], name: str, stop: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(HELPERS / "load_client.py"),
            "--name",
            name,
            "--stop",
            str(stop),
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.stderr.read() if process.stderr else "no output"
    result: dict[str, Any] = json.loads(line)
    return result


def samples(data: Path, name: str, project: str = "sys") -> list[dict[str, Any]]:
    """The rows of a run's system.jsonl under the default jsonl sink."""
    found = list((data / "runs" / project).glob(f"{name}-*/system.jsonl"))
    if not found:
        return []
    return [json.loads(line) for line in found[0].read_text().splitlines()]


def with_cpu(data: Path, name: str, count: int) -> list[dict[str, Any]]:
    rows = [row for row in samples(data, name) if "proc.cpu" in row]
    return rows if len(rows) >= count else []


def test_two_runs_on_one_node_each_get_their_own_process_metrics(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """A busy 200 MiB run and an idle small one: node values in both, process values apart."""
    daemon.start(extra_env=SAMPLING)
    stop = dirs["root"] / "stop"
    busy = start_load(env, "busy", stop, "--busy", "--rss-mb", "200")
    idle = start_load(env, "idle", stop)
    try:
        pids = {"busy": first_line(busy)["pid"], "idle": first_line(idle)["pid"]}
        daemon.flush()
        wait_for(lambda: with_cpu(dirs["data"], "busy", 4) and with_cpu(dirs["data"], "idle", 4))
    finally:
        stop.touch()
        busy.communicate(timeout=60)
        idle.communicate(timeout=60)
    assert pids["busy"] != pids["idle"]
    node = os.uname().nodename
    rows = {name: with_cpu(dirs["data"], name, 4) for name in ("busy", "idle")}
    for name, taken in rows.items():
        for row in taken:
            assert NODE_KEYS | PROCESS_KEYS | {"ts", "node", "proc.cpu"} <= set(row), name
            assert row["node"] == node
            assert row["proc.count"] == 1
            assert not any(key.startswith("gpu.") for key in row)  # no NVIDIA driver here
        assert [row["ts"] for row in taken] == sorted({row["ts"] for row in taken})
    busy_rss = min(row["proc.rss"] for row in rows["busy"])
    idle_rss = max(row["proc.rss"] for row in rows["idle"])
    assert busy_rss > idle_rss + 150 * 1024**2
    busy_cpu = max(row["proc.cpu"] for row in rows["busy"])
    idle_cpu = max(row["proc.cpu"] for row in rows["idle"])
    assert busy_cpu > 20, busy_cpu
    assert busy_cpu > idle_cpu + 10, (busy_cpu, idle_cpu)


def test_status_and_prometheus_show_the_latest_node_sample(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """`trackd status` (human and --json) and /metrics carry the latest node sample; the
    sampler says once that there is no GPU, and goes on sampling."""
    port = free_port()
    daemon.start("--metrics-addr", f"127.0.0.1:{port}", extra_env=SAMPLING)
    system = wait_for(lambda: (s := daemon.status()["system"])["latest"] and s)
    assert system["interval"] == 0.5
    assert system["node"] == os.uname().nodename
    assert "gpus: none (NVML: " in system["found"]
    assert set(system["latest"]["values"]) >= NODE_KEYS
    shown = cli(env, "status")
    assert shown.returncode == 0, shown.stderr
    assert "gpus: none (NVML: " in shown.stdout
    assert "memory.percent" in shown.stdout
    as_json = json.loads(cli(env, "status", "--json").stdout)
    assert set(as_json["system"]["latest"]["values"]) >= NODE_KEYS
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    node = os.uname().nodename
    assert f'trackd_system_memory_percent{{node="{node}"}}' in text
    assert f'trackd_system_cpu{{node="{node}"}}' in text
    assert daemon.log().count("gpus: none") == 1


def test_sigkill_and_restart_lose_no_acked_sample(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Every sample acked before a SIGKILL is in system.jsonl after the restart, once."""
    daemon.start(extra_env=SAMPLING)
    stop = dirs["root"] / "stop"
    client = start_load(env, "kept", stop)
    try:
        first_line(client)
        system = wait_for(lambda: (s := daemon.status()["system"])["samples"] >= 4 and s)
        daemon.kill()
        daemon.start(extra_env=SAMPLING)
        daemon.flush()
    finally:
        stop.touch()
        client.communicate(timeout=60)
    daemon.flush()
    rows = samples(dirs["data"], "kept")
    before = [row for row in rows if row["ts"] <= system["acked_ts"]]
    assert len(before) == system["samples"]
    assert len({row["ts"] for row in rows}) == len(rows)  # nothing twice


def test_a_restarted_daemon_counts_a_runs_disk_writes_from_the_same_first_sample(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Sinks whose peers count disk and network bytes from the run's start (TensorBoard's
    `system/...` here, as W&B and MLflow) get them from the run's first sample, and a daemon
    killed and started again mid-run goes on from that same sample, not from its restart."""
    from test_sink_tensorboard import load

    tensorboard = dirs["root"] / "tb"
    sinks = ("--sink", f"jsonl:{dirs['data'] / 'runs'}", "--sink", f"tensorboard:{tensorboard}")
    daemon.start(*sinks, extra_env=SAMPLING)
    stop = dirs["root"] / "stop"
    client = start_load(env, "restarted", stop)
    try:
        first_line(client)
        wait_for(lambda: len(samples(dirs["data"], "restarted")) >= 3)
        daemon.kill()
        daemon.start(*sinks, extra_env=SAMPLING)
        wait_for(lambda: len(samples(dirs["data"], "restarted")) >= 7)
    finally:
        stop.touch()
        client.communicate(timeout=60)
    daemon.flush()
    rows = samples(dirs["data"], "restarted")
    written = [row["disk.write_bytes"] - rows[0]["disk.write_bytes"] for row in rows]
    assert written[-1] > 0, "the daemon's WAL fsyncs should have moved the counter"
    (run_dir,) = (tensorboard / "sys").glob("restarted-*")
    shown = [point.value for point in load(run_dir).Scalars("system/disk.write_bytes")]
    assert shown == pytest.approx(written, abs=64)  # float32 scalars


def test_interval_zero_turns_sampling_off(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """`system_interval = 0` in the config file: no sampler, no system.jsonl."""
    config = dirs["root"] / "trackd.toml"
    config.write_text("system_interval = 0\n")
    daemon.start("--config", str(config))
    stop = dirs["root"] / "stop"
    stop.touch()
    client = start_load(env, "quiet", stop)
    client.communicate(timeout=60)
    daemon.flush()
    assert daemon.status()["system"] == {"interval": 0, "found": "off"}
    assert list((dirs["data"] / "runs" / "sys").glob("quiet-*/metrics.jsonl"))
    assert not samples(dirs["data"], "quiet")


@pytest.mark.parametrize("value", ["0.2", "-1", "often"])
def test_interval_below_half_a_second_is_refused_naming_the_key(
    value: str, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKD_SYSTEM_INTERVAL", value)
    with pytest.raises(SettingsError, match="system_interval"):
        load()


def test_interval_from_the_config_file_and_the_environment(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load().system_interval == 10.0
    config = dirs["root"] / "trackd.toml"
    config.write_text("system_interval = 2.5\n")
    assert load(str(config)).system_interval == 2.5
    monkeypatch.setenv("TRACKD_SYSTEM_INTERVAL", "0.5")
    assert load(str(config)).system_interval == 0.5


LAUNCHER = """
import os, subprocess, sys
helper, stop, port = sys.argv[1:4]
job = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
ranks = [
    subprocess.Popen(
        [sys.executable, helper, "--name", "ddp", "--stop", stop, "--rss-mb", str(100 * rank)],
        env={**os.environ, **job, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        stdout=subprocess.DEVNULL,
    )
    for rank in (0, 1)
]
sys.exit(max(rank.wait() for rank in ranks))
"""


def test_every_rank_of_a_job_on_the_node_counts_in_its_runs_process_metrics(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """Two ranks as torchrun starts them, with the default ranks="zero": only rank 0 talks
    to the daemon, and rank 1 (holding 100 MiB) is measured with it."""
    daemon.start(extra_env=SAMPLING)
    stop = dirs["root"] / "stop"
    port = str(free_port())  # the job's own: no other job on the machine shares its ranks
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(HELPERS / "load_client.py"), str(stop), port],
        env=env,
    )
    try:
        rows = wait_for(lambda: [r for r in samples(dirs["data"], "ddp") if r["proc.count"] == 2])
    finally:
        stop.touch()
        assert launcher.wait(60) == 0
    assert rows[-1]["proc.rss"] > 100 * 1024**2
