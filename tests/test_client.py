"""The client API as DESIGN.md states it, against a real daemon where delivery matters."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import trackd
from conftest import Daemon, wait_for
from trackd.client import registry

FIELDS = (
    *("id", "project", "name", "group", "host", "pid", "rank", "local_rank", "world_size"),
    *("started", "ended"),
)
RUN_FIELDS = (*FIELDS, "status", "error")


@pytest.fixture(autouse=True)
def _no_run_left_open() -> Iterator[None]:
    """A test that fails half-way must not leave its run to the pytest process's atexit hook."""
    yield
    for run in list(registry._open):
        run.finish(timeout=1)


class Item:
    """A NumPy-scalar / 0-d tensor stand-in: anything with `.item()`."""

    def __init__(self, value: float | int | bool) -> None:
        self.value = value

    def item(self) -> float | int | bool:
        return self.value


def python(env: dict[str, str], code: str, *args: str, timeout: float = 60) -> Any:
    """Run `code` as a script in its own process; the completed process, text output."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_dir(daemon: Daemon, project: str, name: str) -> Path:
    found = sorted((daemon.data_dir / "runs" / project).glob(f"{name}-*"))
    assert len(found) == 1, f"expected one run dir for {project}/{name}, got {found}"
    return found[0]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def rows_of(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def without_ts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in row.items() if key != "ts"} for row in rows]


def delivered(daemon: Daemon, project: str, name: str) -> Path:
    """The run's JSONL directory once the sink has caught up and the run has ended."""
    daemon.flush()
    directory = run_dir(daemon, project, name)
    wait_for(lambda: read_json(directory / "run.json")["status"] != "running", timeout=10)
    return directory


# --- wrong arguments ---------------------------------------------------------------


BAD_CALLS: list[tuple[str, Callable[[trackd.Run], object], type[Exception], str]] = [
    ("string value", lambda run: run.log({"loss": "high"}), TypeError, "loss"),
    ("nested string", lambda run: run.log({"train": {"acc": "x"}}), TypeError, "train/acc"),
    ("non-dict", lambda run: run.log([("loss", 1.0)]), TypeError, "dict"),  # type: ignore[arg-type]
    ("non-string key", lambda run: run.log({7: 1.0}), TypeError, "7"),  # type: ignore[dict-item]
    ("string step", lambda run: run.log({"loss": 1.0}, step="3"), TypeError, "step"),  # type: ignore[arg-type]
    ("float step", lambda run: run.log({"loss": 1.0}, step=1.5), TypeError, "step"),  # type: ignore[arg-type]
    ("bool step", lambda run: run.log({"loss": 1.0}, step=True), TypeError, "step"),
    ("step past 64 bits", lambda run: run.log({"loss": 1.0}, step=2**63), ValueError, "step"),
    ("step under 64 bits", lambda run: run.log({"a": 1.0}, step=-(2**63) - 1), ValueError, "step"),
    (
        "media step past 64 bits",
        lambda run: run.log({"h": trackd.Histogram([1.0, 2.0])}, step=2**64),
        ValueError,
        "step",
    ),
    ("config value", lambda run: run.log_config({"opt": object()}), TypeError, "opt"),
    ("config non-dict", lambda run: run.log_config(["lr"]), TypeError, "dict"),  # type: ignore[arg-type]
    ("summary value", lambda run: run.set_summary({"best": {1, 2}}), TypeError, "best"),
    ("tag non-string", lambda run: run.set_tags([1]), TypeError, "1"),  # type: ignore[list-item]
    ("missing artifact", lambda run: run.log_artifact("/nonexistent/m.pt"), ValueError, "m.pt"),
]


