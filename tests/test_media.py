"""Media (trackd.Image, Table, Video) through a real daemon into every sink, read back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path, PurePath
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


def test_wandb_history_holds_images_videos_and_tables_at_their_steps(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    from helpers.wandb_log import read_runs
    from test_sink_wandb import wandb_env

    env = {**env, **wandb_env(tmp_path)}
    daemon.env = env
    daemon.start("--sink", "wandb:*")
    run_id = log_media(env)
    daemon.flush()
    assert daemon.stop() == 0
    [[session]] = read_runs(tmp_path / "wandb" / "wandb").values()
    assert session.run_id == run_id
    assert [row["_step"] for row in session.history] == list(range(7))
    assert [row["loss"] for row in session.history] == [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1]
    # the reader flattens each media entry's fields to KEY/FIELD
    media = {
        key.removesuffix("/_type"): (row["_step"], value)
        for row in session.history
        for key, value in row.items()
        if key.endswith("/_type")
    }
    assert media == {
        "img/array": (0, "image-file"),
        "img/pil": (1, "image-file"),
        "img/file": (2, "image-file"),
        "preds": (3, "table-file"),
        "clip": (4, "video-file"),
        "grid": (5, "video-file"),
    }
    run_dir = session.path.parent
    paths = {key: session.history[step][f"{key}/path"] for key, (step, _) in media.items()}
    assert all((run_dir / "files" / path).is_file() for path in paths.values()), paths
    array = session.history[0]
    assert [array[f"img/array/{f}"] for f in ("width", "height", "caption")] == [6, 8, "gradient"]
    assert session.history[4]["clip/caption"] == "clip"
    table = json.loads((run_dir / "files" / paths["preds"]).read_text())
    assert (table["columns"], table["data"]) == (["text", "score"], [["a", 1.5], ["b", 2.0]])


AIM_MEDIA = """
import json, sys
from aim import Repo, Run
from aim.sdk.index_manager import RepoIndexManager
from aim.storage.context import Context

repo = Repo(sys.argv[1])
[run_hash] = list(repo.list_all_runs())
RepoIndexManager.get_index_manager(repo).index(run_hash)
run = Run(run_hash, repo=Repo(sys.argv[1]), read_only=True)
found = {}
for key in ("img/array", "img/pil", "img/file"):
    steps, (images, _epochs, _times) = run.get_image_sequence(key, Context({})).data.items_list()
    found[key] = [
        [step, image.caption, list(image.to_pil_image().convert("RGB").getpixel((0, 0)))]
        for step, image in zip(steps, images)
    ]
