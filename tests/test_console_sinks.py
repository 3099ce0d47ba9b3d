"""Console lines and code state in each backend, read back with the backend's own reader:
MLflow (a real server), W&B offline (its transaction log and files/output.log), Aim (a
real repo); TensorBoard and Trackio count a notice."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, Daemon
from helpers.wandb_log import read_runs
from mlflow_server import MlflowServer
from test_code_state import SECRET, git, repo  # noqa: F401 (repo: a fixture)
from test_console import CHILD_LINE, LAST_LINE, PARENT_LINES, console_script
from test_sink_aim import read_aim
from test_sink_mlflow import mlflow_client, runs_of, server, server_process  # noqa: F401
from test_sink_wandb import wandb_env
from trackd.sinks import console_parts
from trackd.sinks.base import Record, RunInfo, SinkContext

SCRIPT = str(HELPERS / "console_client.py")
REMOTE = "https://example.com/org/repo.git"


def assert_console(lines: list[str]) -> None:
    """The helper's lines: the child's once, anywhere; the parent's in order."""
    assert lines.count(CHILD_LINE) == 1, lines
    assert [line for line in lines if line != CHILD_LINE] == [*PARENT_LINES, LAST_LINE]


def dirty_script(env: dict[str, str], repo: Path, name: str) -> None:  # noqa: F811
    """The console helper run from a dirty checkout of `repo`."""
    (repo / "train.py").write_text("lr = 0.5\n")
    console_script(env, "--name", name, cwd=repo)


def test_mlflow_gets_console_parts_and_source_tags(
    server: MlflowServer,  # noqa: F811
    daemon: Daemon,
    env: dict[str, str],
    repo: Path,  # noqa: F811
) -> None:
    """MLflow: the console as artifact parts console/console-*.log (concatenated: every line
    once, in order), the tags MLflow's client sets from the code, and diff.patch."""
    daemon.start("--sink", f"mlflow:{server.uri}")
    dirty_script(env, repo, "mlflow")
    daemon.flush()
    run = runs_of(server.uri, "console")["mlflow"]
    client = mlflow_client(server.uri)
    parts = sorted(item.path for item in client.list_artifacts(run.info.run_id, "console"))
    assert parts, "no console parts"
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run.info.run_id, "console", folder))
        text = "".join((local / Path(part).name).read_text() for part in parts)
        diff = Path(client.download_artifacts(run.info.run_id, "diff.patch", folder)).read_text()
    assert_console(text.split("\n")[:-1])
    assert diff == git(repo, "diff", "HEAD")
    tags = run.data.tags
    assert {key: tags.get(key) for key in SOURCE_TAGS} == {
        "mlflow.source.name": SCRIPT,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": git(repo, "rev-parse", "HEAD").strip(),
        "mlflow.source.git.branch": "main",
        "mlflow.source.git.repoURL": REMOTE,
        "mlflow.source.git.dirty": "true",
    }
    assert SECRET not in str(tags)


SOURCE_TAGS = (
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
    "mlflow.source.git.branch",
    "mlflow.source.git.repoURL",
    "mlflow.source.git.dirty",
)


def test_wandb_gets_output_records_output_log_and_environment(
    daemon: Daemon,
    env: dict[str, str],
    tmp_path: Path,
    repo: Path,  # noqa: F811
) -> None:
    """W&B offline: console lines as wandb's output records (stream kept) and in
    files/output.log; code and env as wandb's EnvironmentRecord (program, args, git)."""
    daemon.start("--sink", "wandb:*", extra_env=wandb_env(tmp_path))
    dirty_script(env, repo, "wandb")
    daemon.flush()
    assert daemon.stop() == 0
    (sessions,) = read_runs(tmp_path / "wandb" / "wandb").values()
    (session,) = sessions
    text = "".join(line for _, line in session.output)
    assert_console(text.split("\n")[:-1])
    assert ("stderr", "an error line\n") in session.output
    assert ("stdout", "hello 0\n") in session.output
    output_log = (session.path.parent / "files" / "output.log").read_text()
    assert_console(output_log.split("\n")[:-1])
    assert session.environment == {
        "program": SCRIPT,
        "args": ["--name", "wandb"],
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "host": session.environment["host"],
        "git": {"remote_url": REMOTE, "commit": git(repo, "rev-parse", "HEAD").strip()},
    }


def test_aim_gets_terminal_logs_and_system_params(
    daemon: Daemon,
    env: dict[str, str],
    tmp_path: Path,
    repo: Path,  # noqa: F811
) -> None:
    """Aim: console lines as its terminal logs (LogLine per step), code/env as params
    trackd.code / trackd.env and __system_params (git_info, executable, arguments)."""
    aim_repo = tmp_path / "aim"
    daemon.start("--sink", f"aim:{aim_repo}")
    dirty_script(env, repo, "aim")
    daemon.flush()
    assert daemon.stop() == 0
    run = read_aim(env, aim_repo)["aim"]
    assert_console(run["terminal_logs"])
    params = run["params"]
    commit = git(repo, "rev-parse", "HEAD").strip()
    assert params["trackd"]["code"] == {
        "commit": commit,
        "branch": "main",
        "remote": REMOTE,
        "dirty": True,
    }
    assert params["trackd"]["env"]["argv"] == [SCRIPT, "--name", "aim"]
    system = params["__system_params"]
    assert system["git_info"]["commit"]["hash"] == commit
    assert system["git_info"]["remote_origin_url"] == REMOTE
    assert (system["executable"], system["arguments"]) == (
        sys.executable,
        [SCRIPT, "--name", "aim"],
    )