@pytest.mark.parametrize(
    ("call", "error", "named"),
    [pytest.param(call, error, named, id=label) for label, call, error, named in BAD_CALLS],
)
def test_wrong_argument_raises_at_once_naming_it_and_run_stays_usable(
    daemon: Daemon, call: Callable[[trackd.Run], object], error: type[Exception], named: str
) -> None:
    """A wrong argument raises TypeError/ValueError naming the key; later valid logs arrive."""
    daemon.start()
    run = trackd.init(project="bad", name="r")
    with pytest.raises(error, match=named):
        call(run)
    run.log({"ok": 1.0})
    run.log({"ok": 2.0})
    run.finish(timeout=30)
    directory = delivered(daemon, "bad", "r")
    assert without_ts(rows_of(directory)) == [{"step": 0, "ok": 1.0}, {"step": 1, "ok": 2.0}]
    assert read_json(directory / "run.json")["status"] == "finished"


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        pytest.param({"mode": "sometimes"}, ValueError, "mode", id="mode"),
        pytest.param({"name": "x", "resume": "maybe"}, ValueError, "resume", id="resume"),
        pytest.param({"resume": "must"}, ValueError, "resume='must' needs a name", id="must"),
        pytest.param({"config": {"lr": object()}}, TypeError, "lr", id="config"),
        pytest.param({"config": {"opt": {"betas": {0.9}}}}, TypeError, "betas", id="nested-config"),
        pytest.param({"tags": 5}, TypeError, "tags", id="tags"),
    ],
)
def test_wrong_init_argument_raises_at_once_naming_it(
    dirs: dict[str, Path], arguments: dict[str, Any], error: type[Exception], named: str
) -> None:
    """init() with a bad mode, resume, config or tags raises TypeError/ValueError naming it."""
    with pytest.raises(error, match=named):
        trackd.init(project="bad", **arguments)
    assert not registry._open, "a refused init() must not leave a run open"


# --- values and steps --------------------------------------------------------------


def test_item_objects_and_nested_dicts_flatten_into_numbers(daemon: Daemon) -> None:
    """Objects with .item() become numbers; nested dicts flatten with "/"."""
    daemon.start()
    run = trackd.init(project="vals", name="v")
    run.log(
        {
            "loss": Item(0.25),
            "count": Item(3),
            "flag": True,
            "train": {"acc": 0.5, "top": {"k5": Item(0.75)}},
        }
    )
    run.finish(timeout=30)
    (row,) = without_ts(rows_of(delivered(daemon, "vals", "v")))
    assert row == {
        "step": 0,
        "loss": 0.25,
        "count": 3,
        "flag": True,
        "train/acc": 0.5,
        "train/top/k5": 0.75,
    }
    assert type(row["count"]) is int


def test_nan_and_inf_are_recorded_as_such(daemon: Daemon) -> None:
    """NaN, +Inf and -Inf arrive in metrics.jsonl as NaN and infinities, not as null or strings."""
    daemon.start()
    run = trackd.init(project="vals", name="nan")
    run.log({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "item": Item(math.nan)})
    run.finish(timeout=30)
    (row,) = rows_of(delivered(daemon, "vals", "nan"))
    assert math.isnan(row["nan"])
    assert math.isnan(row["item"])
    assert row["inf"] == math.inf
    assert row["ninf"] == -math.inf


def test_steps_auto_increment_accept_explicit_values_and_mix(daemon: Daemon) -> None:
    """Omitted steps count up from 0, an explicit step is kept, and counting resumes after it."""
    daemon.start()
    run = trackd.init(project="steps", name="s")
    run.log({"a": 1})
    run.log({"a": 2})
    run.log({"a": 3}, step=10)
    run.log({"a": 4})
    run.log({"a": 5}, step=20)
    run.log({"a": 6})
    run.finish(timeout=30)
    rows = rows_of(delivered(daemon, "steps", "s"))
    assert [(row["step"], row["a"]) for row in rows] == [
        (0, 1),
        (1, 2),
        (10, 3),
        (11, 4),
        (20, 5),
        (21, 6),
    ]


# --- config, tags, summary, artifacts, run.json ------------------------------------


def test_log_config_merges_into_config_json(daemon: Daemon) -> None:
    """init(config=...) and later log_config() calls merge into config.json."""
    daemon.start()
    run = trackd.init(project="cfg", name="c", config={"lr": 0.1, "opt": {"name": "sgd"}})
    run.log_config({"batch": 32, "lr": 0.2})
    run.log_config({"layers": [64, 32], "scale": Item(2.5)})
    run.finish(timeout=30)
    config = read_json(delivered(daemon, "cfg", "c") / "config.json")
    assert config == {
        "lr": 0.2,
        "opt": {"name": "sgd"},
        "batch": 32,
        "layers": [64, 32],
        "scale": 2.5,
    }


