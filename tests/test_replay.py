"""`trackd replay`: spools and data dirs delivered to sinks, idempotently."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from mlflow_server import MlflowServer


def replay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(env, "replay", *args, timeout=120)


def offline_run(env: dict[str, str], spools: Path, name: str, rows: int) -> None:
    finish_client(
        run_client(
            {**env, "TRACKD_DATA_DIR": str(spools.parent)},
            "--name",
            name,
            "--rows",
            str(rows),
            "--mode",
            "offline",
        )
    )


def test_offline_spool_replayed_twice_into_jsonl_lands_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """An offline run replayed twice into a JSONL sink has every row exactly once."""
    spools = tmp_path / "air-gapped" / "spool"
    offline_run(env, spools, "off", 5000)
    assert len(list(spools.glob("*.spool"))) == 1
    out = tmp_path / "out"
    for _ in range(2):
        result = replay(env, str(spools), "--sink", f"jsonl:{out}")
        assert result.returncode == 0, result.stderr
    runs = jsonl_runs(out)
    assert len(runs) == 1
    assert [row["step"] for row in next(iter(runs.values()))] == list(range(5000))
    assert "5000 rows" not in result.stdout, "the second replay delivered nothing new"


def test_copied_spool_is_still_replayed_once(tmp_path: Path, env: dict[str, str]) -> None:
    """Idempotence is by content: the same spool copied elsewhere is not delivered again."""
    spools = tmp_path / "a" / "spool"
    offline_run(env, spools, "copied", 1000)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in spools.glob("*.spool"):
        (copy / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    for source in (spools, copy):
        assert replay(env, str(source), "--sink", f"jsonl:{out}").returncode == 0
    assert [len(rows) for rows in jsonl_runs(out).values()] == [1000]


def test_run_filter_replays_only_that_run(tmp_path: Path, env: dict[str, str]) -> None:
    """--run delivers one run of a spool folder holding two."""
    spools = tmp_path / "a" / "spool"
    offline_run(env, spools, "keep", 300)
    offline_run(env, spools, "skip", 300)
    out = tmp_path / "out"
    assert replay(env, str(spools), "--run", "keep", "--sink", f"jsonl:{out}").returncode == 0
    assert [name.rsplit("-", 1)[0] for name in jsonl_runs(out)] == ["keep"]


def test_daemon_data_dir_replays_into_a_new_sink(daemon: Daemon, env: dict[str, str]) -> None:
    """A daemon's data dir (its WAL) replays, after the daemon stopped, into another sink."""
    daemon.start()
    finish_client(run_client(env, "--name", "live", "--rows", "4000"))
    daemon.flush()
    assert daemon.stop() == 0
    out = daemon.data_dir.parent / "elsewhere"
    result = replay(env, str(daemon.data_dir), "--sink", f"jsonl:{out}")
    assert result.returncode == 0, result.stderr
    assert [row["step"] for row in next(iter(jsonl_runs(out).values()))] == list(range(4000))


