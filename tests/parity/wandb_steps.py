"""W&B's step and commit rules as its logging docs show them: explicit steps, rows built
over several calls with commit=False, a step below the current one (ignored with a
warning), define_metric."""

import wandb

run = wandb.init(project="parity-wandb", name="steps", config={"seed": 7})
wandb.define_metric("val/loss", summary="min")
for step in range(0, 10, 3):
    wandb.log({"train/loss": 1 / (step + 1)}, step=step)
    wandb.log({"train/acc": step / 10}, step=step)
wandb.log({"late": 1.0}, step=4)  # below the current step: ignored, as W&B does
wandb.log({"val/loss": 0.5}, commit=False)
wandb.log({"val/acc": 0.7})
wandb.log({"epoch": 1})
wandb.summary.update({"final": "done"})
wandb.finish()
