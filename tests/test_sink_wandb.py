"""W&B sink, offline, through a real daemon and real clients, read back from the runs'
own transaction logs under WANDB_DIR (tests/helpers/wandb_log.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from conftest import Daemon, finish_client, meta_client, run_client, wait_for
from helpers import until_client
from helpers.wandb_log import Session, read_runs, wandb_env
from test_system_metrics import samples

ROWS = 2000


def steps(sessions: list[Session]) -> list[int]:
    return [row["_step"] for session in sessions for row in session.history]


def assert_every_step_once(sessions: list[Session], rows: int) -> None:
    assert steps(sessions) == list(range(rows))
    assert [row["i"] for s in sessions for row in s.history] == list(range(rows))


def test_runs_at_once_are_w_and_b_runs_with_steps_config_summary_and_status(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Two runs logged at once and a run using every record type: three W&B runs, each
    with the trackd run id, project and name; every step once; config, tags, summary
    and the exit code (failed -> 1) in its log."""
    daemon.start("--sink", "wandb:*", extra_env=wandb_env(tmp_path))
    names = ["alpha", "beta"]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    meta = meta_client(env, "--name", "meta")
    ids = {name: finish_client(client)["id"] for name, client in zip(names, clients, strict=True)}
    meta_id = finish_client(meta)["id"]
    daemon.flush()
    assert daemon.stop() == 0

    runs = read_runs(tmp_path / "wandb" / "wandb")
    assert sorted(runs) == sorted([*ids.values(), meta_id])
    for name, run_id in ids.items():
        (session,) = runs[run_id]
        assert (session.project, session.name) == ("p", name)
        assert_every_step_once([session], ROWS)
        assert session.history[5]["_timestamp"] > 1e9
        assert session.config["rows"] == ROWS
        assert session.config["trackd"]["run_id"] == run_id
        assert session.summary["i"] == ROWS - 1
        assert session.summary["trackd/status"] == "finished"
        assert session.exit_code == 0

    (meta_run,) = runs[meta_id]
    assert (meta_run.project, meta_run.name) == ("vision", "meta")
    assert [row["_step"] for row in meta_run.history] == list(range(50))
    assert meta_run.config["lr"] == 0.001
    assert meta_run.config["optimizer"] == {"name": "adam", "betas": [0.9, 0.99]}
    assert meta_run.config["epochs"] == 3
    assert sorted(meta_run.tags) == ["stage:ablation", "team:cv"]
    assert meta_run.summary["best_loss"] == 0.02
    assert meta_run.summary["trackd/status"] == "failed"
    assert meta_run.exit_code == 1
    [artifact] = meta_run.artifacts
    digest = hashlib.sha256(b"weights").hexdigest()
    assert (artifact["name"], artifact["type"], artifact["aliases"]) == (
        "weights.bin",
        "unspecified",
        ["latest"],
    )
    assert artifact["metadata"] == {"trackd.artifact": {"name": "weights.bin", "sha256": digest}}
    [entry] = artifact["files"]
    assert (entry["path"], entry["size"]) == ("weights.bin", 7)
    # not copied: the manifest points at trackd's store, which wandb sync uploads from
    assert entry["local_path"] == str(daemon.data_dir / "artifacts" / digest[:2] / digest)


def test_sigkill_mid_run_and_restart_still_every_step_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while three runs log. wandb-core may lose the unfinished
    block of each log; the sink re-logs what was lost into the resumed W&B run and skips
    what is there: across each run's sessions every step is there once."""
    extra_env = wandb_env(tmp_path)
    wandb_dir = tmp_path / "wandb" / "wandb"
    stop = tmp_path / "stop"
    daemon.start("--sink", "wandb:*", extra_env=extra_env)
    # Two fast runs, and a slow one (a row every 20 ms) whose rows sit in an unfinished
    # block of its log long after the checkpoint has passed them: only the rows the
    # sink keeps in its checkpoint can bring those back.
    paces = {"k0": (100, 0.1), "k1": (100, 0.1), "slow": (1, 0.02)}
    clients = [until_client.start(env, name, stop, *pace) for name, pace in paces.items()]
    for kill in (1, 2):
        # Kill once every run has logged into a session of this daemon.
        logged = 3 * kill
        wait_for(lambda: len(list(wandb_dir.glob("offline-run-*/*.wandb"))) >= logged, 60)  # noqa: B023
        time.sleep(0.7)
        daemon.kill()
        daemon.start("--sink", "wandb:*", extra_env=extra_env)
    stop.touch()
    results = [finish_client(client) for client in clients]
    daemon.flush()
    assert daemon.stop() == 0

    runs = read_runs(wandb_dir)
    assert sorted(runs) == sorted(result["id"] for result in results)
    for name, result in zip(paces, results, strict=True):
        sessions = runs[result["id"]]
        # (The slow run's first sessions may have lost everything: nothing to resume.)
        assert name == "slow" or len(sessions) >= 2, "the run was resumed after a kill"
        assert {(s.project, s.name) for s in sessions} == {("p", name)}
        assert_every_step_once(sessions, result["rows"])
        assert sessions[0].config["until"] == str(stop)
        assert sessions[-1].exit_code == 0