def test_set_tags_reaches_the_daemon_stream(daemon: Daemon) -> None:
    """set_tags() values are delivered: they appear on the daemon's live stream."""
    daemon.start()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"ipc://{daemon.runtime_dir / 'stream.sock'}")
    sub.setsockopt(zmq.SUBSCRIBE, b"tagged/t/")
    run = trackd.init(project="tagged", name="t")
    seen: list[dict[str, Any]] = []

    def tags_seen() -> bool:
        run.set_tags({"arch": "resnet", "seed": "1"})
        run.flush(timeout=10)
        while sub.poll(100):
            message = msgpack.unpackb(sub.recv_multipart()[1])
            if message["t"] == "tags":
                seen.append(message["b"])
        return bool(seen)

    try:
        wait_for(tags_seen, timeout=20)
    finally:
        sub.close()
    run.finish(timeout=30)
    assert seen[0]["values"] == {"arch": "resnet", "seed": "1"}


def test_summary_is_last_value_of_each_metric_unless_set(daemon: Daemon) -> None:
    """summary.json holds each metric's last value, and set_summary() values where given."""
    daemon.start()
    run = trackd.init(project="sum", name="s")
    for step in range(5):
        run.log({"loss": 1.0 / (step + 1), "acc": step / 10, "lr": 0.1})
    run.set_summary({"acc": 0.99, "best_loss": 0.01})
    run.finish(timeout=30)
    summary = read_json(delivered(daemon, "sum", "s") / "summary.json")
    assert summary == {"loss": 0.2, "acc": 0.99, "lr": 0.1, "best_loss": 0.01}


def test_log_artifact_is_copied_into_artifacts(daemon: Daemon, tmp_path: Path) -> None:
    """log_artifact() copies the file into the run's artifacts/, under its name or the given one."""
    daemon.start()
    source = tmp_path / "model.bin"
    source.write_bytes(b"\x00weights\xff" * 100)
    run = trackd.init(project="art", name="a")
    run.log_artifact(source)
    run.log_artifact(str(source), name="best.bin")
    run.finish(timeout=30)
    artifacts = delivered(daemon, "art", "a") / "artifacts"
    assert sorted(path.name for path in artifacts.iterdir()) == ["best.bin", "model.bin"]
    assert (artifacts / "model.bin").read_bytes() == source.read_bytes()
    assert (artifacts / "best.bin").read_bytes() == source.read_bytes()


def test_run_json_has_every_field(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json: id, project, name, group, host, pid, rank, local_rank and world_size (from
    RANK, LOCAL_RANK, WORLD_SIZE), started, ended, status."""
    daemon.start()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not a job of several processes: a run of its own
    before = time.time()
    run = trackd.init(project="meta", name="m", group="sweep-1")
    run.log({"x": 1.0})
    run.finish(timeout=30)
    info = read_json(delivered(daemon, "meta", "m") / "run.json")
    assert set(RUN_FIELDS) <= set(info)
    assert info["id"] == run.id
    assert run_dir(daemon, "meta", "m").name == f"m-{run.id[:8]}"
    assert (info["project"], info["name"], info["group"]) == ("meta", "m", "sweep-1")
    assert (info["host"], info["pid"], info["rank"]) == (socket.gethostname(), os.getpid(), 3)
    assert (info["local_rank"], info["world_size"]) == (1, 1)
    assert before - 1 <= info["started"] <= info["ended"] <= time.time() + 1
    assert (info["status"], info["error"]) == ("finished", None)


def test_resume_allow_continues_the_same_run(daemon: Daemon) -> None:
    """Two init(resume="allow") calls with the same project and name log into one run."""
    daemon.start()
    first = trackd.init(project="res", name="long", resume="allow", config={"lr": 0.1})
    for step in range(5):
        first.log({"loss": 1.0}, step=step)
    first.finish(timeout=30)
    second = trackd.init(project="res", name="long", resume="allow", config={"lr": 0.1})
    for step in range(5, 10):
        second.log({"loss": 0.5}, step=step)
    second.finish(timeout=30)
    assert second.id == first.id
    directory = delivered(daemon, "res", "long")
    assert [row["step"] for row in rows_of(directory)] == list(range(10))
    assert read_json(directory / "run.json")["status"] == "finished"


def test_resume_allow_without_a_name_starts_a_new_run(daemon: Daemon) -> None:
    """`init(project, resume="allow")` with no name has nothing to continue: as in trackio,
    each call starts a run of its own."""
    daemon.start()
    ids = []
    for value in (1.0, 2.0):
        run = trackd.init(project="res-anon", resume="allow")
        run.log({"loss": value})
        run.finish(timeout=30)
        ids.append(run.id)
    assert ids[0] != ids[1]
    daemon.flush()
    for run_id, value in zip(ids, (1.0, 2.0), strict=True):
        (directory,) = (daemon.data_dir / "runs" / "res-anon").glob(f"*-{run_id[:8]}")
        wait_for(lambda d=directory: read_json(d / "run.json")["status"] == "finished")
        assert without_ts(rows_of(directory)) == [{"step": 0, "loss": value}]


# --- module-level API and context manager ------------------------------------------


def test_module_level_log_and_finish_act_on_current_run(daemon: Daemon) -> None:
    """trackd.log() and trackd.finish() log to and finish the run init() made current."""
    daemon.start()
    run = trackd.init(project="mod", name="m")
    trackd.log({"loss": 0.5})
    trackd.log({"loss": 0.25}, step=7)
    trackd.finish(timeout=30)
    directory = delivered(daemon, "mod", "m")
    assert without_ts(rows_of(directory)) == [
        {"step": 0, "loss": 0.5},
        {"step": 7, "loss": 0.25},
    ]
    assert read_json(directory / "run.json")["status"] == "finished"
    assert read_json(directory / "run.json")["id"] == run.id


def test_module_level_calls_before_init_raise_runtime_error(env: dict[str, str]) -> None:
    """trackd.log() and trackd.finish() before any init() raise RuntimeError."""
    result = python(
        env,
        """
        import trackd
        for call in (lambda: trackd.log({"a": 1.0}), lambda: trackd.finish()):
            try:
                call()
            except RuntimeError as exc:
                print("RuntimeError:", exc)
            else:
                print("no error")
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("RuntimeError:") for line in lines), lines


