"""Nodes on one machine: network namespaces, a bridge, veths, and the processes in them.

A `Lab` is what one test made: namespaces with unique names, their links, and the
processes started inside them. `build_network` makes a backend namespace holding a
bridge (10.231.X.1/24) with one veth port per node; each node namespace has the other
end (10.231.X.2, .3, ...). A server runs in the backend namespace bound to the bridge's
address (`NamespacedMlflow`); each node runs `trackd serve` and its training clients
(`Node`), reaching its daemon over ipc:// in the node's runtime dir, so only daemon ->
backend traffic crosses namespaces. `set_link` pulls a node's cable (its switch port
down): its daemon then sees a dead network (timeouts, not refusals).

Every interface is created inside a namespace of the lab (`ip -n`), so no name or
address exists outside them. `Lab.close()` ends every process by the process group of
the PID started and removes every namespace, even after a failure. A test using a lab
is skipped only when the kernel refuses `ip netns add`.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, wait_for
from trackd.client.control import DaemonUnreachable, request

MLFLOW_PORT = 5000  # the backend namespace's own port space: nothing else listens there
REFUSED = ("Operation not permitted", "Permission denied", "not supported", "Not supported")

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

uri, project, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
client = MlflowClient(tracking_uri=uri)
experiment = client.get_experiment_by_name(project)
runs = {}
for run in client.search_runs([experiment.experiment_id]) if experiment else []:
    history = {}
    for key in keys:
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


@contextlib.contextmanager
def made_lab(root: Path) -> Iterator[Lab]:
    """A lab that is closed however the test ends (the `lab` fixture of conftest)."""
    assert shutil.which("ip"), "iproute2's `ip` is needed to make the namespaces"
    made = Lab(root)
    try:
        yield made
    finally:
        made.close()


def build_network(lab: Lab, nodes: list[str]) -> dict[str, str]:
    """A backend namespace with a bridge, and a node namespace on a veth port of it per node.

    Returns {"backend": ns, NODE: ns, ...}; node i (from 0) has address SUBNET.(i + 2).
    """
    backend = lab.namespace("m")
    spaces = {"backend": backend, **{node: lab.namespace(node) for node in nodes}}
    lab.ip("-n", backend, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
    lab.ip("-n", backend, "addr", "add", f"{lab.subnet}.1/24", "dev", "br0")
    lab.ip("-n", backend, "link", "set", "br0", "up")
    for host, node in enumerate(nodes, start=2):
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


def set_link(lab: Lab, spaces: dict[str, str], node: str, *, up: bool) -> None:
    """A node's cable pulled (`up=False`) or plugged back: its switch port in the backend."""
    lab.ip("-n", spaces["backend"], "link", "set", f"port-{node}", "up" if up else "down")


def in_namespace(lab: Lab, namespace: str, script: str, *args: str, env: dict[str, str]) -> str:
    """Run a Python snippet inside a namespace of the lab and return its stdout."""
    process = lab.popen(namespace, [sys.executable, "-c", script, *args], env)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


def read_back(
    lab: Lab, namespace: str, uri: str, project: str, keys: tuple[str, ...], env: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """{run name: [{"status", "history": {key: [(step, value), ...]}}, ...]} from MLflow."""
    text = in_namespace(lab, namespace, READ_BACK, uri, project, ",".join(keys), env=env)
    runs: dict[str, list[dict[str, Any]]] = json.loads(text)
    return runs


class NamespacedMlflow:
    """`mlflow server` in the backend namespace, on the bridge's address: sqlite and 1 worker,
    or `backend_store_uri` (e.g. PostgreSQL inside the backend namespace) and `workers`;
    killed (its process group) and started again on the same store by the test."""

    def __init__(
        self,
        lab: Lab,
        spaces: dict[str, str],
        env: dict[str, str],
        backend_store_uri: str | None = None,
        workers: int = 1,
    ) -> None:
        self.lab = lab
        self.spaces = spaces
        self.address = f"{lab.subnet}.1"
        self.uri = f"http://{self.address}:{MLFLOW_PORT}"
        self.env = {**env, "NO_PROXY": self.address, "no_proxy": self.address}
        self.store = lab.root / "mlflow"
        self.store.mkdir(exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.store / 'mlflow.db'}"
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, probe_from: str) -> None:
        """Start the server and wait until it answers across the bridge from `probe_from`."""
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", self.address),
            *("--port", str(MLFLOW_PORT), "--workers", str(self.workers)),
            *("--backend-store-uri", self.backend_store_uri),
            *("--artifacts-destination", str(self.store / "artifacts")),
        ]
        server_env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = self.store / "server.log"
        self.process = self.lab.popen(self.spaces["backend"], command, server_env, log)
        in_namespace(
            self.lab, self.spaces[probe_from], WAIT_FOR_MLFLOW, self.uri, "120", env=self.env
        )
        assert self.process.poll() is None, log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        self.lab.end(self.process)


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
        self.clients: dict[str, subprocess.Popen[bytes]] = {}

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

    def log_run(self, project: str, name: str, rows: int, pace: float) -> None:
        """Start a training client (helpers/log_client.py) of run `name` on this node."""
        command = [sys.executable, str(HELPERS / "log_client.py"), "--project", project]
        command += ["--name", name, "--rows", str(rows), "--pace", str(pace)]
        self.clients[name] = self.lab.popen(self.namespace, command, self.env)

    def client_results(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Each client's result line ({"id", "worst_log_seconds", ...}) once it has exited."""
        results = {}
        for name, client in self.clients.items():
            out, err = client.communicate(timeout=timeout)
            assert client.returncode == 0, err.decode(errors="replace")
            results[name] = json.loads(out.decode().strip().splitlines()[-1])
        return results
