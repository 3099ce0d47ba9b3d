"""The `trackd` command, run as a subprocess against real daemons."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import trackd
from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from trackd.client import registry


@pytest.fixture(autouse=True)
def _no_run_left_open() -> Iterator[None]:
    yield
    for run in list(registry._open):
        run.finish(timeout=1)


def assert_one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """A non-zero exit with exactly one line on stderr and no traceback; that line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class Tail:
    """`trackd tail ...` in its own process, its stdout read line by line by a thread."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trackd", "tail", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def until(self, marker: str, timeout: float = 30) -> list[str]:
        """Every line read until (and with) the first one containing `marker`."""
        seen: list[str] = []
        while True:
            line = self.next_line(timeout)
            assert line is not None, f"tail printed no {marker!r}; it printed {seen}"
            seen.append(line)
            if marker in line:
                return seen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)
        self._reader.join(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        tail.stop()


def subscribed(tail: Tail, run: trackd.Run, values: dict[str, float]) -> None:
    """Log `values` again and again until tail prints something: its subscription is live."""

    def printed() -> bool:
        run.log(values)
        assert run.flush(timeout=10)
        return tail.next_line(0.2) is not None

    wait_for(printed, timeout=30)


def log_and_flush(run: trackd.Run, values: dict[str, float], step: int) -> None:
    run.log(values, step=step)
    assert run.flush(timeout=10)


# --- with a daemon -----------------------------------------------------------------


def test_status_prints_health(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd status` prints the daemon's ingest, WAL and sink health and exits 0."""
    daemon.start()
    result = cli(env, "status")
    assert result.returncode == 0, result.stderr
    assert "ingest:" in result.stdout
    assert "wal:" in result.stdout
    # piped (not a terminal): each sink's whole spec, not cut down to 80 columns
    (sink,) = json.loads(cli(env, "status", "--json").stdout)["sinks"].values()
    shown = sink["spec"]
    assert len(shown) > 40, "the test's sink path should be long enough to be cut"
    assert shown in result.stdout


