"""A Noether-style tracker (shared/reference/noether-trackers.rst): a BaseTracker whose
WandBTracker kind the trainer builds from the `tracker` config section; callbacks call
`self.tracker.log({...})`."""

import wandb


class BaseTracker:
    def log(self, values: dict) -> None:
        raise NotImplementedError


class WandBTracker(BaseTracker):
    def __init__(self, project: str, entity: str | None = None, mode: str = "online") -> None:
        self.project, self.entity, self.mode = project, entity, mode
        self.run = None

    def start(self, config: dict, run_name: str) -> None:
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, config=config, name=run_name
        )

    def log(self, values: dict) -> None:
        wandb.log(values)

    def set_summary(self, key: str, value: object) -> None:
        self.run.summary[key] = value

    def finish(self) -> None:
        wandb.finish()


class LossCallback:
    def __init__(self, tracker: BaseTracker) -> None:
        self.tracker = tracker

    def after_update(self, update: int, loss: float) -> None:
        self.tracker.log({"loss": loss, "update": update})


tracker = WandBTracker(project="parity-noether", entity=None, mode="offline")
tracker.start({"model": "transformer", "optim": {"lr": 1e-4, "wd": 0.05}}, run_name="noether")
callback = LossCallback(tracker)
for update in range(5):
    callback.after_update(update, 1.0 / (update + 1))
tracker.log({"accuracy": 0.9, "loss/test": 0.2})
tracker.set_summary("best_accuracy", 0.9)
tracker.finish()