steps, (texts, _epochs, _times) = run.get_text_sequence("preds", Context({})).data.items_list()
found["preds"] = [[step, text.data] for step, text in zip(steps, texts)]
types = ("aim.image", "aim.text", "aim.audio", "aim.distribution", "aim.figure")
found["sequences"] = sorted(name for name, _, _ in run.iter_sequence_info_by_type(types))
loss = next(m for m in run.metrics() if m.name == "loss")
steps, (values,) = loss.data.view(["val"]).numpy()
found["loss"] = [steps.tolist(), values.tolist()]
print(json.dumps(found))
"""


def test_aim_shows_images_and_tables_and_counts_videos_it_cannot_show(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Aim gets images as Image sequences and a table as a Markdown Text sequence, each at
    its step; the two videos (Aim has no form for them) are a counted notice; every number
    of the run arrives."""
    repo = tmp_path / "aim"
    daemon.start("--sink", f"aim:{repo}")
    log_media(env)
    daemon.flush()
    [notices] = [sink["notices"] for sink in daemon.status()["sinks"].values()]
    assert notices == {"videos have no Aim form; skipped": 2}
    assert daemon.stop() == 0
    out = subprocess.run(
        [sys.executable, "-c", AIM_MEDIA, str(repo)],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    aim = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert aim == {
        "img/array": [[0, "gradient", [0, 1, 2]]],
        "img/pil": [[1, "", [7, 7, 7]]],
        "img/file": [[2, "from a file", [10, 20, 30]]],
        "preds": [[3, "preds\n\n| text | score |\n|---|---|\n| a | 1.5 |\n| b | 2.0 |"]],
        "sequences": ["img/array", "img/file", "img/pil", "preds"],
        "loss": [list(range(7)), [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1]],
    }


def test_trackio_stores_media_as_trackio_log_would(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Each media record is a row at its step holding what trackio.log() stores for a
    trackio.Image/Video/Table, its file under Trackio's media directory in Trackio's own
    layout; the numbers arrive in their own rows; nothing is a notice."""
    from test_sink_trackio import read_trackio

    trackio_dir = tmp_path / "trackio"
    daemon.start("--sink", "trackio:fallback", extra_env={"TRACKIO_DIR": str(trackio_dir)})
    run_id = log_media(env)
    daemon.flush()
    [notices] = [sink["notices"] for sink in daemon.status()["sinks"].values()]
    assert notices == {}
    assert daemon.stop() == 0
    [run] = read_trackio(env, trackio_dir)["p"].values()
    assert run["id"] == run_id
    logs = run["logs"]
    scalars = [(log["step"], log["loss"]) for log in logs if "loss" in log]
    assert scalars == [(0, 0.5), (1, 0.4), (2, 0.3), (3, 0.2), (4, 0.1), (5, 0.0), (6, -0.1)]
    media = {key: (log["step"], log[key]) for log in logs for key in MEDIA_KEYS if key in log}
    assert sorted(media) == sorted(MEDIA_KEYS)
    assert len(logs) == 7 + 6
    assert media["preds"] == (
        3,
        {
            "_type": "trackio.table",
            "_value": [{"text": "a", "score": 1.5}, {"text": "b", "score": 2.0}],
        },
    )
    media_dir = trackio_dir / "media"
    files = {}
    for key in MEDIA_KEYS - {"preds"}:
        step, value = media[key]
        kind = "trackio.video" if key in ("clip", "grid") else "trackio.image"
        assert value["_type"] == kind
        assert value["file_path"].startswith(f"p/media/{step}/"), value  # PROJECT/RUN/STEP/
        files[key] = PILImage.open(io.BytesIO((media_dir / value["file_path"]).read_bytes()))
    assert [media[key][0] for key in ("img/array", "img/pil", "img/file", "clip", "grid")] == [
        0,
        1,
        2,
        4,
        5,
    ]
    assert media["img/array"][1]["caption"] == "gradient"
    assert media["img/pil"][1]["caption"] is None
    assert files["img/array"].getpixel((1, 0)) == (3, 4, 5)
    assert files["img/file"].getpixel((4, 3)) == (10, 20, 30)
    assert (files["clip"].format, frames(files["clip"]), files["clip"].size) == ("GIF", 4, (10, 8))
    assert media["clip"][1]["caption"] == "clip"
    assert sorted(p.name for p in media_dir.rglob("*") if p.is_file()) == sorted(
        PurePath(media[key][1]["file_path"]).name for key in MEDIA_KEYS - {"preds"}
    )


def media_frame(**body: Any) -> bytes:
    from trackd.protocol import VERSION, encode

    full = {"step": 3, "ts": 1.5, "key": "img", "kind": "image", "path": "/a", "sha256": "ab"}
    full |= {"size": 10, "format": "png", **body}
    message = {"v": VERSION, "s": "s", "q": 1, "t": "media", "r": "r", "b": full}
    return encode(message)


def test_protocol_validates_media_bodies_naming_the_field() -> None:
    from trackd.protocol import ProtocolError, decode

    assert decode(media_frame(caption="c", width=2, height=3))["b"]["width"] == 2
    assert decode(media_frame(kind="table", format="json", columns=["a"], rows=1))["t"] == "media"
    cases: dict[str, dict[str, Any]] = {
        "b.step: expected int, got str": {"step": "3"},
        "b.kind: expected one of ['histogram', 'image', 'table', 'video'], got 'audio'": {
            "kind": "audio"
        },
        "b.format: a video is one of ('gif', 'mp4'), got 'png'": {"kind": "video"},
        "b.caption: expected str or nil, got int": {"caption": 5},
        "b.key: expected a non-empty name": {"key": ""},
        "b.columns: expected a list of strings or nil, got list": {"columns": [1]},
        "b.size: must not be negative": {"size": -1},
    }
    for error, body in cases.items():
        with pytest.raises(ProtocolError) as raised:
            decode(media_frame(**body))
        assert str(raised.value) == error


def test_media_objects_refuse_bad_input_at_once_and_import_nothing_heavy() -> None:
    import numpy as np

    import trackd

    with pytest.raises(ValueError, match=r"Video\(\): frames must be uint8"):
        trackd.Video(np.zeros((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected \(frames, channels, h, w\)"):
        trackd.Video(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"Image\(\): expected \(h, w\)"):
        trackd.Image(np.zeros((2, 2, 2, 2)))
    with pytest.raises(TypeError, match=r"Image\(\): value must be a path"):
        trackd.Image(42)
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        trackd.Table(columns=["a", "b"], data=[[1, 2], [3]])
    table = trackd.Table(columns=["a", "b"], data=[[1, "x"], [np.float32(2.5), None]])
    assert json.loads(table.data) == {"columns": ["a", "b"], "data": [[1, "x"], [2.5, None]]}
    code = "import sys, trackd; print(sorted({'numpy', 'PIL', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "[]"


def test_an_image_from_an_array_is_a_png_pillow_reads_back_pixel_for_pixel() -> None:
    """trackd writes an array's PNG itself (zlib), so the first image in a training loop
    does not import Pillow; Pillow, the reader every sink uses, must see the same pixels
    as the array, in every layout Image() takes."""
    import numpy as np

    import trackd

    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    smooth = np.add.outer(np.arange(40), np.arange(30)).astype(np.uint8)
    cases: dict[str, tuple[Any, Any]] = {
        "grey": (noise[..., 0], noise[..., 0]),
        "grey (h, w, 1)": (noise[..., :1], noise[..., 0]),
        "RGB": (noise[..., :3], noise[..., :3]),
        "RGBA": (noise, noise),
        "(c, h, w)": (noise[..., :3].transpose(2, 0, 1), noise[..., :3]),
        "smooth, rows wrap past 255": (smooth, smooth),
        "floats in [0, 1]": (
            np.array([[0.0, 0.5], [1.0, 2.0]]),
            np.array([[0, 127], [255, 255]], dtype=np.uint8),
        ),
        "one pixel": (np.zeros((1, 1, 3), dtype=np.uint8), np.zeros((1, 1, 3), dtype=np.uint8)),
    }
    for name, (value, expected) in cases.items():
        image = trackd.Image(value)
        decoded = np.asarray(PILImage.open(io.BytesIO(image.data)))
        assert decoded.shape == expected.shape, name
        assert (decoded == expected).all(), name
        assert (image.width, image.height) == (expected.shape[1], expected.shape[0]), name
    code = (
        "import sys, numpy, trackd; trackd.Image(numpy.zeros((4, 4, 3), dtype=numpy.uint8));"
        " print('PIL' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "False"


def test_log_of_an_image_leaves_its_compression_and_store_to_the_delivery_thread(
    daemon: Daemon, dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PNG's compression (~150 µs for 64x64 noise after a torch step) and the store's
    fsync of each new file (3-5 ms here): `log()` must wait for neither. The image is
    written from a copy of the pixels taken at `log()`, so a caller that reuses its array
    or its PIL image still gets what it logged, and the file is stored, durable, before the
    message naming it is sent."""
    import threading
    import zlib

    import numpy as np

    import trackd

    root = tmp_path / "runs"
    daemon.start("--sink", f"jsonl:{root}")
    fsyncs: list[str] = []
    compressions: list[str] = []
    real_fsync, real_compress = os.fsync, zlib.compress

    def recording_fsync(fd: int) -> None:
        fsyncs.append(threading.current_thread().name)
        real_fsync(fd)

    def recording_compress(data: bytes, /, level: int = -1, wbits: int = 15) -> bytes:
        compressions.append(threading.current_thread().name)
        return real_compress(data, level, wbits)

    run = trackd.init(project="p", name="store")
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    picture = PILImage.fromarray(pixels[::-1].copy())
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(zlib, "compress", recording_compress)
    run.log({"sample": trackd.Image(pixels), "picture": trackd.Image(picture)}, step=3)
    in_log = fsyncs + compressions
    pixels[:] = 0  # the caller's next use of its buffers
    picture.paste(0, (0, 0, 4, 4))
    run.finish()
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(zlib, "compress", real_compress)
    assert in_log == []
    assert compressions
    assert all(name.startswith("trackd-") for name in compressions)
    assert any(name.startswith("trackd-") for name in fsyncs)
    daemon.flush()
    assert daemon.stop() == 0
    [row, row_picture] = jsonl_runs(root)[f"store-{run.id[:8]}"]
    folder = root / "p" / f"store-{run.id[:8]}"
    stored = folder / row["sample"]["path"]
    assert (row["step"], row["sample"]["size"]) == (3, stored.stat().st_size)
    logged = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert (np.asarray(PILImage.open(stored)) == logged).all()
    assert (
        np.asarray(PILImage.open(folder / row_picture["picture"]["path"])) == logged[::-1]
    ).all()


def test_an_image_that_cannot_be_stored_is_counted_and_loses_nothing_else(
    daemon: Daemon, dirs: dict[str, Path], tmp_path: Path
) -> None:
    import hashlib

    import numpy as np

    import trackd

    root = tmp_path / "runs"
    daemon.start("--sink", f"jsonl:{root}")
    broken = trackd.Image(np.zeros((2, 2), dtype=np.uint8))
    digest = hashlib.sha256(broken.data).hexdigest()
    blocker = dirs["data"] / "artifacts" / digest[:2]  # a file where its directory goes
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    run = trackd.init(project="p", name="unstorable")
    run.log({"loss": 1.0, "sample": broken}, step=0)
    run.log({"loss": 0.5, "fine": trackd.Image(np.ones((2, 2), dtype=np.uint8))}, step=1)
    transport = run._transport
    assert transport is not None
    run.finish()
    [(problem, count)] = transport.errors.items()
    assert (problem.startswith("image 'sample' at step 0: not stored, "), count) == (True, 1)
    daemon.flush()
    assert daemon.stop() == 0
    rows = jsonl_runs(root)[f"unstorable-{run.id[:8]}"]
    assert [(row["step"], sorted(set(row) - {"step", "ts"})) for row in rows] == [
        (0, ["loss"]),
        (1, ["loss"]),
        (1, ["fine"]),
    ]


def test_a_video_file_is_stored_as_it_is(
    daemon: Daemon, env: dict[str, str], dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Video("clip.gif") (and .mp4) keeps the file's bytes; the original may go at once."""
    import trackd

    root = tmp_path / "runs"
    daemon.start("--sink", f"jsonl:{root}")
    source = tmp_path / "clip.gif"
    frames_ = [PILImage.new("RGB", (4, 4), (value, 0, 0)) for value in (0, 120, 240)]
    frames_[0].save(source, format="GIF", save_all=True, append_images=frames_[1:])
    original = source.read_bytes()
    run = trackd.init(project="p", name="file")
    run.log({"clip": trackd.Video(source, caption="from a file")}, step=7)
    source.unlink()
    run.finish()
    daemon.flush()
    assert daemon.stop() == 0
    [row] = jsonl_runs(root)[f"file-{run.id[:8]}"]
    assert (row["step"], row["clip"]["format"], row["clip"]["caption"]) == (7, "gif", "from a file")
    assert (root / "p" / f"file-{run.id[:8]}" / row["clip"]["path"]).read_bytes() == original
