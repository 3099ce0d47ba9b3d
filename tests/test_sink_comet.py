"""Comet sink through a real daemon and real clients, read back from Comet's own offline
archives (tests/helpers/comet_archive.py): what `comet upload` would send. Comet's
servers are never contacted: its URL is a loopback port nobody listens on."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, cli, finish_client, meta_client, run_client, wait_for
from helpers import until_client
from helpers.comet_archive import Archive, comet_env, metric_steps, read_archives
from test_media import log_media
from trackd.sinks.base import SinkSpec

ROWS = 300


def offline_spec(root: Path) -> str:
    return f"comet:*?offline_directory={root / 'comet'}"


def upload_name(upload: dict[str, Any]) -> str:
    """An asset's name, an image's figure name."""
    params = upload["additional_params"]
    name: str = params.get("fileName") or params["figName"]
    return name


def assert_every_step_once(archives: list[Archive], rows: int) -> None:
    for name in ("i", "loss"):
        assert metric_steps(archives, name) == list(range(rows)), name
    values = [m["metricValue"] for a in archives for m in a.metrics if m["metricName"] == "i"]
    assert values == list(range(rows))


def test_runs_are_experiments_with_steps_parameters_tags_others_and_assets(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Two runs at once, a run using every record type and a run with media: one archive
    each (nothing was killed), named by the key the daemon keeps; every step once; config
    as parameters, tags as tags, summary and the end status as others, the artifact and
    the media as assets of Comet's own kinds."""
    daemon.start("--sink", offline_spec(tmp_path), extra_env=comet_env(tmp_path))
    clients = {name: run_client(env, "--name", name, "--rows", str(ROWS)) for name in ("a", "b")}
    meta = meta_client(env, "--name", "meta")
    ids = {name: finish_client(client)["id"] for name, client in clients.items()}
    meta_id = finish_client(meta)["id"]
    media_id = log_media(env)
    daemon.flush()
    assert daemon.stop() == 0

    found = read_archives(tmp_path / "comet")
    keys = {run_id: hashlib.sha256(run_id.encode()).hexdigest()[:32] for run_id in ids.values()}
    assert len(found) == 4
    for name, run_id in ids.items():
        (archive,) = found[keys[run_id]]
        assert archive.name == f"{keys[run_id]}.zip"
        assert (archive.meta["project_name"], archive.meta["resume_strategy"]) == ("p", "create")
        assert archive.others["Name"] == name
        assert archive.others["trackd.run_id"] == run_id
        assert archive.others["trackd.status"] == "finished"
        assert archive.parameters["rows"] == ROWS
        assert_every_step_once([archive], ROWS)

    (meta_run,) = found[hashlib.sha256(meta_id.encode()).hexdigest()[:32]]
    assert meta_run.meta["project_name"] == "vision"
    assert sorted(meta_run.meta["tags"]) == ["stage:ablation", "team:cv"]
    assert meta_run.parameters == {
        "lr": 0.001,
        "optimizer|name": "adam",
        "optimizer|betas": [0.9, 0.99],
        "epochs": 3,
    }
    assert metric_steps([meta_run], "loss") == list(range(50))
    assert meta_run.others["best_loss"] == 0.02
    assert meta_run.others["trackd.status"] == "failed"
    [artifact] = meta_run.uploads
    assert artifact["additional_params"]["fileName"] == "weights.bin"
    digest = hashlib.sha256(b"weights").hexdigest()
    assert artifact["metadata"]["trackd.artifact"] == {"name": "weights.bin", "sha256": digest}
    assert meta_run.files[artifact["file_path"]] == b"weights"

    (media,) = found[hashlib.sha256(media_id.encode()).hexdigest()[:32]]
    uploads = {upload_name(u): u for u in media.uploads}
    kinds = {(u["upload_type"], k, u["additional_params"]["step"]) for k, u in uploads.items()}
    assert kinds == {
        ("visualization", "img/array", 0),
        ("visualization", "img/pil", 1),
        ("visualization", "img/file", 2),
        ("asset", "preds-3.csv", 3),
        ("video", "clip", 4),
        ("video", "grid", 5),
    }
    assert uploads["img/array"]["metadata"] == {"caption": "gradient"}
    assert uploads["clip"]["metadata"] == {"caption": "clip"}
    table = media.files[uploads["preds-3.csv"]["file_path"]].decode().splitlines()
    assert table == ["text,score", "a,1.5", "b,2.0"]
    assert media.files[uploads["img/file"]["file_path"]].startswith(b"\x89PNG")
    assert metric_steps([media], "loss") == list(range(7))