@pytest.mark.parametrize("kind", ["tensorboard", "trackio"])
def test_tensorboard_and_trackio_count_a_notice(
    daemon: Daemon, env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    """Backends without a console form skip console records with a counted notice."""
    target = tmp_path / kind if kind == "tensorboard" else "console-notice"
    extra = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    daemon.start("--sink", f"{kind}:{target}", extra_env=extra)
    console_script(env, "--name", kind, "--no-fork")
    daemon.flush()
    (sink,) = daemon.status()["sinks"].values()
    notices = {text: count for text, count in sink["notices"].items() if "console" in text}
    assert notices, sink
    assert sink["dead_letters"] == 0


# --- MLflow's console parts across a crash, in process on a file store --------------------


def console_record(run: RunInfo, position: int, ts: float, text: str) -> Record:
    return Record((0, position), "console", run, {"lines": [[ts, "stdout", text]]})


def test_mlflow_console_parts_are_exactly_once_across_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records re-sent from an older cursor after a "crash" rebuild the same parts from the
    checkpointed open part: concatenated, every line once, in order; parts close by size
    and by the lines' own times, never by when a batch was written."""
    from trackd.sinks.mlflow import MlflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(console_parts, "PART_CHARS", 40)
    monkeypatch.setattr(console_parts, "UPLOAD_SECONDS", 0.0)
    uri = f"file:{tmp_path}/mlruns"
    started = time.time()
    run = RunInfo("c" * 32, "parts", "crash", started=started)
    start = Record((0, 0), "run_start", run, {"started": started})
    lines = [f"line {index:03d}" for index in range(30)]
    # a line 2 minutes after the one before it starts a new part, whatever its size
    times = [started + index + (120 if index == 17 else 0) for index in range(30)]
    records = [console_record(run, i + 1, times[i], text) for i, text in enumerate(lines)]
    end = Record((0, 31), "run_end", run, {"status": "finished", "error": None, "ended": 2e9})

    def opened(state: dict[str, Any] | None) -> MlflowSink:
        sink = MlflowSink(uri)
        sink.open(SinkContext(state, tmp_path / "state"))
        return sink

    sink = opened(None)
    sink.write([start, *records[:10]])
    saved = sink.checkpoint()  # the cursor is saved here, after record 10
    sink.write(records[10:20])  # then the daemon dies before the next checkpoint
    sink.close()
    sink = opened(saved)
    sink.write([*records[10:], end])  # the fan-out re-sends from the cursor
    sink.close()

    client = mlflow_client(uri)
    (found,) = runs_of(uri, "parts").values()
    parts = sorted(item.path for item in client.list_artifacts(found.info.run_id, "console"))
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(found.info.run_id, "console", folder))
        texts = [(local / Path(part).name).read_text() for part in parts]
    assert "".join(texts).split("\n")[:-1] == lines
    assert len(parts) >= 3
    assert any(text.startswith("line 017\n") for text in texts), "the time gap starts a part"


AIM_CRASH = """
import sys, time
from pathlib import Path
from trackd.sinks.aim import AimSink
from trackd.sinks.base import Record, RunInfo, SinkContext

repo, state_dir, saved_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
started = time.time()
run = RunInfo("a" * 32, "terminal", "crash", started=started)
start = Record((0, 0), "run_start", run, {"started": started})
records = [
    Record((0, i + 1), "console", run, {"lines": [[started + i, "stdout", f"line {i:03d}"]]})
    for i in range(30)
]
end = Record((0, 31), "run_end", run, {"status": "finished", "error": None, "ended": 2e9})

def opened(state):
    sink = AimSink(str(repo))
    sink.open(SinkContext(state, state_dir))
    return sink

sink = opened(None)
saved = sink.checkpoint()
sink.write([start, *records[:10]])
if saved_at == "mid-console":
    saved = sink.checkpoint()
sink.write(records[10:20])
sink.close()  # the daemon dies: the next one starts from the saved cursor
sink = opened(saved)
resent = [start, *records] if saved_at == "before-the-run-start" else records[10:]
sink.write([*resent, end])
sink.close()
"""


@pytest.mark.parametrize("saved_at", ["before-the-run-start", "mid-console"])
def test_aim_terminal_logs_are_exactly_once_across_a_crash(
    tmp_path: Path, env: dict[str, str], saved_at: str
) -> None:
    """Records re-sent after a "crash" (from a checkpoint taken before the run_start, or
    among the console records) land on the steps they had: every line once, in order.
    (The sink runs in a process of its own: Aim keeps state and warnings process-wide.)"""
    repo_path = tmp_path / "aim"
    subprocess.run(
        [sys.executable, "-c", AIM_CRASH, str(repo_path), str(tmp_path / "state"), saved_at],
        env=env,
        check=True,
        timeout=300,
    )
    expected = [f"line {index:03d}" for index in range(30)]
    assert read_aim(env, repo_path)["crash"]["terminal_logs"] == expected
