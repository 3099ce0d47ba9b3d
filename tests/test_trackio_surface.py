"""`import trackd as trackio`: the Track page of trackio's docs run with trackio itself and
with the one-line swap through a real daemon into the Trackio sink, both read back with
Trackio's own storage and compared; then the page's resume, with and without a daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HELPERS, Daemon, wait_for
from test_sink_trackio import read_trackio, read_trackio_alerts

# Differences by design, each with its reason; everything else must agree.
ALLOWED = {
    "config _Username": "trackio records the Hugging Face user; trackd has none",
    "config _Created": "the time each run started",
    "config _Status _Error _Ended _Tags _Summary _Artifacts": (
        "trackd's run status and metadata, kept in the config (Trackio has no field for them)"
    ),
    "timestamp": "when each row was logged",
    "media file_path": "trackio names media files at random, trackd by key and content",
    "my_video": (
        "trackio needs ffmpeg to encode a NumPy video and skips it without one (this machine "
        "has none); trackd encodes a GIF with Pillow"
    ),
    "alert level": "trackd.alert's level defaults to INFO (DESIGN.md, as W&B), trackio's to WARN",
    "alert step": "the Trackio sink files an alert at the run's last stored row, not the client's",
    "config after resume": (
        "trackio replaces a run's config with the resuming init()'s (none here: lr is lost); "
        "trackd merges it (lr kept), as W&B and MLflow do"
    ),
}
TRACKD_CONFIG_KEYS = {"_Status", "_Error", "_Ended", "_Tags", "_Summary", "_Artifacts"}
MEDIA_FIELDS_COMPARED = ("_type", "caption", "_value", "bins", "values")


def run_track_page(env: dict[str, str], scratch: Path, impl: str, phase: str) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(HELPERS / "trackio_track.py"), "--impl", impl, "--phase", phase],
        env=env,
        cwd=scratch,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def comparable(run: dict[str, Any]) -> dict[str, Any]:
    """What must agree: config (less the allowed keys), and per step the keys and values,
    media by the fields Trackio shows (less the allowed differences)."""
    config = {
        key: value
        for key, value in run["config"].items()
        if key not in TRACKD_CONFIG_KEYS | {"_Username", "_Created"}
    }
    steps: dict[int, dict[str, Any]] = {}
    for log in run["logs"]:
        row = steps.setdefault(log["step"], {})
        for key, value in log.items():
            if key in ("step", "timestamp", "my_video"):
                continue
            shown = value
            if isinstance(value, dict):
                shown = {f: value[f] for f in MEDIA_FIELDS_COMPARED if f in value}
            row[key] = shown
    return {"config": config, "steps": {step: row for step, row in steps.items() if row}}


def assert_same_runs(real: dict[str, Any], swapped: dict[str, Any], resumed: bool) -> None:
    assert sorted(real) == sorted(swapped) == ["my_first_run"]  # the run name
    expected, got = comparable(real["my_first_run"]), comparable(swapped["my_first_run"])
    if resumed:  # allowed: "config after resume"
        assert (got["config"], expected["config"]) == (
            {"lr": 0.01, "_Group": None},
            {"_Group": None},
        )
    else:
        assert got["config"] == expected["config"] == {"lr": 0.01, "_Group": "baseline"}
    assert sorted(got["steps"]) == sorted(expected["steps"])
    for step, row in expected["steps"].items():
        assert sorted(got["steps"][step]) == sorted(row), f"keys at step {step}"
        for key, value in row.items():
            if isinstance(value, dict) and "bins" in value:
                assert got["steps"][step][key]["values"] == value["values"]
                assert got["steps"][step][key]["bins"] == pytest.approx(value["bins"])
            else:
                assert got["steps"][step][key] == value, f"{key} at step {step}"
    # the video: skipped by trackio here (no ffmpeg, allowed above), a GIF through trackd
    [video] = [log["my_video"] for log in swapped["my_first_run"]["logs"] if "my_video" in log]
    assert (video["_type"], video["caption"]) == ("trackio.video", "Random video")


@pytest.mark.parametrize("daemon_at_resume", [True, False], ids=["daemon", "no-daemon"])
def test_the_track_page_gives_what_trackio_gives(
    daemon: Daemon, env: dict[str, str], tmp_path: Path, daemon_at_resume: bool
) -> None:
    real_dir, swapped_dir = tmp_path / "real", tmp_path / "swapped"
    real_env = {**env, "TRACKIO_DIR": str(real_dir)}
    run_track_page(real_env, tmp_path / "run-real", "real", "main")

    daemon.start("--sink", "trackio:fallback", extra_env={"TRACKIO_DIR": str(swapped_dir)})
    run_track_page(env, tmp_path / "run-trackd", "trackd", "main")
    daemon.flush()
    assert_same_runs(
        read_trackio(env, real_dir)["my_project"],
        read_trackio(env, swapped_dir)["my_project"],
        resumed=False,
    )
    run_track_page(real_env, tmp_path / "run-real", "real", "resume")
    if not daemon_at_resume:
        assert daemon.stop() == 0
    run_track_page(env, tmp_path / "run-trackd", "trackd", "resume")
    if not daemon_at_resume:  # the spool is picked up and the resume resolved by the daemon
        daemon.start("--sink", "trackio:fallback", extra_env={"TRACKIO_DIR": str(swapped_dir)})
        wait_for(lambda: daemon.request("runs")[0]["last_step"] == 6)
    daemon.flush()
    [run] = daemon.request("runs")
    assert (run["name"], run["status"]) == ("my_first_run", "finished")

    real = read_trackio(env, real_dir)["my_project"]
    swapped = read_trackio(env, swapped_dir)["my_project"]
    assert_same_runs(real, swapped, resumed=True)
    assert [log["step"] for log in swapped["my_first_run"]["logs"]][-1] == 6  # resumed after 5
    real_alerts = read_trackio_alerts(env, real_dir, "my_project")
    swapped_alerts = read_trackio_alerts(env, swapped_dir, "my_project")
    assert [(a["title"], a["text"], a["run"]) for a in swapped_alerts] == [
        (a["title"], a["text"], a["run"]) for a in real_alerts
    ]
    assert (real_alerts[0]["level"], swapped_alerts[0]["level"]) == ("warn", "info")  # allowed
