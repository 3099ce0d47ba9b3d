"""Fixtures that own every daemon process and directory a test uses.

Each test gets its own runtime and data directories (so nothing is shared
with a user's daemon or another test), and daemons started as real
processes, ended by PID at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.postgres import Postgres
from trackd.client.control import DaemonUnreachable, request

HELPERS = Path(__file__).parent / "helpers"
PLUGINS = Path(__file__).parent / "plugins"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; fine for tests on loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(interval)


class Daemon:
    """A `trackd serve` process on the test's own directories."""

    def __init__(self, env: dict[str, str], runtime_dir: Path, data_dir: Path) -> None:
        self.env = env
        self.runtime_dir = runtime_dir
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / "daemon.log"

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> Daemon:
        assert self.process is None or self.process.poll() is not None
        env = {**self.env, **(extra_env or {})}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trackd", "serve", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout=30)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        try:
            self.request("status", timeout=0.5)
        except DaemonUnreachable:
            return False
        return True

    def request(self, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
        return request(command, runtime_dir=str(self.runtime_dir), timeout=timeout, **arguments)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("status")
        return result

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every sink has delivered everything durable."""
        assert self.request("flush", timeout=timeout + 5, wait=timeout), "sinks did not catch up"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM, and the exit code (the daemon drains first)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


HEAVY = "heavy"  # the xdist_group of tests that each load both cores (namespaces, chaos)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For `make test`'s parallel run (`pytest -n N --dist loadgroup`; a no-op without it).

    A module whose tests share a module-scoped fixture (a server, a run delivered once)
    becomes one xdist group, so one worker makes that fixture once instead of every worker
    making it. The heavy group goes first: its tests run one after another in one worker,
    and started last they would be the run's tail."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers
        return
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        definitions = item._fixtureinfo.name2fixturedefs.values()
        if any(d.scope == "module" for defs in definitions for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: _groups(item) != [HEAVY])


@pytest.hookimpl(tryfirst=True)  # before xdist's worker sends the ids to its scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    """Give each grouped test the `@group` id suffix that xdist's scheduler groups by.

    pytest-xdist 3.8 sets it on `item._nodeid`, which pytest 9.2 no longer reads (a node's
    id is `item._id`), so every xdist_group mark is silently ignored; this writes it where
    pytest reads it, and stands aside once the id has its suffix."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    for item in session.items:
        groups = _groups(item)
        if groups and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):  # xdist's own test
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


def _groups(item: pytest.Item) -> list[str]:
    return [str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args]


@pytest.fixture(autouse=True)
def _outside_any_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every client it starts) runs in a directory of its own: init()'s
    save_code finds no git checkout there, so what a run stores (a diff.patch artifact)
    does not depend on the state of the tree the tests run from."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    runtime = tmp_path / "rt"
    data = tmp_path / "data"
    monkeypatch.setenv("TRACKD_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("TRACKD_DATA_DIR", str(data))
    monkeypatch.delenv("TRACKD_ENDPOINT", raising=False)
    monkeypatch.delenv("TRACKD_SINKS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return {"runtime": runtime, "data": data, "root": tmp_path}


@pytest.fixture
def env(dirs: dict[str, Path]) -> dict[str, str]:
    """The environment for child processes: this test's directories, plugins importable."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(HELPERS)]),
        "TRACKD_RETRY_BASE": "0.05",
        "TRACKD_RETRY_CAP": "0.5",
        "TRACKD_SPOOL_SCAN_SECONDS": "0.2",
    }


@pytest.fixture
def daemon(env: dict[str, str], dirs: dict[str, Path]) -> Iterator[Daemon]:
    """A daemon handle (not yet started); killed at teardown if still running."""
    handle = Daemon(env, dirs["runtime"], dirs["data"])
    yield handle
    if handle.process is not None and handle.process.poll() is None:
        handle.process.kill()
        handle.process.wait(10)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session (helpers/postgres.py), started on first use;
    each test makes its own database in it."""
    with Postgres() as server:
        yield server


def run_client(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start tests/helpers/log_client.py in its own process."""
    return start_helper("log_client.py", env, *args)


def meta_client(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start tests/helpers/meta_client.py (a run using every kind of message)."""
    return start_helper("meta_client.py", env, *args)


def start_helper(script: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """A script of tests/helpers/ in its own process; `finish_client` reads its result."""
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `trackd ARGS...` to completion with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "trackd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def finish_client(process: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode(errors="replace")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def jsonl_runs(root: Path) -> dict[str, list[dict[str, Any]]]:
    """{run dir name: rows of its metrics.jsonl} under a JSONL sink root."""
    runs = {}
    for path in sorted(root.glob("*/*/metrics.jsonl")):
        runs[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return runs


async def until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """`wait_for` for a test running on the event loop: polls without blocking the loop."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {condition}")
        await asyncio.sleep(0.01)
    return value


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    """Network namespaces, links and processes for a multi-node test (helpers/netns.py),
    all removed at teardown, even after a failure."""
    from helpers.netns import made_lab

    with made_lab(tmp_path) as made:
        yield made