def test_with_block_finishes_the_run(daemon: Daemon) -> None:
    """`with trackd.init(...) as run:` ends the run "finished" when the block completes."""
    daemon.start()
    with trackd.init(project="ctx", name="ok") as run:
        run.log({"x": 1.0})
    info = read_json(delivered(daemon, "ctx", "ok") / "run.json")
    assert (info["status"], info["error"]) == ("finished", None)


def test_with_block_that_raises_marks_the_run_failed(daemon: Daemon) -> None:
    """A with-block that raises ends the run "failed" with the traceback in "error"."""
    daemon.start()

    def train() -> None:
        with trackd.init(project="ctx", name="bad") as run:
            run.log({"x": 1.0})
            raise ZeroDivisionError("lr schedule divided by zero")

    with pytest.raises(ZeroDivisionError):
        train()
    directory = delivered(daemon, "ctx", "bad")
    info = read_json(directory / "run.json")
    assert info["status"] == "failed"
    assert "Traceback" in info["error"]
    assert "ZeroDivisionError: lr schedule divided by zero" in info["error"]
    assert "in train" in info["error"]
    assert len(rows_of(directory)) == 1


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [(None, "finished", None), (0, "finished", None), (3, "failed", "SystemExit: 3")],
)
def test_with_block_ended_by_sys_exit_is_failed_only_by_a_nonzero_code(
    daemon: Daemon, code: int | None, status: str, error: str | None
) -> None:
    """`sys.exit()` / `sys.exit(0)` in the block is a clean end, as for the process itself."""
    daemon.start()

    def train() -> None:
        with trackd.init(project="ctx", name=f"exit-{code}") as run:
            run.log({"x": 1.0})
            sys.exit(code)

    with pytest.raises(SystemExit):
        train()
    info = read_json(delivered(daemon, "ctx", f"exit-{code}") / "run.json")
    assert info["status"] == status
    assert (info["error"] is None) if error is None else (error in info["error"])


# --- process exit: excepthook and atexit -------------------------------------------

CRASHING_SCRIPT = """
import sys
import trackd
{hook}
run = trackd.init(project="crash", name="c")
run.log({{"x": 1.0}})
raise ValueError("boom-4711")
"""
CUSTOM_HOOK = """
def hook(kind, value, tb):
    print("CUSTOM-HOOK-RAN", file=sys.stderr, flush=True)
    sys.__excepthook__(kind, value, tb)
sys.excepthook = hook
"""


