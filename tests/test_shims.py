"""The drop-in shims' own rules: light imports, lazy fall-through to the real library,
NotImplementedError for what they do not support, W&B's step/commit and MLflow's
param/metric semantics, through a real daemon and its JSONL sink."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, jsonl_runs
from trackd import mlflow, wandb


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )


@pytest.fixture
def shims(daemon: Daemon, dirs: dict[str, Path]) -> Iterator[Path]:
    """A daemon with its default JSONL sink; the shims' module state reset afterwards."""
    daemon.start()
    yield dirs["data"] / "runs"
    wandb.finish()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def only_run(root: Path, project: str) -> tuple[Path, list[dict[str, Any]]]:
    """The one run of `project`, and its metric rows (none when it logged no metric)."""
    (folder,) = (root / project).iterdir()
    return folder, jsonl_runs(root).get(folder.name, [])


@pytest.mark.parametrize("library", ["wandb", "mlflow"])
def test_importing_a_shim_imports_neither_the_library_nor_numpy(library: str) -> None:
    """`import trackd.LIB` leaves the real library, numpy and pandas out of sys.modules."""
    done = python(
        f"import sys, trackd.{library} as shim\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"('{library}', 'numpy', 'pandas', 'PIL')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_other_names_fall_through_to_the_real_library() -> None:
    """`mlflow.search_runs`, `MlflowClient` and `wandb.Api` are the real library's."""
    done = python(
        "import sys, trackd.mlflow as mlflow, trackd.wandb as wandb\n"
        "mlflow.set_tracking_uri('sqlite:///x.db')\n"
        "client = mlflow.MlflowClient\n"
        "import mlflow as real\n"
        "assert mlflow.search_runs is real.search_runs, 'search_runs'\n"
        "assert client is real.MlflowClient\n"
        "assert real.get_tracking_uri() == 'sqlite:///x.db', real.get_tracking_uri()\n"
        "import wandb as real_wandb\n"
        "assert wandb.Api is real_wandb.Api\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("library", "name"), [("mlflow", "search_runs"), ("wandb", "Api")])
def test_without_the_library_the_error_names_the_missing_call(library: str, name: str) -> None:
    """The real library missing (blocked in sys.modules): an error naming LIB.NAME."""
    done = python(
        f"import sys; sys.modules['{library}'] = None\n"
        f"import trackd.{library} as shim\n"
        f"shim.{name}\n"
    )
    assert done.returncode == 1
    assert f"trackd.{library} does not provide {library}.{name}" in done.stderr
    assert f"pip install {library}" in done.stderr


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: wandb.save("x"), "wandb.save"),
        (lambda: wandb.use_artifact("x"), "wandb.use_artifact"),
        (mlflow.autolog, "mlflow.autolog"),
        (lambda: mlflow.log_table({}, "t.json"), "mlflow.log_table"),
        (lambda: wandb.Artifact("a", "model").add_reference("s3://x"), "Artifact.add_reference"),
        (lambda: wandb.Image([[0]], boxes={}), "wandb.Image(boxes"),
    ],
)
def test_unsupported_tracking_calls_raise_not_implemented_naming_them(call: Any, name: str) -> None:
    """A tracking call the shim cannot honour is never a silent no-op."""
    with pytest.raises(NotImplementedError, match=name.replace("(", r"\(")):
        call()


def test_wrong_arguments_name_the_key(shims: Path) -> None:
    """Bad keywords, values and names raise TypeError/ValueError naming what is wrong."""
    with pytest.raises(TypeError, match="'projcet'"):
        wandb.init(projcet="p")
    run = wandb.init(project="args", name="a", config={"lr": 0.1})
    with pytest.raises(TypeError, match="'loss'"):
        run.log({"loss": "high"})
    with pytest.raises(ValueError, match="'lr'"):
        run.config.update({"lr": 0.2})
    run.config.update({"lr": 0.2}, allow_val_change=True)
    assert run.config.lr == 0.2
    run.finish()
    with mlflow.start_run(run_name="m"):
        with pytest.raises(TypeError, match="'acc'"):
            mlflow.log_metric("acc", "high")
        with pytest.raises(ValueError, match="'bad name!'"):
            mlflow.log_metric("bad name!", 1.0)
        mlflow.log_param("lr", 0.1)
        with pytest.raises(ValueError, match="'lr'"):
            mlflow.log_param("lr", 0.2)
        mlflow.log_param("lr", 0.1)  # the same value again is allowed, as in MLflow