def test_sigkill_twice_mid_run_every_step_and_artifact_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while two runs log rows (one an artifact every 20 rows):
    each killed session is salvaged into an archive holding what its marks say it holds,
    the resumed sessions continue the same experiment, and across the archives of each
    experiment every step and every artifact is there once."""
    extra_env = comet_env(tmp_path)
    spec = offline_spec(tmp_path)
    name = SinkSpec.parse(spec).name
    stop = tmp_path / "stop"
    daemon.start("--sink", spec, extra_env=extra_env)
    clients = [
        until_client.start(env, "fast", stop, per_tick=50, tick=0.05),
        until_client.start(env, "art", stop, per_tick=1, tick=0.02, artifact_every=20),
    ]
    for _ in range(2):
        # Kill mid-stream, once this daemon (its counts start at 0) has delivered some rows.
        wait_for(lambda: daemon.status()["sinks"][name]["delivered_rows"] > 200, 60)
        time.sleep(0.3)
        daemon.kill()
        daemon.start("--sink", spec, extra_env=extra_env)
    # Two kills can come within 2.5 s, before the "art" client's sixth artifact (one every
    # 0.4 s): the run goes on until its store holds the six that the check below needs.
    store = Path(env["TRACKD_DATA_DIR"]) / "artifacts"
    wait_for(lambda: len([p for p in store.glob("*/*") if "partial" not in p.name]) > 5, 60)
    stop.touch()
    results = [finish_client(client) for client in clients]
    daemon.flush()
    assert daemon.stop() == 0

    found = read_archives(tmp_path / "comet")
    assert len(found) == 2
    for result in results:
        key = hashlib.sha256(result["id"].encode()).hexdigest()[:32]
        archives = found[key]
        assert len(archives) >= 3, "two killed sessions salvaged, and the last one"
        assert [a.meta["resume_strategy"] for a in archives] == ["create"] + ["get"] * (
            len(archives) - 1
        )
        assert_every_step_once(archives, result["rows"])
        assert archives[-1].others["trackd.status"] == "finished"
    artifacts = found[hashlib.sha256(results[1]["id"].encode()).hexdigest()[:32]]
    logged = [(a, u) for a in artifacts for u in a.uploads]
    names = [u["additional_params"]["fileName"] for _, u in logged]
    assert sorted(names) == sorted(results[1]["artifacts"]), "each artifact once"
    assert len(names) > 5
    for archive, upload in logged:
        content = archive.files[upload["file_path"]]
        digest = results[1]["artifacts"][upload["additional_params"]["fileName"]]
        assert hashlib.sha256(content).hexdigest() == digest


MIDWAY = """
import json, tempfile, trackd
run = trackd.init(project="p", name="midway", mode="offline")
for step in range(200):
    run.log({"i": step, "loss": 1.0 / (step + 1)}, step=step)
    if step in (50, 150):
        with tempfile.NamedTemporaryFile(delete=False) as handle:
            handle.write(b"artifact %d" % step)
        run.log_artifact(handle.name, name="a%d.bin" % step)
run.finish()
print(json.dumps({"id": run.id}))
"""


def test_a_record_refused_mid_batch_is_dead_lettered_and_the_rest_lands_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """A run spooled offline whose first artifact's stored file is then deleted: the daemon
    delivers the spool in one go, the record fails in the middle of its batch and is
    retried alone (the fan-out re-sends the batch one record at a time): it goes to the
    dead letters, and every step and the other artifact are in the archive once."""
    client = subprocess.run(
        [sys.executable, "-c", MIDWAY], env=env, capture_output=True, text=True, check=True
    )
    run_id = json.loads(client.stdout.strip().splitlines()[-1])["id"]
    gone = hashlib.sha256(b"artifact 50").hexdigest()
    (daemon.data_dir / "artifacts" / gone[:2] / gone).unlink()
    spec = offline_spec(tmp_path)
    daemon.start("--sink", spec, extra_env=comet_env(tmp_path))
    wait_for(lambda: list((tmp_path / "comet").glob("*.zip")), 60)  # the spool's run ended
    assert daemon.status()["sinks"][SinkSpec.parse(spec).name]["dead_letters"] == 1
    assert daemon.stop() == 0

    (archive,) = read_archives(tmp_path / "comet")[hashlib.sha256(run_id.encode()).hexdigest()[:32]]
    assert_every_step_once([archive], 200)
    assert [upload_name(u) for u in archive.uploads] == ["a150.bin"]
    assert archive.others["trackd.status"] == "finished"


INTERLEAVED = """
import sys, trackd
run = trackd.init(project="p", name="off", mode="offline")
for step in range(int(sys.argv[1])):
    run.log({"i": step, "loss": 1.0 / (step + 1)}, step=step)
    run.set_summary({"last": step})
