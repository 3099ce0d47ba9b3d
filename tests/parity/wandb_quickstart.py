"""W&B's quickstart, as its docs write it: config, a training loop, summary, an image, a
table built row by row, a histogram, a model artifact."""

import numpy as np
import wandb

config = {"learning_rate": 0.02, "architecture": "CNN", "dataset": "CIFAR-100", "epochs": 5}
run = wandb.init(project="parity-wandb", name="quickstart", config=config, tags=["baseline", "cnn"])
run.config.update({"batch_size": 64})
wandb.config.dropout = 0.1

offset = 0.1
for epoch in range(2, run.config.epochs):
    acc = 1 - 2**-epoch - offset / epoch
    loss = 2**-epoch + offset / epoch
    run.log({"acc": acc, "loss": loss})

rng = np.random.default_rng(0)
pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
run.log({"examples": wandb.Image(pixels, caption="a sample")})
table = wandb.Table(columns=["id", "prediction", "truth"])
for index in range(3):
    table.add_data(index, index % 2, 1)
run.log({"predictions": table})
run.log({"weights": wandb.Histogram(rng.normal(size=1000).tolist())})
run.log({"val_acc": 0.9, "val_loss": 0.1}, commit=False)
run.log({"lr": 0.01})
run.summary["best_acc"] = 0.95

with open("model.pt", "wb") as handle:
    handle.write(b"weights" * 100)
artifact = wandb.Artifact("model", type="model")
artifact.add_file("model.pt")
run.log_artifact(artifact)
run.finish()
