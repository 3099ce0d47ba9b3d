"""Aim sink, through a real daemon and real clients, into a local repo and through a real
`aim server` on loopback; read back with the aim SDK in a process of its own (Aim keeps
repos, cleanup threads and warnings process-wide)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, finish_client, meta_client, run_client, wait_for
from helpers import until_client
from trackd.sinks.base import SinkSpec

ROWS = 3000
AIM = str(Path(sys.executable).with_name("aim"))
READER = """
import hashlib, json, sys, tempfile
from aim import Repo, Run
from aim.sdk.index_manager import RepoIndexManager

repo = Repo(sys.argv[1])
hashes = list(repo.list_all_runs())
indexer = RepoIndexManager.get_index_manager(repo)
for run_hash in hashes:
    indexer.index(run_hash)  # what `aim up` does in the background, so reads see every run
repo = Repo(sys.argv[1])
found = []
for run_hash in hashes:
    run = Run(run_hash, repo=repo, read_only=True)
    metrics = {}
    for metric in run.metrics():
        steps, (values, times) = metric.data.view(["val", "time"]).numpy()
        context = metric.context.to_dict()
        name = f"{metric.name} {json.dumps(context, sort_keys=True)}" if context else metric.name
        metrics[name] = {
            "steps": steps.tolist(), "values": values.tolist(), "times": times.tolist()
        }
    artifacts = {}
    for name, artifact in run.artifacts.items():
        with open(artifact.download(tempfile.mkdtemp()), "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        artifacts[name] = {"uri": artifact.uri, "sha256": digest}
    logs = run.get_terminal_logs()
    lines = [line.data for line in logs.data.view("val").items_list()[1][0]] if logs else []
    found.append({
        "hash": run.hash, "name": run.name, "experiment": run.experiment,
        "active": run.active, "tags": sorted(run.tags), "params": run[...],
        "metrics": metrics, "artifacts": artifacts, "terminal_logs": lines,
    })
print(json.dumps(found))
"""


def read_aim(env: dict[str, str], repo: Path) -> dict[str, dict[str, Any]]:
    """{run name: {"hash", "experiment", "active", "tags", "params", "metrics", "artifacts",
    "terminal_logs"}}; a metric with a context is keyed `NAME {CONTEXT JSON}`."""
    out = subprocess.run(
        [sys.executable, "-c", READER, str(repo)],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    runs: list[dict[str, Any]] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    found = {run["name"]: run for run in runs}
    assert len(found) == len(runs), f"one Aim run per trackd run: {[r['name'] for r in runs]}"
    return found


def assert_every_step_once(run: dict[str, Any], rows: int) -> None:
    for key in ("i", "loss"):
        assert run["metrics"][key]["steps"] == list(range(rows)), key
    assert run["metrics"]["i"]["values"] == list(range(rows))


def kill_twice_while_delivering(daemon: Daemon, repo: Path, pause: float) -> None:
    """SIGKILL the daemon `pause` s after its sink delivered something, restart it; twice."""
    for _ in range(2):
        wait_for(lambda: daemon.status()["sinks"][sink_name(repo)]["delivered_rows"] > 0)
        time.sleep(pause)
        daemon.kill()
        daemon.start("--sink", f"aim:{repo}")


def test_local_repo_runs_steps_params_tags_and_status(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Two runs at once and a run using every record type into a local repo: one Aim run
    each, in the trackd project's experiment, named as in trackd, every step once with
    the client's timestamps, config/summary/status as params, tags as Aim tags, the
    artifact in the run's artifacts, stored beside the repo."""
    repo = tmp_path / "aim"
    daemon.start("--sink", f"aim:{repo}")
    names = ["alpha", "beta"]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    meta = meta_client(env, "--name", "meta")
    ids = {name: finish_client(client)["id"] for name, client in zip(names, clients, strict=True)}
    meta_id = finish_client(meta)["id"]
    daemon.flush()
    assert daemon.stop() == 0

    found = read_aim(env, repo)
    assert sorted(found) == ["alpha", "beta", "meta"]
    for name, run_id in ids.items():
        run = found[name]
        assert run["experiment"] == "p"
        assert_every_step_once(run, ROWS)
        assert all(time > 1e9 for time in run["metrics"]["i"]["times"])
        assert run["params"]["hparams"] == {"rows": ROWS}
        trackd = run["params"]["trackd"]
        assert (trackd["run_id"], trackd["status"], trackd["error"]) == (run_id, "finished", None)
        assert run["active"] is False

    run = found["meta"]
    assert run["experiment"] == "vision"
    assert run["metrics"]["loss"]["steps"] == list(range(50))
    assert run["params"]["hparams"] == {
        "lr": 0.001,
        "optimizer": {"name": "adam", "betas": [0.9, 0.99]},
        "epochs": 3,
    }
    assert run["params"]["summary"] == {"best_loss": 0.02}
    assert run["tags"] == ["stage:ablation", "team:cv"]
    assert run["params"]["trackd"]["run_id"] == meta_id
    assert run["params"]["trackd"]["status"] == "failed"
    uri = (repo / "aim-artifacts" / run["hash"] / "weights.bin").as_uri()
    digest = hashlib.sha256(b"weights").hexdigest()
    assert run["artifacts"] == {"weights.bin": {"uri": uri, "sha256": digest}}
    assert all(not found[name]["artifacts"] for name in names)


def test_local_repo_sigkill_mid_run_still_every_step_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice mid-run: the next daemon reopens the run (its stale
    lock is cleared) and the re-sent rows land on their own steps: every step once."""
    repo, stop = tmp_path / "aim", tmp_path / "stop"
    daemon.start("--sink", f"aim:{repo}")
    client = until_client.start(env, "k", stop, per_tick=100, tick=0.2)
    kill_twice_while_delivering(daemon, repo, pause=0.7)
    stop.touch()
    rows = finish_client(client)["rows"]
    daemon.flush()
    assert daemon.stop() == 0
    found = read_aim(env, repo)
    assert list(found) == ["k"]
    assert_every_step_once(found["k"], rows)
    assert found["k"]["params"]["trackd"]["status"] == "finished"


def test_local_repo_sigkill_while_logging_artifacts_loses_none(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while a run logs an artifact every 20 rows (each original
    deleted at once): every artifact is in the run's artifacts with its content, every
    step once."""
    repo, stop = tmp_path / "aim", tmp_path / "stop"
    daemon.start("--sink", f"aim:{repo}")
    client = until_client.start(env, "art", stop, per_tick=1, tick=0.02, artifact_every=20)
    kill_twice_while_delivering(daemon, repo, pause=1.0)
    stop.touch()
    result = finish_client(client)
    daemon.flush()
    assert daemon.stop() == 0
    [run] = read_aim(env, repo).values()
    assert run["metrics"]["i"]["steps"] == list(range(result["rows"]))
    assert {name: a["sha256"] for name, a in run["artifacts"].items()} == result["artifacts"]
    assert len(result["artifacts"]) > 5


def sink_name(repo: Path | str) -> str:
    return SinkSpec.parse(f"aim:{repo}").name


class AimServer:
    """An `aim server` on 127.0.0.1 with its own repo, in a process group of its own:
    stopping it is Ctrl+C to that group, which also ends the uvicorn child it starts."""

    def __init__(self, repo: Path, log: Path) -> None:
        self.repo = repo
        self.log = log
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None
        repo.mkdir(parents=True)
        subprocess.run([AIM, "init", "--repo", str(repo)], check=True, capture_output=True)

    def start(self) -> None:
        command = [AIM, "server", "--repo", str(self.repo), "--host", "127.0.0.1"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), "--yes"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._answers, timeout=60, interval=0.2)

    def _answers(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGINT to the server's process group, then wait until every process of it is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)
        wait_for(lambda: not _group_alive(process.pid), timeout=60, interval=0.1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def aim_server(tmp_path: Path) -> Iterator[AimServer]:
    server = AimServer(tmp_path / "server-repo", tmp_path / "aim-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_aim_server_stopped_and_restarted_mid_run_loses_nothing(
    daemon: Daemon, env: dict[str, str], aim_server: AimServer, tmp_path: Path
) -> None:
    """A real `aim server` stopped mid-run and started again on its repo, twice: the
    first time the daemon counts retries and goes on when it is back; the second time
    the daemon is stopped during the outage (it exits, dropping what Aim could not
    send) and the next daemon delivers the rest. Every step is in the repo, once."""
    spec = f"aim:aim://127.0.0.1:{aim_server.port}?timeout=2"
    name = SinkSpec.parse(spec).name
    stop = tmp_path / "stop"

    def delivered() -> int:
        return int(daemon.status()["sinks"][name]["delivered_rows"])

    quick = {"TRACKD_DRAIN_TIMEOUT": "2"}  # a stop during the outage drains nothing anyway
    daemon.start("--sink", spec, extra_env=quick)
    client = until_client.start(env, "remote", stop, per_tick=10, tick=0.05)
    wait_for(lambda: delivered() > 300, timeout=60)
    aim_server.stop()
    wait_for(lambda: daemon.status()["sinks"][name]["retries"] >= 2, timeout=60)
    before = delivered()
    aim_server.start()
    wait_for(lambda: delivered() > before + 100, timeout=60)
    aim_server.stop()
    assert daemon.stop() == 0
    aim_server.start()
    daemon.start("--sink", spec, extra_env=quick)
    stop.touch()
    rows = finish_client(client)["rows"]
    daemon.flush(timeout=120)
    assert daemon.status()["sinks"][name]["dead_letters"] == 0
    assert daemon.stop() == 0
    aim_server.stop()

    found = read_aim(env, aim_server.repo)
    assert list(found) == ["remote"]
    assert_every_step_once(found["remote"], rows)
    assert found["remote"]["params"]["trackd"]["status"] == "finished"
    assert found["remote"]["active"] is False
