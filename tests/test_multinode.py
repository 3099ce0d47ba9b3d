"""Multi-node on one machine: two node-local daemons deliver into one central MLflow server.

Three network namespaces made by the test, with unique names: two "nodes" and
a "backend". The backend holds a bridge (10.231.X.1/24) with one veth port per
node; each node has the other end of its veth (10.231.X.2 and .3). The MLflow
server runs in the backend namespace, bound to the bridge's address; each node
runs `trackd serve` and a training client inside its own namespace (the client
reaches its daemon over ipc:// in the node's runtime dir; only daemon -> MLflow
traffic crosses the namespaces). Mid-run node A's switch port is set down for
30 s, so its daemon sees a dead network (timeouts, not refusals) while node B
carries on. Afterwards both runs are read back from the MLflow server (from
inside a node namespace): every step once in each.

Every namespace, link and process is made here and removed by the fixture's
finalizer, even on failure; processes are ended by the process group of the PID
started. Addresses exist only inside these namespaces. The test is skipped only
when the kernel refuses `ip netns add`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HEAVY, HELPERS, wait_for
from trackd.client.control import DaemonUnreachable, request

ROWS = 6000
PACE = 0.9  # seconds per 100 rows: about 55 s of logging
CUT_SECONDS = 30.0
MLFLOW_PORT = 5000  # the backend namespace's own port space: nothing else listens there
REFUSED = ("Operation not permitted", "Permission denied", "not supported", "Not supported")

# three namespaces, an MLflow server and two daemons: one heavy test at a time
pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group(HEAVY)]

WAIT_FOR_MLFLOW = r"""
import sys, time, urllib.request
uri, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=1) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("mlflow server did not answer at " + uri)
    time.sleep(0.2)
"""

READ_BACK = r"""
import json, sys
from mlflow.tracking import MlflowClient

uri, project = sys.argv[1:3]
client = MlflowClient(tracking_uri=uri)
experiment = client.get_experiment_by_name(project)
runs = {}
for run in client.search_runs([experiment.experiment_id]) if experiment else []:
    history = {}
    for key in ("i", "loss"):
        points = client.get_metric_history(run.info.run_id, key)
        history[key] = [(point.step, point.value) for point in points]
    runs.setdefault(run.info.run_name, []).append({"status": run.info.status, "history": history})
