"""A BatteryML-style MLflowTracker (shared/reference/batteryml-tracking.md): start_run with
a run name and a flat config, log_metric/log_metrics per epoch, log_artifact under a new
name, end_run."""

import os
import shutil
import tempfile

import mlflow


class MLflowTracker:
    def __init__(self, tracking_uri: str | None, experiment_name: str) -> None:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment_name)

    def start_run(self, run_name: str, config: dict) -> str:
        run = mlflow.start_run(run_name=run_name)
        mlflow.log_params(config)
        return run.info.run_id

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        mlflow.log_metric(key, value, step=step)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, local_path: str, artifact_name: str | None = None) -> None:
        if artifact_name is None:
            mlflow.log_artifact(local_path)
            return
        with tempfile.TemporaryDirectory() as folder:
            renamed = os.path.join(folder, artifact_name)
            shutil.copyfile(local_path, renamed)
            mlflow.log_artifact(renamed)

    def end_run(self) -> None:
        mlflow.end_run()


tracker = MLflowTracker(tracking_uri=None, experiment_name="battery_degradation")
run_id = tracker.start_run(
    run_name="mlp_summary_set_random_split",
    config={
        "model": "mlp",
        "model.hidden_dims": [64, 32],
        "pipeline": "summary_set",
        "pipeline.include_arrhenius": True,
        "training.learning_rate": 1e-3,
        "training.batch_size": 32,
    },
)
for epoch in range(4):
    tracker.log_metric("train_loss", 0.5 / (epoch + 1), step=epoch)
    tracker.log_metrics(
        {"train_rmse": 0.05 * epoch, "val_rmse": 0.04 * epoch, "val_mae": 0.025}, step=epoch
    )
os.makedirs("checkpoints", exist_ok=True)
with open("checkpoints/best.pt", "wb") as handle:
    handle.write(b"\x00" * 64)
tracker.log_artifact("checkpoints/best.pt", "model.pt")
tracker.end_run()