def test_uncaught_exception_marks_run_failed_with_traceback(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A script dying of an uncaught exception ends its run "failed" with the traceback."""
    daemon.start()
    result = python(env, CRASHING_SCRIPT.format(hook=""))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: boom-4711" in result.stderr
    directory = delivered(daemon, "crash", "c")
    info = read_json(directory / "run.json")
    assert info["status"] == "failed"
    assert "Traceback" in info["error"]
    assert "ValueError: boom-4711" in info["error"]
    assert len(rows_of(directory)) == 1


def test_uncaught_exception_still_runs_previous_excepthook(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """trackd's excepthook chains to the one installed before init(): it runs, the traceback too."""
    daemon.start()
    result = python(env, CRASHING_SCRIPT.format(hook=CUSTOM_HOOK))
    assert result.returncode == 1
    assert result.stderr.count("CUSTOM-HOOK-RAN") == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: boom-4711" in result.stderr
    assert read_json(delivered(daemon, "crash", "c") / "run.json")["status"] == "failed"


def test_atexit_finishes_a_run_the_script_left_open(daemon: Daemon, env: dict[str, str]) -> None:
    """A script that never calls finish() still ends its run "finished" with every row."""
    daemon.start()
    result = python(
        env,
        """
        import trackd
        run = trackd.init(project="exit", name="e")
        for i in range(2000):
            run.log({"i": i})
        """,
    )
    assert result.returncode == 0, result.stderr
    directory = delivered(daemon, "exit", "e")
    assert [row["i"] for row in rows_of(directory)] == list(range(2000))
    assert read_json(directory / "run.json")["status"] == "finished"


# --- modes -------------------------------------------------------------------------


def test_disabled_mode_is_a_no_op(daemon: Daemon, env: dict[str, str], tmp_path: Path) -> None:
    """mode="disabled": every call is a no-op; no file, no thread, no socket, nothing sent."""
    daemon.start()
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    local = tmp_path / "local"
    result = python(
        env,
        """
        import json, os, sys, threading
        import trackd
        from trackd.client import registry

        def counts():
            return (
                threading.active_count(),
                len(os.listdir("/proc/self/task")),
                len(os.listdir("/proc/self/fd")),
            )

        before = counts()
        run = trackd.init(project="off", name="d", mode="disabled", config={"a": 1},
                          dir=sys.argv[1])
        run.log({"loss": 1.0})
        run.log({"loss": 2.0}, step=5)
        trackd.log({"loss": 3.0})
        run.log_config({"b": 2})
        run.set_tags(["t"])
        run.set_summary({"s": 1})
        run.log_artifact(sys.argv[2])
        run.flush(timeout=1)
        run.finish()
        after = counts()
        print(json.dumps({"before": before, "after": after, "zmq": "zmq" in sys.modules,
                          "current after finish": repr(registry.current)}))
        """,
        str(local),
        str(artifact),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"] == report["before"], "disabled mode started a thread or opened a file"
    assert report["zmq"] is False, "disabled mode imported zmq (a socket was made)"
    assert report["current after finish"] == "None", "a finished disabled run stayed current"
    assert not local.exists()
    assert not list((daemon.data_dir / "spool").glob("*"))
    assert not (daemon.data_dir / "runs").exists() or not list((daemon.data_dir / "runs").iterdir())
    status = daemon.status()
    assert (status["ingest"]["messages"], status["runs"]["total"]) == (0, 0)


def test_offline_mode_spools_locally_and_a_daemon_delivers_the_spool(
    daemon: Daemon, tmp_path: Path
) -> None:
    """mode="offline" sends nothing; its spool under dir=, put in DATA_DIR/spool, is delivered."""
    daemon.start()
    local = tmp_path / "offline"
    run = trackd.init(project="air", name="gapped", mode="offline", dir=local, config={"k": 1})
    for step in range(300):
        run.log({"loss": 1.0 / (step + 1)})
    run.log_config({"extra": True})
    run.finish(timeout=30)
    status = daemon.status()
    assert (status["ingest"]["messages"], status["runs"]["total"]) == (0, 0), "offline sent"
    spools = list(local.glob("*.spool"))
    assert len(spools) == 1, f"expected one spool file under dir=, got {list(local.iterdir())}"

    moved = daemon.data_dir / "spool" / spools[0].name
    shutil.move(spools[0], moved)
    wait_for(lambda: not moved.exists(), timeout=30)
    directory = delivered(daemon, "air", "gapped")
    assert [row["step"] for row in rows_of(directory)] == list(range(300))
    assert read_json(directory / "config.json") == {"k": 1, "extra": True}
    assert read_json(directory / "run.json")["status"] == "finished"


# --- flush and finish --------------------------------------------------------------


def test_flush_returns_true_once_everything_before_it_is_durable(daemon: Daemon) -> None:
    """flush() returns True, and by then the daemon has stored every row logged before it."""
    daemon.start()
    run = trackd.init(project="fl", name="f")
    for step in range(1000):
        run.log({"i": step})
    assert run.flush(timeout=30) is True
    status = daemon.status()
    assert status["ingest"]["rows"] == 1000
    (known,) = daemon.request("runs")
    assert (known["id"], known["rows"], known["last_step"]) == (run.id, 1000, 999)
    run.finish(timeout=30)


def test_flush_without_daemon_returns_false_within_its_timeout(dirs: dict[str, Path]) -> None:
    """With no daemon, flush(timeout) returns False within about its timeout and never raises."""
    run = trackd.init(project="fl", name="nodaemon")
    run.log({"i": 0})
    started = time.monotonic()
    assert run.flush(timeout=0.5) is False
    assert time.monotonic() - started < 10
    run.finish(timeout=0.5)


def test_finish_without_daemon_returns_and_leaves_the_run_in_the_spool(
    daemon: Daemon, dirs: dict[str, Path]
) -> None:
    """With no daemon, finish(timeout) returns in about its timeout; a later daemon delivers all."""
    run = trackd.init(project="fin", name="late")
    for step in range(2000):
        run.log({"i": step})
    started = time.monotonic()
    run.finish(timeout=1.0)
    assert time.monotonic() - started < 15
    spools = list((dirs["data"] / "spool").glob("*.spool"))
    assert len(spools) == 1, "the undelivered run should wait in one spool file"
    daemon.start()
    wait_for(lambda: not spools[0].exists(), timeout=30)
    directory = delivered(daemon, "fin", "late")
    assert [row["i"] for row in rows_of(directory)] == list(range(2000))
    assert read_json(directory / "run.json")["status"] == "finished"


# --- fork and threads --------------------------------------------------------------


FORKING_SCRIPT = """
import json, os
import trackd

run = trackd.init(project="fork", name="f")
for i in range(50):
    run.log({"parent": i}, step=i)
if "--flush-first" in os.sys.argv:
    assert run.flush(timeout=30)
pid = os.fork()
if pid == 0:
    for j in range(30):
        run.log({"child": j}, step=1000 + j)
    ok = run.flush(timeout=30)
    os._exit(0 if ok else 3)
for i in range(50, 100):
    run.log({"parent": i}, step=i)
_, status = os.waitpid(pid, 0)
run.finish(timeout=30)
print(json.dumps({"child": os.waitstatus_to_exitcode(status)}))
"""


def assert_fork_rows(daemon: Daemon, result: Any) -> None:
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"child": 0}, (
        f"the child's flush() failed:\n{result.stderr}"
    )
    directory = delivered(daemon, "fork", "f")
    rows = rows_of(directory)
    parent = [row["step"] for row in rows if "parent" in row]
    child = [row["step"] for row in rows if "child" in row]
    assert sorted(parent) == list(range(100)), Counter(parent).most_common(3)
    assert sorted(child) == list(range(1000, 1030))
    assert len(rows) == 130
    assert read_json(directory / "run.json")["status"] == "finished"


def test_child_forked_right_after_init_logs_into_the_same_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A child forked just after init() logs into the parent's run; no parent row arrives twice."""
    daemon.start()
    assert_fork_rows(daemon, python(env, FORKING_SCRIPT))


def test_child_forked_while_delivering_logs_into_the_same_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A child forked once delivery is under way logs into the same run; no row arrives twice."""
    daemon.start()
    assert_fork_rows(daemon, python(env, FORKING_SCRIPT, "--flush-first"))


MULTIPROCESSING_SCRIPT = """
import json, multiprocessing, trackd

run = trackd.init(project="fork", name="mp")

def worker(index):
    for j in range(20):
        trackd.log({"worker": index}, step=100 * (index + 1) + j)

workers = [multiprocessing.get_context("fork").Process(target=worker, args=(i,)) for i in (0, 1)]
for process in workers:
    process.start()
for process in workers:
    process.join()
run.log({"parent": 1}, step=0)
run.finish(timeout=30)
print(json.dumps([process.exitcode for process in workers]))
"""


def test_rows_of_multiprocessing_workers_arrive_though_they_end_with_os_exit(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A worker that `multiprocessing` forks (as DataLoader's are) logs without a flush and
    returns; its process ends with `os._exit`, which skips atexit, and its rows still arrive."""
    daemon.start()
    result = python(env, MULTIPROCESSING_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [0, 0]
    rows = rows_of(delivered(daemon, "fork", "mp"))
    steps = sorted(row["step"] for row in rows)
    assert steps == [0, *range(100, 120), *range(200, 220)]


# Fault injection: the parent's delivery thread is held until its child has delivered and
# exited and the sinks have taken the child's rows, so the parent's run_start reaches the
# daemon after them (as it can under load when the child is forked right after init()).
PARENT_HELD = """
import os, threading
from trackd.client import transport

parent, gate = os.getpid(), threading.Event()
deliver = transport.Transport._pass

def held(self, socket):
    if os.getpid() == parent:
        gate.wait()
    deliver(self, socket)

transport.Transport._pass = held
"""


def test_a_child_whose_rows_reach_the_daemon_before_its_parents_run_start_logs_into_the_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A forked child's own session announces the run it logs to (a join), so its rows land
    in the run even when they reach the daemon before the parent's run_start."""
    daemon.start()
    waited = "_, status = os.waitpid(pid, 0)\n"
    assert waited in FORKING_SCRIPT
    delivered_then_released = "from trackd.client.control import request\n"
    delivered_then_released += "assert request('flush', timeout=65, wait=60)\ngate.set()\n"
    script = PARENT_HELD + FORKING_SCRIPT.replace(waited, waited + delivered_then_released)
    assert_fork_rows(daemon, python(env, script))


@pytest.mark.parametrize("own_steps", [False, True], ids=["counted", "given"])
def test_four_threads_logging_to_one_run_lose_and_reorder_nothing(
    daemon: Daemon, own_steps: bool
) -> None:
    """4 threads x 5,000 log() calls on one run: 20,000 rows, each once, each thread's in
    the order it logged them. Steps the run counts are 0..19,999 in the order they arrive
    (W&B drops a row whose step is below its last): the run's lock orders them. A row with
    its own step queues without that lock (one atomic list.extend), and past 64 waiting
    rows each thread packs into the transport's locked batch instead."""
    daemon.start()
    run = trackd.init(project="thr", name=f"t-{own_steps}")
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        start.wait()
        for i in range(5000):
            if own_steps:
                run.log({"thread": index, "i": i}, step=index * 5000 + i)
            else:
                run.log({"thread": index, "i": i})

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads change places every few bytecodes: races show
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    run.finish(timeout=60)
    rows = rows_of(delivered(daemon, "thr", f"t-{own_steps}"))
    assert len(rows) == 20_000
    assert Counter(row["thread"] for row in rows) == dict.fromkeys(range(4), 5000)
    for index in range(4):
        assert [row["i"] for row in rows if row["thread"] == index] == list(range(5000))
    if own_steps:
        assert all(row["step"] == row["thread"] * 5000 + row["i"] for row in rows)
    else:
        assert [row["step"] for row in rows] == list(range(20_000))


# --- the package surface -----------------------------------------------------------


def test_all_is_exactly_the_public_client_api() -> None:
    """trackd.__all__ names the client API (init, log, finish, alert, Run, media) and every
    name resolves."""
    assert set(trackd.__all__) - {"__version__"} == {
        "Histogram",
        "alert",
        "Image",
        "Run",
        "Table",
        "Video",
        "finish",
        "init",
        "log",
    }
    for name in trackd.__all__:
        assert getattr(trackd, name) is not None


def test_import_trackd_imports_no_heavy_library(env: dict[str, str]) -> None:
    """`import trackd` imports no sink SDK, NumPy, torch or the CLI stack (click, rich)."""
    heavy = ["wandb", "mlflow", "aim", "numpy", "torch", "tensorboardX", "trackio", "rich", "click"]
    result = python(
        env,
        """
        import json, sys
        import trackd
        print(json.dumps(sorted(name for name in sys.argv[1:] if name in sys.modules)))
        """,
        *heavy,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
