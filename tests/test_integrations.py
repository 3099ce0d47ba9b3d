"""accelerate, Lightning and transformers adapters: a real short CPU training run of each
library through a real daemon, read back from the JSONL sink."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

# Nothing here may reach the Hub (models are built in code); read when huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import lightning
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import trackd
from conftest import Daemon, jsonl_runs
from trackd.integrations._common import RunHandle
from trackd.integrations.accelerate import TrackdTracker
from trackd.integrations.lightning import TrackdLogger
from trackd.integrations.transformers import TrackdCallback

# Lightning's notices about the test's own tiny setup, and Lightning 2.6 using a torch pytree
# API that torch 2.13 deprecates: neither is trackd's to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


def run_dir(daemon: Daemon, project: str, name: str) -> Path:
    """The one run directory `runs/PROJECT/NAME-RUNID8` the JSONL sink wrote."""
    found = sorted((daemon.data_dir / "runs" / project).glob(f"{name}-*"))
    assert len(found) == 1, found
    return found[0]


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def rows(directory: Path) -> list[dict[str, Any]]:
    return jsonl_runs(directory.parent.parent)[directory.name]


def regression(samples: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, 4, generator=generator)
    return TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))


# --- accelerate --------------------------------------------------------------------


def test_accelerate_tracker_records_config_metrics_by_step_and_finish(daemon: Daemon) -> None:
    daemon.start()
    accelerator = Accelerator(cpu=True, log_with=[TrackdTracker(project="acc", run_name="lin")])
    accelerator.init_trackers("acc", config={"lr": 0.05, "batch_size": 8, "optimizer": "sgd"})
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(regression(), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for epoch in range(2):
        for inputs, targets in loader:
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            accelerator.log({"loss": loss.item(), "epoch": epoch}, step=len(losses) - 1)
    accelerator.log({"eval": {"loss": losses[-1]}, "note": "done"}, step=len(losses))
    run = accelerator.get_tracker("trackd", unwrap=True)
    assert isinstance(run, trackd.Run)
    accelerator.end_training()
    daemon.flush()

    directory = run_dir(daemon, "acc", "lin")
    assert directory.name == f"lin-{run.id[:8]}"
    assert read(directory / "config.json") == {"lr": 0.05, "batch_size": 8, "optimizer": "sgd"}
    logged = rows(directory)
    assert [row["step"] for row in logged] == list(range(len(losses) + 1))
    assert [row["loss"] for row in logged[:-1]] == losses
    assert [row["epoch"] for row in logged[:-1]] == [0] * 4 + [1] * 4
    assert logged[-1]["eval/loss"] == losses[-1]
    assert read(directory / "summary.json")["note"] == "done"  # text goes to the summary
    assert read(directory / "run.json")["status"] == "finished"


# --- Lightning ---------------------------------------------------------------------


class TinyRegressor(lightning.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 4, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        if self.global_step == self.hparams["fail_at_step"]:
            raise RuntimeError("loss exploded")
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: list[torch.Tensor], index: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


def lightning_trainer(logger: TrackdLogger, root: Path) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def test_lightning_logger_records_hparams_step_metrics_and_finishes(
    daemon: Daemon, tmp_path: Path
) -> None:
    """fit() then test(), no resume given: both stages land in the one run."""
    daemon.start()
    logger = TrackdLogger(project="pl", run_name="tiny")
    trainer = lightning_trainer(logger, tmp_path)
    model = TinyRegressor(lr=0.05, hidden=4)
    trainer.fit(model, DataLoader(regression(), batch_size=8), DataLoader(regression(8)))
    assert isinstance(logger.experiment, trackd.Run)
    assert logger.name == "pl"
    trainer.test(model, DataLoader(regression(8)))
    daemon.flush()

    directory = run_dir(daemon, "pl", "tiny")
    assert logger.version == directory.name
    config = read(directory / "config.json")
    assert config == {"lr": 0.05, "hidden": 4, "fail_at_step": None}
    logged = rows(directory)
    train = [row for row in logged if "train_loss" in row]
    assert [row["step"] for row in train] == list(range(8))  # 2 epochs x 4 batches
    assert [row["epoch"] for row in train] == [0] * 4 + [1] * 4
    assert [row["step"] for row in logged if "val_loss" in row] == [3, 7]
    assert len([row for row in logged if "test_loss" in row]) == 1
    assert read(directory / "run.json")["status"] == "finished"


def test_lightning_run_that_raises_ends_failed_with_the_traceback(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.start()
    trainer = lightning_trainer(TrackdLogger(project="pl", run_name="boom"), tmp_path)
    with pytest.raises(RuntimeError, match="loss exploded"):
        trainer.fit(
            TinyRegressor(fail_at_step=3),
            DataLoader(regression(), batch_size=8),
            DataLoader(regression(8)),
        )
    daemon.flush()

    directory = run_dir(daemon, "pl", "boom")
    assert [row["step"] for row in rows(directory)] == [0, 1, 2]
    meta = read(directory / "run.json")
    assert meta["status"] == "failed"
    assert "RuntimeError: loss exploded" in meta["error"]
    assert "training_step" in meta["error"]


# --- transformers ------------------------------------------------------------------


class TinyClassification(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, samples: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, 50, (samples, 8), generator=generator)
        self.labels = self.input_ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def test_transformers_callback_records_args_model_config_logs_and_finishes(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.start()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        run_name="bert",
        project="hf",
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = TrackdCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TinyClassification(24),
        eval_dataset=TinyClassification(8),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.handle is not None
    assert callback.handle.ended
    trainer.evaluate()  # after train(), no resume given: the same run, re-opened
    assert not callback.handle.ended
    callback.handle.end()  # what the atexit hook does for a run left open
    daemon.flush()

    directory = run_dir(daemon, "hf", "bert")
    config_json = read(directory / "config.json")
    assert config_json["learning_rate"] == 1e-3  # TrainingArguments
    assert config_json["max_steps"] == 6
    assert config_json["hidden_size"] == 16  # the model config
    assert config_json["model_type"] == "bert"
    assert config_json["model/num_parameters"] == model.num_parameters()
    logged = rows(directory)
    assert [row["step"] for row in logged if "train/loss" in row] == [2, 4, 6]
    assert [row["step"] for row in logged if "eval/loss" in row] == [3, 6, 6]
    assert all(row["train/learning_rate"] > 0 for row in logged if "train/loss" in row)
    summary = read(directory / "summary.json")
    assert summary["train_runtime"] > 0
    assert summary["train_loss"] == pytest.approx(trainer.state.log_history[-2]["train_loss"])
    assert read(directory / "run.json")["status"] == "finished"


# --- accelerate's W&B and MLflow tracker calls --------------------------------------


def test_accelerate_tracker_offers_the_wandb_and_mlflow_trackers_calls(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """log_images, log_table, log_artifact(s) and log_figure through get_tracker("trackd");
    a value that is neither a number nor text is dropped with a warning, once."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    daemon.start()
    accelerator = Accelerator(cpu=True, log_with=[TrackdTracker(project="acc", run_name="calls")])
    accelerator.init_trackers("acc")
    tracker = accelerator.get_tracker("trackd")
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    tracker.log_images({"samples": [pixels, pixels + 200], "single": [pixels]}, step=0)
    tracker.log_table("preds", columns=["text", "score"], data=[["a", 1.5]], step=1)
    (tmp_path / "ckpt.bin").write_bytes(b"weights")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "a.txt").write_text("a")
    (tmp_path / "dir" / "sub" / "b.txt").write_text("b")
    tracker.log_artifact(str(tmp_path / "ckpt.bin"), artifact_path="models")
    tracker.log_artifacts(str(tmp_path / "dir"), artifact_path="extra")
    figure, axes = pyplot.subplots()
    axes.plot([1, 2, 3])
    tracker.log_figure(figure, "plots/curve.png")
    pyplot.close(figure)
    with caplog.at_level("WARNING", logger="trackd.integrations.accelerate"):
        accelerator.log({"loss": 0.5, "hist": [1, 2], "note": "ok"}, step=2)
        accelerator.log({"loss": 0.4, "hist": [3]}, step=3)
    assert [r.getMessage() for r in caplog.records] == [
        "TrackdTracker: 'hist' is a list, not a number or text; dropped"
    ]
    run = accelerator.get_tracker("trackd", unwrap=True)
    accelerator.end_training()
    daemon.flush()

    directory = run_dir(daemon, "acc", "calls")
    logged = rows(directory)
    media = {
        key: (row["step"], value["_type"])
        for row in logged
        for key, value in row.items()
        if isinstance(value, dict)
    }
    assert media == {
        "samples/0": (0, "image"),
        "samples/1": (0, "image"),
        "single": (0, "image"),
        "preds": (1, "table"),
    }
    assert [(row["step"], row["loss"]) for row in logged if "loss" in row] == [(2, 0.5), (3, 0.4)]
    assert all("hist" not in row for row in logged)
    assert read(directory / "summary.json")["note"] == "ok"
    artifacts = sorted(p.name for p in (directory / "artifacts").iterdir())
    assert artifacts == ["extra_a.txt", "extra_sub_b.txt", "models_ckpt.bin", "plots_curve.png"]
    assert (directory / "artifacts" / "plots_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert directory.name == f"calls-{run.id[:8]}"


# --- pickling ------------------------------------------------------------------------

UNPICKLE_AND_LOG = """
import pickle, sys
from transformers import TrainerControl, TrainerState
adapter = pickle.loads(open(sys.argv[1], "rb").read())
kind = type(adapter).__name__
if kind == "TrackdLogger":
    adapter.log_metrics({"x": 10.0}, step=10)
    adapter.finalize("success")
elif kind == "TrackdTracker":
    adapter.log({"x": 10.0}, step=10)
    adapter.finish()
else:
    adapter.on_log(None, TrainerState(global_step=10), TrainerControl(), logs={"x": 10.0})
    adapter.on_train_end(None, TrainerState(), TrainerControl())
"""


def _log_through(adapter: Any, step: int) -> None:
    if isinstance(adapter, TrackdLogger):
        adapter.log_metrics({"x": float(step)}, step=step)
    elif isinstance(adapter, TrackdTracker):
        adapter.log({"x": float(step)}, step=step)
    else:
        adapter.on_log(None, TrainerState(global_step=step), TrainerControl(), logs={"x": 1.0})


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: TrackdLogger(project="pk", run_name="r"), id="lightning"),
        pytest.param(lambda: TrackdTracker(project="pk", run_name="r"), id="accelerate"),
        pytest.param(lambda: TrackdCallback(project="pk", run_name="r"), id="transformers"),
    ],
)
def test_an_adapter_pickled_mid_run_logs_into_the_same_run_after_unpickling(
    daemon: Daemon, env: dict[str, str], tmp_path: Path, make: Any
) -> None:
    """As Lightning pickles its Trainer for ddp_spawn: pickle.dumps after the run started,
    then unpickled in another process, logging goes on into the one run."""
    daemon.start()
    adapter = make()
    if isinstance(adapter, TrackdCallback):
        adapter.handle = RunHandle("pk", "r", {})
    for step in range(3):
        _log_through(adapter, step)
    pickled = tmp_path / "adapter.pickle"
    pickled.write_bytes(pickle.dumps(adapter))
    handle = adapter.handle if isinstance(adapter, TrackdCallback) else adapter._handle
    assert handle is not None
    handle.end()
    subprocess.run(
        [sys.executable, "-c", UNPICKLE_AND_LOG, str(pickled)], env=env, check=True, timeout=120
    )
    daemon.flush()
    directory = run_dir(daemon, "pk", "r")
    assert [row["step"] for row in rows(directory)] == [0, 1, 2, 10]
    assert read(directory / "run.json")["status"] == "finished"
    assert len(daemon.request("runs")) == 1


# --- import hygiene ----------------------------------------------------------------


def test_import_trackd_imports_no_training_library() -> None:
    code = (
        "import sys, trackd, trackd.integrations; "
        "print([m for m in ('torch', 'accelerate', 'lightning', 'transformers') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
