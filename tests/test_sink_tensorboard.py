"""TensorBoard sink, through a real daemon and real clients, read back with TensorBoard's own
EventAccumulator: every scalar at every step exactly once, through daemon SIGKILLs too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)
from tensorboard.plugins.hparams import api_pb2, metadata  # type: ignore[import-untyped]
from tensorboard.util import tensor_util  # type: ignore[import-untyped]

from conftest import Daemon, finish_client, meta_client, run_client

ROWS = 3000


def load(run_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(point.step, point.value) for point in events.Scalars(tag)]


def texts(events: EventAccumulator, tag: str) -> list[str]:
    return [
        tensor_util.make_ndarray(point.tensor_proto).item().decode()
        for point in events.Tensors(tag)
    ]


def hparams(events: EventAccumulator) -> dict[str, Any]:
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}


def session_status(events: EventAccumulator) -> int:
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    status: int = end.status
    return status


def assert_every_step_once(run_dir: Path, rows: int) -> EventAccumulator:
    events = load(run_dir)
    for tag in ("loss", "acc", "i"):
        assert [step for step, _ in scalars(events, tag)] == list(range(rows)), (run_dir, tag)
    assert [value for _, value in scalars(events, "i")] == [float(step) for step in range(rows)]
    return events


def test_runs_become_directories_with_every_scalar_config_and_status(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Three runs at once -> LOGDIR/p/NAME-ID8 each, every scalar once, config as hparams and
    text, tags, summary and a failed end from a run that uses them all."""
    logdir = tmp_path / "tb"
    daemon.start("--sink", f"tensorboard:{logdir}")
    names = ["alpha", "beta", "gamma"]
    clients = [run_client(env, "--name", name, "--rows", str(ROWS)) for name in names]
    meta = meta_client(env, "--name", "meta")
    ids = {name: finish_client(client)["id"] for name, client in zip(names, clients, strict=True)}
    meta_result = finish_client(meta)
    daemon.flush()
    assert daemon.stop() == 0

    assert sorted(path.name for path in (logdir / "p").iterdir()) == sorted(
        f"{name}-{run_id[:8]}" for name, run_id in ids.items()
    )
    for name, run_id in ids.items():
        run_dir = logdir / "p" / f"{name}-{run_id[:8]}"
        assert len(list(run_dir.glob("*tfevents*"))) == 1
        events = assert_every_step_once(run_dir, ROWS)
        assert hparams(events) == {"rows": ROWS}
        assert "| rows | 3000 |" in texts(events, "trackd/config")[0]
        assert texts(events, "trackd/status") == ["finished"]
        assert session_status(events) == api_pb2.STATUS_SUCCESS

    (meta_dir,) = (logdir / "vision").iterdir()
    assert meta_dir.name == f"meta-{meta_result['id'][:8]}"
    events = load(meta_dir)
    assert [step for step, _ in scalars(events, "loss")] == list(range(meta_result["rows"]))
    expected = {"lr": 0.001, "optimizer/name": "adam", "optimizer/betas": "[0.9, 0.99]"}
    assert expected.items() <= hparams(events).items()
    initial, update = texts(events, "trackd/config")
    assert "| optimizer/name | adam |" in initial
    assert "| epochs | 3 |" in update
    assert [("team" in text, "stage" in text) for text in texts(events, "trackd/tags")] == [
        (True, False),
        (False, True),
    ]
    assert "| best_loss | 0.02 |" in texts(events, "trackd/summary")[0]
    assert "weights.bin" in texts(events, "trackd/artifacts")[0]
    assert texts(events, "trackd/status") == ["failed"]
    assert session_status(events) == api_pb2.STATUS_FAILURE


def test_sigkill_mid_run_and_restart_still_exactly_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The daemon SIGKILLed twice while two runs log: each event file still has every
    scalar once, because recovery cuts the files back to the saved cursor."""
    logdir = tmp_path / "tb"
    spec = f"tensorboard:{logdir}"
    rows = 20_000
    daemon.start("--sink", spec)
    names = ["k0", "k1"]
    clients = [
        run_client(env, "--name", name, "--rows", str(rows), "--pace", "0.04") for name in names
    ]
    for _ in range(2):
        time.sleep(1.5)
        assert all(client.poll() is None for client in clients), "clients finished too early"
        daemon.kill()
        daemon.start("--sink", spec)
    ids = [finish_client(client)["id"] for client in clients]
    daemon.flush()
    assert daemon.stop() == 0
    for name, run_id in zip(names, ids, strict=True):
        events = assert_every_step_once(logdir / "p" / f"{name}-{run_id[:8]}", rows)
        assert texts(events, "trackd/status") == ["finished"]