def test_wandb_step_and_commit_semantics(
    shims: Path, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """commit=False accumulates; a given step waits for a later one; a lower step is ignored
    with W&B's warning; finish commits what is pending."""
    run = wandb.init(project="steps", name="s")
    wandb.log({"a": 1})
    wandb.log({"b": 2}, commit=False)
    wandb.log({"c": 3})
    wandb.log({"d": 4}, step=5)
    wandb.log({"e": 5}, step=5)
    with caplog.at_level(logging.WARNING, logger="trackd.wandb"):
        wandb.log({"f": 6}, step=2)
    wandb.log({"g": 7})
    wandb.log({"h": 8}, step=9)
    assert run.step == 9
    wandb.finish()
    assert wandb.run is None
    assert "less than the current step 5" in caplog.text
    daemon.flush()
    _, rows = only_run(shims, "steps")
    assert [{k: v for k, v in row.items() if k != "ts"} for row in rows] == [
        {"step": 0, "a": 1},
        {"step": 1, "b": 2, "c": 3},
        {"step": 5, "d": 4, "e": 5, "g": 7},
        {"step": 9, "h": 8},
    ]


def test_wandb_config_summary_and_noops_counted_once_in_status(shims: Path, daemon: Daemon) -> None:
    """config by attribute and item, setdefaults keeps set keys; summary overrides; login,
    define_metric and watch twice each: counted once for the run in `trackd status`."""
    wandb.login()
    run = wandb.init(project="cfg", name="c", config={"lr": 0.1}, tags=["x"])
    wandb.config.epochs = 3
    wandb.config["depth"] = 4
    wandb.config.setdefaults({"lr": 0.5, "seed": 1})
    run.summary["best"] = 0.9
    run.summary.update({"worst": 0.1})
    for _ in range(2):
        wandb.define_metric("loss", summary="min")
        run.watch(object())
    wandb.finish(exit_code=3)
    daemon.flush()
    folder, _ = only_run(shims, "cfg")
    config = json.loads((folder / "config.json").read_text())
    assert config == {"lr": 0.1, "epochs": 3, "depth": 4, "seed": 1}
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["best"], summary["worst"]) == (0.9, 0.1)
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"
    ignored = daemon.status()["ingest"]["ignored_calls"]
    assert ignored == {"wandb.login": 1, "wandb.define_metric": 1, "wandb.watch": 1}


def test_wandb_disabled_logs_nothing(shims: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mode="disabled" and WANDB_MODE=disabled: every call accepted, nothing sent."""
    run = wandb.init(project="off", mode="disabled")
    run.log({"a": 1})
    run.finish()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.init(project="off")
    wandb.log({"a": 1})
    assert wandb.run is not None
    assert wandb.run.disabled
    wandb.finish()
    assert not (shims / "off").exists()


def test_mlflow_metrics_params_tags_and_runs(
    shims: Path, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Each key its own series at step 0 unless given, a given timestamp kept; long params cut
    with MLflow's warning; a logging call with no active run starts one; the context manager
    ends FAILED when its block raises; nested runs carry mlflow.parentRunId."""
    mlflow.set_experiment("flow")
    with mlflow.start_run(run_name="outer") as outer:
        mlflow.log_metric("loss", 0.5)
        mlflow.log_metric("acc", 0.7)
        mlflow.log_metric("loss", 0.4, step=3, timestamp=1_764_000_000_123)
        mlflow.log_metrics({"f1": 0.1, "auc": 0.2}, step=4)
        with caplog.at_level(logging.WARNING, logger="trackd.mlflow"):
            assert mlflow.log_param("long", "x" * 7000) == "x" * 6000
        assert "(7000 characters) is truncated to 6000 characters" in caplog.text
        with mlflow.start_run(run_name="inner", nested=True) as inner:
            assert mlflow.active_run() is inner
        assert mlflow.active_run() is outer
    with pytest.raises(ValueError, match="boom"), mlflow.start_run(run_name="bad"):
        raise ValueError("boom")
    mlflow.log_metric("auto", 1.0)  # starts a run, as MLflow does
    auto = mlflow.active_run()
    assert auto is not None
    mlflow.end_run()
    daemon.flush()
    runs = {folder.name.rsplit("-", 1)[0]: folder for folder in (shims / "flow").iterdir()}
    assert sorted(runs) == sorted(["outer", "inner", "bad", auto.info.run_name])
    rows = jsonl_runs(shims)[runs["outer"].name]
    points = [
        (row["step"], {k: v for k, v in row.items() if k not in ("step", "ts")}) for row in rows
    ]
    assert points == [
        (0, {"loss": 0.5}),
        (0, {"acc": 0.7}),
        (3, {"loss": 0.4}),
        (4, {"f1": 0.1, "auc": 0.2}),
    ]
    assert rows[2]["ts"] == 1_764_000_000.123
    assert json.loads((runs["outer"] / "config.json").read_text()) == {"long": "x" * 6000}
    inner_run = json.loads((runs["inner"] / "run.json").read_text())
    assert inner_run["tags"]["mlflow.parentRunId"] == outer.info.run_id
    assert json.loads((runs["bad"] / "run.json").read_text())["status"] == "failed"