def test_data_dir_holding_a_message_in_its_wal_and_in_a_spool_replays_it_once(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """A daemon stopped before it let go of a spool it had ingested (a client's, or one
    that `replay --into-daemon` handed over) leaves each of its messages in the WAL and in
    the spool: a replay of the data dir delivers each once, as the daemon itself stores it."""
    offline_run(env, dirs["data"] / "spool", "twice", 3000)
    (spool,) = (dirs["data"] / "spool").glob("*.spool")
    kept = spool.read_bytes()
    daemon.start()
    wait_for(lambda: not spool.exists())
    daemon.flush()
    assert daemon.stop() == 0
    spool.write_bytes(kept)
    out = dirs["root"] / "elsewhere"
    result = replay(env, str(dirs["data"]), "--sink", f"jsonl:{out}")
    assert result.returncode == 0, result.stderr
    assert [row["step"] for row in next(iter(jsonl_runs(out).values()))] == list(range(3000))


def test_into_daemon_hands_the_spool_to_the_running_daemon(
    tmp_path: Path, daemon: Daemon, env: dict[str, str]
) -> None:
    """--into-daemon copies the spool where the daemon picks it up and delivers it."""
    spools = tmp_path / "a" / "spool"
    offline_run(env, spools, "handed", 2000)
    daemon.start()
    result = replay(env, str(spools), "--into-daemon")
    assert result.returncode == 0, result.stderr
    daemon.flush()
    wait_for(lambda: daemon.status()["ingest"]["rows"] == 2000)
    daemon.flush()
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert [row["step"] for row in next(iter(runs.values()))] == list(range(2000))


def test_unreadable_source_and_bad_spec_fail_in_one_line(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A missing source exits 1, a bad spec exits 2, each with one line and no traceback."""
    missing = replay(env, str(tmp_path / "nope"), "--sink", f"jsonl:{tmp_path}")
    assert missing.returncode == 1
    assert len(missing.stderr.strip().splitlines()) == 1
    spools = tmp_path / "a" / "spool"
    offline_run(env, spools, "x", 10)
    bad = replay(env, str(spools), "--sink", "nosuchkind:x")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr + bad.stderr


def test_a_source_with_nothing_to_replay_fails_in_one_line(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A file that holds no trackd record (random bytes named .spool, a text file), a run
    the source does not have, and `--run` with `--into-daemon` (which hands over whole
    spools) each exit non-zero with one line on stderr, and deliver nothing."""
    garbage = tmp_path / "g.spool"
    garbage.write_bytes(bytes(range(256)) * 8)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    spools = tmp_path / "a" / "spool"
    offline_run(env, spools, "real", 10)
    out = tmp_path / "out"
    for args, code, says in [
        ((str(garbage),), 1, "holds no readable trackd records"),
        ((str(text),), 1, "holds no readable trackd records"),
        ((str(spools), "--run", "other"), 1, "holds no run 'other'"),
    ]:
        result = replay(env, *args, "--sink", f"jsonl:{out}")
        assert (result.returncode, result.stderr.strip().count("\n")) == (code, 0), result
        assert says in result.stderr
    handed = replay(env, str(spools), "--run", "real", "--into-daemon")
    assert handed.returncode == 2
    assert "--into-daemon hands whole spools over" in handed.stderr
    assert not out.exists()


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
def test_offline_spool_replayed_twice_into_mlflow_lands_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The same offline run replayed twice into a real MLflow server: every step once."""
    spools = tmp_path / "air-gapped" / "spool"
    offline_run(env, spools, "to-mlflow", 3000)
    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    try:
        server.start()
        for _ in range(2):
            result = replay(env, str(spools), "--sink", f"mlflow:{server.uri}")
            assert result.returncode == 0, result.stderr
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("p")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(3000))
        assert run.info.status == "FINISHED"
    finally:
        server.kill()


RUN_WITH_FILES = """
import os, sys
import numpy as np
import trackd

run = trackd.init(project="far", name="files", mode="offline", dir=os.environ.get("RUN_DIR"))
run.log({"loss": 0.5, "sample": trackd.Image(np.full((8, 8, 3), 200, dtype=np.uint8))}, step=0)
run.log({"preds": trackd.Table(columns=["x"], data=[[1], [2]])}, step=1)
with open(sys.argv[1], "wb") as weights:
    weights.write(b"weights " * 1000)
run.log_artifact(sys.argv[1], name="weights.bin")
os.remove(sys.argv[1])
run.finish()
"""


@pytest.mark.parametrize("kept_in", ["data dir", "init dir"])
def test_a_source_copied_off_its_machine_replays_with_its_files(
    tmp_path: Path, env: dict[str, str], kept_in: str
) -> None:
    """`replay` of a folder copied off the machine that logged it (the cluster's data dir,
    or a run's `init(dir=...)`) delivers the run's artifacts and media too: the records
    name files by their paths there, and the copy's own store has them."""
    cluster = tmp_path / "cluster"
    data_dir, run_dir = cluster / "data", cluster / "run"
    run_env = {**env, "TRACKD_DATA_DIR": str(data_dir)}
    if kept_in == "init dir":
        run_env["RUN_DIR"] = str(run_dir)
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITH_FILES, str(tmp_path / "weights.bin")],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    logged = data_dir if kept_in == "data dir" else run_dir
    if kept_in == "init dir":
        assert not (data_dir / "artifacts").exists(), "a run's files go under its dir="
    copy = tmp_path / "laptop" / "copy"
    shutil.copytree(logged, copy)
    shutil.rmtree(cluster)
    out = tmp_path / "out"
    result = replay(env, str(copy), "--sink", f"jsonl:{out}")
    assert result.returncode == 0, result.stderr
    assert "0 dead letters" in result.stdout, result.stdout
    (run_out,) = (out / "far").iterdir()
    assert (run_out / "artifacts" / "weights.bin").read_bytes() == b"weights " * 1000
    media = sorted(path.parent.name for path in (run_out / "media").glob("*/*"))
    assert media == ["preds", "sample"]


def test_a_file_is_looked_up_in_a_copied_store_only_by_a_sha256(tmp_path: Path) -> None:
    """A record's digest names a file in the copy's store, and nothing else: one that is
    not a sha256 (a path that would climb out of the store) leaves the record as it is."""
    from trackd.daemon.replay import relocated

    store = tmp_path / "copy" / "artifacts"
    digest = "ab" * 32
    (store / "ab").mkdir(parents=True)
    (store / "ab" / digest).write_bytes(b"weights")
    gone = str(tmp_path / "cluster" / "artifacts" / "ab" / digest)

    def record(sha256: str) -> dict[str, object]:
        return {"t": "artifact", "b": {"path": gone, "sha256": sha256, "name": "w.bin"}}

    assert relocated(record(digest), [store])["b"]["path"] == str(store / "ab" / digest)
    # each of these, joined as a digest is, names a file outside the store: one short, one
    # of a sha256's length
    for climbing in ("../secret", "../" + "./" * 28 + "sec64"):
        outside = store / climbing[:2] / climbing
        outside.resolve().write_bytes(b"not the run's")
        assert outside.resolve().parent == tmp_path
        assert relocated(record(climbing), [store])["b"]["path"] == gone
    assert len("../" + "./" * 28 + "sec64") == 64