def test_sigkill_mid_run_every_artifact_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while a run logs rows and an artifact every 20 rows: the
    artifacts the unfinished block of a log lost are logged again in the resumed run and
    the re-sent ones already stored are skipped, so across the run's sessions each
    artifact is there once, pointing at its content in trackd's store."""
    extra_env = wandb_env(tmp_path)
    wandb_dir = tmp_path / "wandb" / "wandb"
    stop = tmp_path / "stop"
    daemon.start("--sink", "wandb:*", extra_env=extra_env)
    client = until_client.start(env, "art", stop, per_tick=1, tick=0.02, artifact_every=20)
    for kill in (1, 2):
        wait_for(lambda: len(list(wandb_dir.glob("offline-run-*/*.wandb"))) >= kill, 60)  # noqa: B023
        time.sleep(1.5)
        daemon.kill()
        daemon.start("--sink", "wandb:*", extra_env=extra_env)
    stop.touch()
    result = finish_client(client)
    daemon.flush()
    assert daemon.stop() == 0

    sessions = read_runs(wandb_dir)[result["id"]]
    assert len(sessions) >= 2, "the run was resumed after a kill"
    assert steps(sessions) == list(range(result["rows"]))
    logged = [artifact for session in sessions for artifact in session.artifacts]
    names = [artifact["name"] for artifact in logged]
    assert sorted(names) == sorted(result["artifacts"]), "each artifact once"
    assert len(names) > 10
    for artifact in logged:
        digest = result["artifacts"][artifact["name"]]
        assert artifact["metadata"]["trackd.artifact"]["sha256"] == digest
        [entry] = artifact["files"]
        stored = Path(entry["local_path"])
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest


def test_sigkill_mid_run_every_console_line_alert_and_system_sample_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon, sampling the system every 0.5 s, SIGKILLed twice while a run logs rows,
    prints a line every 5 steps and sends an alert every 25: the stats, console and alert
    records the unfinished block of a log lost are written again in the resumed run and the
    re-sent ones already stored are skipped. Across the run's sessions every line is there
    once and in order (in the logs and in files/output.log), every alert once, and every
    system sample the daemon's jsonl sink holds once in W&B's stats."""
    extra_env = {**wandb_env(tmp_path), "TRACKD_SYSTEM_INTERVAL": "0.5"}
    wandb_dir = tmp_path / "wandb" / "wandb"
    sinks = ("--sink", "wandb:*", "--sink", f"jsonl:{daemon.data_dir / 'runs'}")
    stop = tmp_path / "stop"
    daemon.start(*sinks, extra_env=extra_env)
    client = until_client.start(
        env, "noisy", stop, per_tick=1, tick=0.02, console_every=5, alert_every=25
    )
    for kill in (1, 2):
        # Kill once this daemon has handed W&B a few samples, lines and alerts: with a row
        # every 20 ms they all still sit in the unfinished first block of the session's log.
        wait_for(lambda: len(list(wandb_dir.glob("offline-run-*/*.wandb"))) >= kill, 60)  # noqa: B023
        sampled = len(samples(daemon.data_dir, "noisy", project="p"))
        wait_for(lambda: len(samples(daemon.data_dir, "noisy", project="p")) >= sampled + 3, 60)  # noqa: B023
        daemon.kill()
        daemon.start(*sinks, extra_env=extra_env)
    stop.touch()
    result = finish_client(client)
    daemon.flush()
    assert daemon.stop() == 0

    sessions = read_runs(wandb_dir)[result["id"]]
    assert len(sessions) >= 2, "the run was resumed after a kill"
    assert steps(sessions) == list(range(result["rows"]))
    printed = [f"{line}\n" for line in result["lines"]]
    assert [text for s in sessions for _, text in s.output] == printed
    assert "".join(session.output_log for session in sessions) == "".join(printed)
    alerts = [alert["title"] for session in sessions for alert in session.alerts]
    assert sorted(alerts) == sorted(result["alerts"])
    sampled = [row["ts"] for row in samples(daemon.data_dir, "noisy", project="p")]
    assert len(sampled) >= 6
    stats = [sample["_timestamp"] for session in sessions for sample in session.stats]
    assert sorted(stats) == sorted(sampled)