print(json.dumps(runs))
"""


class Lab:
    """Namespaces, links and processes made by one test; `close()` removes them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(3)
        self.subnet = f"10.231.{secrets.randbelow(256)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log = root / "lab.log"

    def ip(self, *args: str) -> None:
        """Run `ip ARGS`; a failure is the test's failure, with ip's own words."""
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        with self.log.open("a") as log:
            log.write(f"ip {' '.join(args)} -> {done.returncode} {done.stderr.strip()}\n")
        if done.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def namespace(self, role: str) -> str:
        name = f"trackd-{self.token}-{role}"
        done = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            if not self.namespaces and any(text in done.stderr for text in REFUSED):
                pytest.skip(f"the kernel refuses network namespaces: {done.stderr.strip()}")
            raise AssertionError(f"ip netns add {name}: {done.stderr.strip()}")
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")
        return name

    def popen(
        self, namespace: str, command: list[str], env: dict[str, str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `command` inside `namespace`, in a new process group this test owns."""
        output: Any = subprocess.PIPE if log is None else log.open("ab")
        try:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *command],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            if log is not None:
                output.close()
        self.processes.append(process)
        return process

    def end(self, process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> int:
        """Signal the process group of a PID started here, and reap it."""
        if process.poll() is None:  # the group is signalled only while its leader is ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        return process.wait(60)

    def close(self) -> None:
        for process in reversed(self.processes):
            self.end(process)
        problems = []
        for name in reversed(self.namespaces):
            done = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
        self.namespaces.clear()
        assert not problems, problems


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    assert shutil.which("ip"), "iproute2's `ip` is needed to make the namespaces"
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


def build_network(lab: Lab) -> dict[str, str]:
    """A backend namespace with a bridge, and a node namespace on a veth port of it per node.

    Returns {"backend": ns, "a": ns, "b": ns}. Every interface is created inside a
    namespace of the test (`ip -n`), so no name or address exists outside them.
    """
    backend = lab.namespace("m")
    spaces = {"backend": backend, "a": lab.namespace("a"), "b": lab.namespace("b")}
    lab.ip("-n", backend, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
    lab.ip("-n", backend, "addr", "add", f"{lab.subnet}.1/24", "dev", "br0")
    lab.ip("-n", backend, "link", "set", "br0", "up")
    for host, node in ((2, "a"), (3, "b")):
        port, namespace = f"port-{node}", spaces[node]
        # the switch end stays in the backend; its peer is born inside the node
        lab.ip(
            *("-n", backend, "link", "add", port, "type", "veth"),
            *("peer", "name", "eth0", "netns", namespace),
        )
        lab.ip("-n", backend, "link", "set", port, "master", "br0")
        lab.ip("-n", backend, "link", "set", port, "up")
        lab.ip("-n", namespace, "addr", "add", f"{lab.subnet}.{host}/24", "dev", "eth0")
        lab.ip("-n", namespace, "link", "set", "eth0", "up")
    return spaces


class Node:
    """One node: its namespace, its daemon's directories, its daemon and client processes."""

    def __init__(self, lab: Lab, name: str, namespace: str, env: dict[str, str]) -> None:
        self.lab = lab
        self.name = name
        self.namespace = namespace
        self.home = lab.root / f"node-{name}"
        self.runtime_dir = self.home / "rt"
        self.data_dir = self.home / "data"
        self.env = {
            **env,
            "TRACKD_RUNTIME_DIR": str(self.runtime_dir),
            "TRACKD_DATA_DIR": str(self.data_dir),
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None

    def serve(self, *args: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "trackd", "serve", *args]
        self.daemon = self.lab.popen(self.namespace, command, self.env, self.home / "daemon.log")
        wait_for(self._answers, timeout=60)

    def _answers(self) -> bool:
        assert self.daemon is not None
        if self.daemon.poll() is not None:
            log = (self.home / "daemon.log").read_text(errors="replace")
            raise AssertionError(f"node {self.name}: daemon exited:\n{log[-3000:]}")
        try:
            self.request("status", timeout=0.5)
        except DaemonUnreachable:
            return False
        return True

    def request(self, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
        """The daemon's control socket: ipc:// in the node's runtime dir, on the shared disk."""
        return request(command, runtime_dir=str(self.runtime_dir), timeout=timeout, **arguments)

    def sink(self) -> dict[str, Any]:
        (status,) = self.request("status")["sinks"].values()
        result: dict[str, Any] = status
        return result

    def log_run(self, rows: int, pace: float) -> None:
        script = str(HELPERS / "log_client.py")
        command = [sys.executable, script, "--project", "multinode", "--name", f"node-{self.name}"]
        command += ["--rows", str(rows), "--pace", str(pace)]
        self.client = self.lab.popen(self.namespace, command, self.env)

    def client_result(self, timeout: float) -> dict[str, Any]:
        assert self.client is not None
        out, err = self.client.communicate(timeout=timeout)
        assert self.client.returncode == 0, err.decode(errors="replace")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result


def in_namespace(lab: Lab, namespace: str, script: str, *args: str, env: dict[str, str]) -> str:
    """Run a Python snippet inside a namespace of the lab and return its stdout."""
    process = lab.popen(namespace, [sys.executable, "-c", script, *args], env)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


def test_two_nodes_one_mlflow_link_cut_for_30s_everything_arrives_once(
    lab: Lab, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Node A's link down for 30 s mid-run: both nodes' runs reach MLflow whole, each step once."""
    spaces = build_network(lab)
    address = f"{lab.subnet}.1"
    uri = f"http://{address}:{MLFLOW_PORT}"
    env = {**env, "NO_PROXY": address, "no_proxy": address}
    store = lab.root / "mlflow"
    store.mkdir()
    server = lab.popen(
        spaces["backend"],
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", address),
            *("--port", str(MLFLOW_PORT), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"),
            *("--artifacts-destination", str(store / "artifacts")),
        ],
        {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        store / "server.log",
    )
    in_namespace(lab, spaces["a"], WAIT_FOR_MLFLOW, uri, "120", env=env)  # across the bridge
    assert server.poll() is None

    nodes = {name: Node(lab, name, spaces[name], env) for name in ("a", "b")}
    for node in nodes.values():
        node.serve("--sink", f"mlflow:{uri}")
    for node in nodes.values():
        node.log_run(ROWS, PACE)
    a, b = nodes["a"], nodes["b"]
    wait_for(lambda: a.sink()["delivered_rows"] > 0 and b.sink()["delivered_rows"] > 0, 60)

    lab.ip("-n", spaces["backend"], "link", "set", "port-a", "down")  # node A's cable pulled
    cut_at = time.monotonic()
    b_before = b.sink()["delivered_rows"]
    failing = wait_for(lambda: (sink := a.sink())["retries"] > 0 and sink, timeout=CUT_SECONDS)
    assert failing["last_error"], "node A's status says why MLflow is behind"
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    during_a, during_b = a.sink(), b.sink()
    lab.ip("-n", spaces["backend"], "link", "set", "port-a", "up")
    assert all(node.client.poll() is None for node in nodes.values() if node.client), (
        "the runs should still be logging when the link comes back"
    )
    assert during_a["lag_records"] > 0, "node A's sink falls behind while its link is down"
    assert during_b["delivered_rows"] > b_before, "node B keeps delivering meanwhile"

    results = {name: node.client_result(timeout=120) for name, node in nodes.items()}
    for node in nodes.values():
        assert node.request("flush", timeout=125, wait=120), f"node {node.name} did not catch up"
        assert node.sink()["dead_letters"] == 0

    runs = json.loads(in_namespace(lab, spaces["b"], READ_BACK, uri, "multinode", env=env))
    assert sorted(runs) == ["node-a", "node-b"]
    for name in ("a", "b"):
        (run,) = runs[f"node-{name}"]  # one MLflow run per trackd run
        for key in ("i", "loss"):
            steps = sorted(step for step, _ in run["history"][key])
            assert steps == list(range(ROWS)), f"node {name}: {key} not every step exactly once"
        assert all(value == step for step, value in run["history"]["i"])
        assert run["status"] == "FINISHED"
        assert results[name]["worst_log_seconds"] < 0.5, "log() never waits on the network"
    figures = {
        "rows_per_node": ROWS,
        "cut_seconds": CUT_SECONDS,
        "a_retries_during_cut": during_a["retries"],
        "a_lag_records_at_reconnect": during_a["lag_records"],
        "b_rows_delivered_during_cut": during_b["delivered_rows"] - b_before,
        "worst_log_seconds": {name: r["worst_log_seconds"] for name, r in results.items()},
    }
    with capsys.disabled():
        print(f"\n[multinode] {json.dumps(figures)}", flush=True)
    for node in nodes.values():
        assert node.daemon is not None
        assert lab.end(node.daemon, signal.SIGTERM) == 0
