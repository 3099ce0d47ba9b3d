"""Media (trackd.Image, Table, Video) through a real daemon into every sink, read back."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage

from conftest import HELPERS, Daemon, finish_client, jsonl_runs

MEDIA_KEYS = {"img/array", "img/pil", "img/file", "preds", "clip", "grid"}


def frames(picture: PILImage.Image) -> int:
    count: int = getattr(picture, "n_frames", 1)
    return count


def log_media(env: dict[str, str], name: str = "media") -> str:
    client = subprocess.Popen(
        [sys.executable, str(HELPERS / "media_client.py"), "--name", name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run_id: str = finish_client(client)["id"]
    return run_id


def test_jsonl_keeps_media_files_and_indexes_them_beside_the_scalars(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    daemon.start("--sink", f"jsonl:{root}")
    run_id = log_media(env)
    daemon.flush()
    assert daemon.stop() == 0
    run_dir = root / "p" / f"media-{run_id[:8]}"
    rows = jsonl_runs(root)[run_dir.name]
    scalars = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    assert scalars == [(0, 0.5), (1, 0.4), (2, 0.3), (3, 0.2), (4, 0.1), (5, 0.0), (6, -0.1)]
    index: dict[str, dict[str, Any]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dict):
                index[key] = {"step": row["step"], **value}
    assert set(index) == MEDIA_KEYS
    assert [len(row) for row in rows if "loss" not in row] == [3] * 6  # step, ts, one key
    files = sorted(
        str(p.relative_to(run_dir)) for p in (run_dir / "media").rglob("*") if p.is_file()
    )
    assert files == sorted(entry["path"] for entry in index.values())

    def picture(key: str) -> PILImage.Image:
        return PILImage.open(io.BytesIO((run_dir / index[key]["path"]).read_bytes()))

    assert index["img/array"]["_type"] == "image"
    assert index["img/array"]["caption"] == "gradient"
    assert (index["img/array"]["width"], index["img/array"]["height"]) == (6, 8)
    assert picture("img/array").getpixel((1, 0)) == (3, 4, 5)
    assert picture("img/pil").size == (3, 2)
    assert picture("img/pil").getpixel((0, 0)) == 7
    assert picture("img/file").getpixel((4, 3)) == (10, 20, 30)
    assert index["img/file"]["caption"] == "from a file"
    assert [index[k]["step"] for k in ("img/array", "img/pil", "img/file", "preds")] == [0, 1, 2, 3]
    table = json.loads((run_dir / index["preds"]["path"]).read_text())
    assert table == {"columns": ["text", "score"], "data": [["a", 1.5], ["b", 2.0]]}
    assert index["preds"]["_type"] == "table"
    assert index["preds"]["rows"] == 2
    clip = picture("clip")
    assert (clip.format, frames(clip), clip.size) == ("GIF", 4, (10, 8))
    assert index["clip"] | {"path": "", "sha256": "", "size": 0} == {
        "step": 4,
        "_type": "video",
        "kind": "video",
        "format": "gif",
        "caption": "clip",
        "frames": 4,
        "width": 10,
        "height": 8,
        "fps": 5.0,
        "path": "",
        "sha256": "",
        "size": 0,
    }
    grid = picture("grid")
    assert (frames(grid), grid.size) == (2, (8, 8))  # 3 videos of 4x4 tiled 2x2


def test_tensorboard_shows_images_videos_and_tables(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util  # type: ignore[import-untyped]

    logdir = tmp_path / "tb"
    daemon.start("--sink", f"tensorboard:{logdir}")
    run_id = log_media(env)
    daemon.flush()
    assert daemon.stop() == 0
    run_dir = logdir / "p" / f"media-{run_id[:8]}"
    events = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    assert sorted(events.Tags()["images"]) == ["clip", "grid", "img/array", "img/file", "img/pil"]
    shown = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert {
        tag: [(i.step, i.width, i.height) for i in images] for tag, images in shown.items()
    } == {
        "img/array": [(0, 6, 8)],
        "img/pil": [(1, 3, 2)],
        "img/file": [(2, 5, 4)],
        "clip": [(4, 10, 8)],
        "grid": [(5, 8, 8)],
    }
    array = PILImage.open(io.BytesIO(shown["img/array"][0].encoded_image_string))
    assert array.getpixel((1, 0)) == (3, 4, 5)
    clip = PILImage.open(io.BytesIO(shown["clip"][0].encoded_image_string))
    assert (clip.format, frames(clip)) == ("GIF", 4)
    [table] = events.Tensors("preds")
    text = tensor_util.make_ndarray(table.tensor_proto).item().decode()
    assert (table.step, text) == (
        3,
        "preds\n\n| text | score |\n|---|---|\n| a | 1.5 |\n| b | 2.0 |",
    )
    assert [s.step for s in events.Scalars("loss")] == list(range(7))


def test_mlflow_stores_each_media_file_as_an_artifact(
    daemon: Daemon, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    uri = f"file:{tmp_path}/mlruns"
    daemon.start("--sink", f"mlflow:{uri}")
    run_id = log_media(env)
    daemon.flush()
    assert daemon.stop() == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("p")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags["trackd.run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(7))

    def listing(path: str) -> list[str]:
        found = []
        for info in client.list_artifacts(run.info.run_id, path):
            found += listing(info.path) if info.is_dir else [info.path]
        return found

    stored = listing("media")
    assert len(stored) == 6
    by_key = {path.rsplit("/", 1)[0].removeprefix("media/"): path for path in stored}
    assert sorted(by_key) == sorted(MEDIA_KEYS)
    assert [by_key[key].rsplit("/", 1)[1].split("-")[0] for key in ("img/array", "preds")] == [
        "0",
        "3",
    ]
    local = Path(client.download_artifacts(run.info.run_id, "media", str(tmp_path / "down")))
    image = PILImage.open(io.BytesIO((local.parent / by_key["img/array"]).read_bytes()))
    assert image.getpixel((1, 0)) == (3, 4, 5)
    table = json.loads((local.parent / by_key["preds"]).read_text())
    assert table == {"columns": ["text", "score"], "data": [["a", 1.5], ["b", 2.0]]}
    assert frames(PILImage.open(io.BytesIO((local.parent / by_key["clip"]).read_bytes()))) == 4