def test_status_json_is_valid_json_with_every_section(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd status --json` prints one JSON object with ingest, wal, sinks and runs."""
    daemon.start()
    result = cli(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {"ingest", "wal", "sinks", "runs"} <= set(status)
    assert status["ingest"]["rows"] == 0
    assert len(status["sinks"]) == 1


def test_demo_pushes_a_run_through_the_daemon(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd demo` logs a simulated run; every step lands in the JSONL sink."""
    daemon.start()
    result = cli(env, "demo", "--steps", "20", "--delay", "0", "--name", "d1")
    assert result.returncode == 0, result.stderr
    assert "durable" in result.stdout
    daemon.flush()
    runs = jsonl_runs(daemon.data_dir / "runs")
    (name,) = runs
    assert name.startswith("d1-")
    assert [row["step"] for row in runs[name]] == list(range(20))
    assert {"loss", "acc", "lr"} <= set(runs[name][0])
    run_json = json.loads((daemon.data_dir / "runs" / "demo" / name / "run.json").read_text())
    assert run_json["status"] == "finished"


def test_runs_lists_a_demo_run(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd runs` shows a run logged by `trackd demo` in its table."""
    daemon.start()
    assert cli(env, "demo", "--steps", "20", "--delay", "0", "--name", "d2").returncode == 0
    result = cli(env, "runs")
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout
    assert "d2" in result.stdout
    assert "finished" in result.stdout


def test_runs_json_lists_a_demo_run(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd runs --json` lists a demo run with its project, name, status, rows, last step."""
    daemon.start()
    assert cli(env, "demo", "--steps", "20", "--delay", "0", "--name", "d3").returncode == 0
    result = cli(env, "runs", "--json")
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)
    assert (run["project"], run["name"], run["status"]) == ("demo", "d3", "finished")
    assert (run["rows"], run["last_step"]) == (20, 19)


def test_tail_prints_live_rows_of_one_project(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --project P` prints P's rows as they are logged, and no other project's."""
    daemon.start()
    tail = Tail(env, "--project", "watched")
    tails.append(tail)
    run = trackd.init(project="watched", name="r")
    other = trackd.init(project="ignored", name="r")
    subscribed(tail, run, {"loss": 1.0})
    log_and_flush(other, {"loss": 7.0}, step=500)
    log_and_flush(run, {"loss": 0.125, "acc": 0.5}, step=1000)
    lines = tail.until("step=1000")
    assert lines[-1] == "watched/r step=1000 loss=0.125 acc=0.5"
    assert not [line for line in lines if "ignored" in line]
    other.finish(timeout=10)
    run.finish(timeout=10)


def test_tail_into_a_reader_that_stops_ends_quietly(daemon: Daemon, env: dict[str, str]) -> None:
    """`trackd tail --since-start | head -1`: once the reader is gone, tail stops without a
    word on stderr, as a Unix tool does on a closed pipe."""
    daemon.start()
    run = trackd.init(project="piped", name="r")
    for step in range(2000):
        run.log({"loss": 1.0}, step=step)
    run.finish(timeout=30)
    daemon.flush()
    tail = subprocess.Popen(
        [sys.executable, "-m", "trackd", "tail", "--since-start"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tail.stdout is not None
    assert tail.stderr is not None
    try:
        assert b"piped/r" in tail.stdout.readline()
        tail.stdout.close()
        assert tail.wait(timeout=30) == 141
        assert tail.stderr.read() == b""
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
        tail.stderr.close()


def test_tail_json_filters_by_project_and_run(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --json --project P --run R` prints R's rows as JSON, not other runs of P."""
    daemon.start()
    tail = Tail(env, "--json", "--project", "p", "--run", "wanted")
    tails.append(tail)
    run = trackd.init(project="p", name="wanted")
    sibling = trackd.init(project="p", name="wanted-not")
    subscribed(tail, run, {"loss": 1.0})
    log_and_flush(sibling, {"loss": 7.0}, step=500)
    log_and_flush(run, {"loss": 0.25}, step=1000)
    lines = [json.loads(line) for line in tail.until('"step": 1000')]
    assert all((line["project"], line["run"]) == ("p", "wanted") for line in lines), lines
    last = lines[-1]
    assert (last["step"], last["loss"]) == (1000, 0.25)
    assert isinstance(last["ts"], float)
    sibling.finish(timeout=10)
    run.finish(timeout=10)


def test_tail_run_filter_alone_matches_the_run_in_any_project(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --run R` without --project prints R's rows and no other run's."""
    daemon.start()
    tail = Tail(env, "--json", "--run", "wanted")
    tails.append(tail)
    run = trackd.init(project="p1", name="wanted")
    other = trackd.init(project="p1", name="other")
    subscribed(tail, run, {"loss": 1.0})
    log_and_flush(other, {"loss": 7.0}, step=500)
    log_and_flush(run, {"loss": 0.25}, step=1000)
    lines = [json.loads(line) for line in tail.until('"step": 1000')]
    assert all(line["run"] == "wanted" for line in lines), lines
    other.finish(timeout=10)
    run.finish(timeout=10)


def test_tail_key_glob_keeps_only_matching_metrics(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --json --key GLOB` prints only matching metrics, and rows that have some."""
    daemon.start()
    tail = Tail(env, "--json", "--project", "k", "--key", "train/*")
    tails.append(tail)
    run = trackd.init(project="k", name="r")
    subscribed(tail, run, {"train/loss": 1.0, "val/loss": 2.0})
    log_and_flush(run, {"val/loss": 9.0}, step=500)
    run.set_summary({"best": 1.0})
    log_and_flush(run, {"train/loss": 0.5, "train/acc": 0.75, "val/loss": 3.0}, step=1000)
    lines = [json.loads(line) for line in tail.until('"step": 1000')]
    assert all("step" in line for line in lines), "non-metrics messages are not metrics"
    assert all(not any(key.startswith("val/") for key in line) for line in lines), lines
    assert 500 not in [line["step"] for line in lines]
    assert {key: lines[-1][key] for key in ("train/loss", "train/acc")} == {
        "train/loss": 0.5,
        "train/acc": 0.75,
    }
    run.finish(timeout=10)


def test_tail_console_shows_console_lines_live_and_plain_tail_does_not(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --console` prints the runs' stdout/stderr lines as they come; `trackd tail`
    without it prints none of them."""
    daemon.start()
    with_console = Tail(env, "--project", "c", "--console")
    plain = Tail(env, "--project", "c")
    tails.extend([with_console, plain])
    run = trackd.init(project="c", name="r")
    subscribed(with_console, run, {"loss": 1.0})
    subscribed(plain, run, {"loss": 1.0})
    print("a console line")
    print("an error line", file=sys.stderr)
    assert run.flush(timeout=10)  # the lines are sent before the row logged next
    log_and_flush(run, {"loss": 0.5}, step=1000)
    shown = with_console.until("step=1000")
    assert "c/r [stdout] a console line" in shown
    assert "c/r [stderr] an error line" in shown
    assert not [line for line in plain.until("step=1000") if "line" in line]
    run.finish(timeout=10)


def test_tail_console_json_has_the_stream_and_time(
    daemon: Daemon, env: dict[str, str], tails: list[Tail]
) -> None:
    """`trackd tail --console --json` prints each console line as an object with its stream."""
    daemon.start()
    tail = Tail(env, "--project", "cj", "--console", "--json")
    tails.append(tail)
    run = trackd.init(project="cj", name="r")
    subscribed(tail, run, {"loss": 1.0})
    print("json console line")
    assert run.flush(timeout=10)
    line = json.loads(tail.until("json console line")[-1])
    assert {k: line[k] for k in ("project", "run", "stream", "text")} == {
        "project": "cj",
        "run": "r",
        "stream": "stdout",
        "text": "json console line",
    }
    assert isinstance(line["ts"], float)
    run.finish(timeout=10)


def test_sigterm_drains_the_sink_and_exits_zero(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """SIGTERM: `trackd serve` delivers everything already logged to its sink, then exits 0."""
    root = dirs["root"] / "slow-runs"
    daemon.start("--sink", f"slow:{root}?delay=0.3")
    finish_client(run_client(env, "--name", "drained", "--rows", "3000"))
    assert daemon.stop() == 0
    runs = jsonl_runs(root)
    (name,) = runs
    assert [row["i"] for row in runs[name]] == list(range(3000))
    run_json = json.loads((root / "p" / name / "run.json").read_text())
    assert run_json["status"] == "finished"


def test_second_serve_on_the_same_data_dir_is_refused(daemon: Daemon, env: dict[str, str]) -> None:
    """A second `trackd serve` on a data dir in use exits non-zero with one line."""
    daemon.start()
    result = cli(env, "serve", timeout=30)
    line = assert_one_line_failure(result)
    assert "already" in line
    assert daemon.process is not None
    assert daemon.status()["pid"] == daemon.process.pid, "the first daemon should keep running"


# --- without a daemon, or with a bad setup -----------------------------------------


@pytest.mark.parametrize(
    "args",
    [("status",), ("status", "--json"), ("runs",), ("runs", "--json"), ("tail",), ("demo",)],
)
def test_command_without_daemon_fails_with_one_line(env: dict[str, str], args: tuple[str]) -> None:
    """With no daemon, status/runs/tail/demo exit non-zero with one line on stderr, no
    traceback (a demo pushes its run *through* the daemon: it needs one)."""
    line = assert_one_line_failure(cli(env, *args))
    assert "daemon" in line


@pytest.mark.parametrize(
    ("spec", "named"),
    [("nosuchkind:x", "nosuchkind"), ("jsonl", "jsonl"), ("jsonl:", "jsonl")],
)
def test_serve_with_bad_sink_spec_exits_2_with_one_line(
    env: dict[str, str], spec: str, named: str
) -> None:
    """`trackd serve --sink SPEC` with an unknown kind or no target exits 2 naming the problem."""
    result = cli(env, "serve", "--sink", spec, timeout=30)
    line = assert_one_line_failure(result)
    assert result.returncode == 2
    assert named in line


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("jsonl:{d}/x?bogus=1", "'bogus' (known: none)"),
        ("mlflow:http://127.0.0.1:9?in_fligt=2", "'in_fligt' (known: in_flight, http_retries"),
    ],
)
def test_serve_with_an_unknown_sink_option_fails_naming_it(
    env: dict[str, str], tmp_path: Path, spec: str, named: str
) -> None:
    """A misspelt sink option is refused at start-up, with the options the sink knows."""
    result = cli(env, "serve", "--sink", spec.format(d=tmp_path), timeout=30)
    line = assert_one_line_failure(result)
    assert named in line


def test_serve_refuses_a_group_or_world_writable_runtime_dir(
    env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """`trackd serve` refuses a runtime dir others can write (0777), with one line."""
    runtime = dirs["runtime"]
    runtime.mkdir(parents=True)
    runtime.chmod(0o777)
    line = assert_one_line_failure(cli(env, "serve", timeout=30))
    assert str(runtime) in line
    assert not (runtime / "ingest.sock").exists()


def test_serve_refuses_a_runtime_dir_of_another_user(
    env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """A runtime dir another user owns (a `/tmp/trackd-$UID` someone made first) is refused
    with one line naming it; the daemon neither binds there nor changes its mode."""
    runtime = dirs["runtime"]
    runtime.mkdir(parents=True, mode=0o700)
    os.chown(runtime, 65534, 65534)  # nobody: the tests run as root, which may give it away
    line = assert_one_line_failure(cli(env, "serve", timeout=30))
    assert str(runtime) in line
    assert "another user" in line
    assert not (runtime / "ingest.sock").exists()