run.finish()
"""


def test_offline_spool_replayed_into_comet_twice_lands_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`trackd replay` of an offline run (more than one of replay's batches) into a Comet
    sink, twice: one archive, every step once; the second replay adds nothing."""
    spool_env = {**env, "TRACKD_DATA_DIR": str(tmp_path / "air-gapped")}
    rows = 1500  # a summary after each row: 3,000 messages
    subprocess.run(
        [sys.executable, "-c", INTERLEAVED, str(rows)], env=spool_env, check=True, timeout=120
    )
    replays = []
    for _ in range(2):
        replayed = cli(
            {**env, **comet_env(tmp_path)},
            "replay",
            str(tmp_path / "air-gapped" / "spool"),
            "--sink",
            offline_spec(tmp_path),
            timeout=300,
        )
        assert replayed.returncode == 0, replayed.stderr
        replays.append(replayed.stdout)
    assert "3002 records delivered" in replays[0]  # run_start, rows, summaries, run_end
    assert "0 records delivered" in replays[1]
    ((archive,),) = read_archives(tmp_path / "comet").values()
    assert_every_step_once([archive], rows)
    assert archive.others["last"] == rows - 1
    assert archive.others["trackd.status"] == "finished"


def test_online_without_an_api_key_is_retried_with_a_clear_error(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Online with no API key: the sink retries, `trackd status` says why, the daemon
    keeps serving (another sink delivers) and stops cleanly."""
    spec = "comet:p?mode=online"
    name = SinkSpec.parse(spec).name
    quick = {"TRACKD_DRAIN_TIMEOUT": "2"}  # a stop while the sink cannot open drains nothing
    extra_env = {**comet_env(tmp_path), **quick}
    daemon.start("--sink", spec, "--sink", f"jsonl:{tmp_path / 'runs'}", extra_env=extra_env)
    finish_client(run_client(env, "--name", "a", "--rows", "10"))
    wait_for(lambda: daemon.status()["sinks"][name]["retries"] >= 2, 30)
    status = daemon.status()["sinks"][name]
    assert "online mode needs an API key (COMET_API_KEY" in status["last_error"]
    assert status["dead_letters"] == 0
    wait_for(lambda: list((tmp_path / "runs").glob("p/a-*/metrics.jsonl")), 30)
    assert daemon.stop() == 0


def test_online_without_a_server_is_retried_with_a_clear_error(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Online with a key but no server (a loopback port nobody listens on): the session
    does not start, which is a retried error naming the URL; nothing is dead-lettered."""
    spec = "comet:p?mode=online"
    name = SinkSpec.parse(spec).name
    key = {"COMET_API_KEY": "0123456789abcdef0123456789", "TRACKD_DRAIN_TIMEOUT": "2"}
    extra_env = {**comet_env(tmp_path), **key}
    daemon.start("--sink", spec, extra_env=extra_env)
    finish_client(run_client(env, "--name", "a", "--rows", "10"))
    wait_for(lambda: daemon.status()["sinks"][name]["retries"] >= 1, 120)
    status = daemon.status()["sinks"][name]
    assert "did not start" in status["last_error"]
    assert extra_env["COMET_URL_OVERRIDE"] in status["last_error"]
    assert status["dead_letters"] == 0
    assert daemon.stop() == 0


def test_a_histogram_is_a_comet_3d_histogram_at_its_step(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """trackd.Histogram reaches Comet as log_histogram_3d's asset at the step it was logged,
    holding every counted value (its bins' midpoints carry the counts)."""
    daemon.start("--sink", offline_spec(tmp_path), extra_env=comet_env(tmp_path))
    run_id = finish_client(run_client(env, "--name", "h", "--rows", "3", "--media-last"))["id"]
    daemon.flush()
    assert daemon.stop() == 0

    (archive,) = found = read_archives(tmp_path / "comet")[
        hashlib.sha256(run_id.encode()).hexdigest()[:32]
    ]
    assert len(found) == 1
    (upload,) = [u for u in archive.uploads if u["upload_type"] == "histogram3d"]
    assert upload["additional_params"]["step"] == 3
    stored = json.loads(archive.files[upload["file_path"]])
    # Comet's sparse form: [bin index, count] per non-empty bin of its own exponential bins
    assert [count for _index, count in stored["index_values"]] == [1, 2]  # [1.0, 2.0, 3.0]
