"""MLflow's tracking quickstart, as its docs write it: params, per-key metrics with and
without steps (one with its own timestamp), tags, every kind of artifact, a nested run
and a run whose block raises."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np

mlflow.set_experiment("parity-mlflow")
with mlflow.start_run(run_name="train", tags={"team": "vision"}, description="baseline"):
    mlflow.log_param("learning_rate", 0.01)
    mlflow.log_params({"epochs": 3, "optimizer": "adam", "layers": [64, 32]})
    mlflow.set_tag("stage", "dev")
    mlflow.set_tags({"owner": "ml", "priority": 1})
    for epoch in range(3):
        mlflow.log_metric("loss", 1.0 / (epoch + 1), step=epoch)
        mlflow.log_metrics({"acc": 0.5 + epoch / 10, "f1": 0.4 + epoch / 10}, step=epoch)
    mlflow.log_metric("final_score", 0.93)
    mlflow.log_metric("final_score", 0.95)
    mlflow.log_metric("stamped_lr", 0.001, step=1, timestamp=1_764_000_000_123)

    with open("notes.txt", "w") as handle:
        handle.write("hello")
    mlflow.log_artifact("notes.txt")
    mlflow.log_artifact("notes.txt", artifact_path="docs")
    os.makedirs("outputs/sub", exist_ok=True)
    for name in ("outputs/a.txt", "outputs/sub/b.txt"):
        with open(name, "w") as handle:
            handle.write(name)
    mlflow.log_artifacts("outputs", artifact_path="results")
    mlflow.log_dict({"lr": 0.01, "layers": [64, 32]}, "config/params.json")
    mlflow.log_text("a readme", "logs/readme.txt")
    figure, axes = plt.subplots()
    axes.plot([0, 1, 2], [1.0, 0.5, 0.33])
    mlflow.log_figure(figure, "plots/loss.png")
    mlflow.log_image(np.zeros((8, 8, 3), dtype=np.uint8), "images/blank.png")

    with mlflow.start_run(run_name="fold-0", nested=True):
        mlflow.log_param("fold", 0)
        mlflow.log_metric("fold_acc", 0.8)

try:
    with mlflow.start_run(run_name="diverged"):
        mlflow.log_metric("loss", 10.0)
        raise RuntimeError("loss diverged")
except RuntimeError:
    pass
