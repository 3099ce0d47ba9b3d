"""trackd as a PyTorch Lightning logger.

    logger = TrackdLogger(project="p", run_name="r")
    trainer = lightning.Trainer(logger=logger, max_epochs=3)
    trainer.fit(model)   # hparams -> config, self.log(...) -> metrics, finished at the end

Like Lightning's own loggers it acts on global rank 0 only; elsewhere
`experiment` is Lightning's no-op stand-in.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from trackd import Run
from trackd.integrations._common import RunHandle, plain

__all__ = ["TrackdLogger"]

# Lightning's finalize() statuses: "success" after a stage, "failed" when it raised,
# "finished" before a SLURM requeue.
FINISHED = frozenset({"success", "finished"})


class TrackdLogger(Logger):
    """`TrackdLogger(project, run_name=None, **init_kwargs)`; `init_kwargs` go to `trackd.init`.

    `name` is the project and `version` the run's directory name (`RUNNAME-RUNID8`),
    which is where Lightning puts checkpoints under `default_root_dir`. The run
    starts when Lightning first asks for `experiment`; `finalize("success")`
    finishes it, `finalize("failed")` marks it failed with the traceback.
    """

    def __init__(self, project: str, run_name: str | None = None, **init_kwargs: Any) -> None:
        super().__init__()
        self.project = project
        self.run_name = run_name
        self._handle = RunHandle(project, run_name, init_kwargs)

    @property
    def name(self) -> str:
        return self.project

    @property
    def version(self) -> str | None:
        run = self._handle.run
        if run is None and getattr(rank_zero_only, "rank", 0) == 0:
            run = self._handle.live()
        return f"{run.name}-{run.id[:8]}" if run is not None else self.run_name

    @property
    @rank_zero_experiment
    def experiment(self) -> Run:
        """The trackd run, started on first access."""
        return self._handle.run or self._handle.live()

    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        values = plain(params)
        if isinstance(values, Mapping) and values:
            self._handle.live().log_config(dict(values))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._handle.live().log(dict(metrics), step=step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._handle.end(failed=status not in FINISHED)
