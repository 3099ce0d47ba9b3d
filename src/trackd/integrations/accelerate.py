"""trackd as a Hugging Face Accelerate tracker.

    accelerator = Accelerator(log_with=[TrackdTracker(project="p", run_name="r")])
    accelerator.init_trackers("p", config={"lr": 1e-3})
    accelerator.log({"loss": loss}, step=step)
    accelerator.end_training()

Like Accelerate's own trackers, every method acts on the main process only.
"""

from __future__ import annotations

from typing import Any

# accelerate ships no type hints (no py.typed); `unused-ignore` keeps this line clean once
# pyproject.toml's mypy overrides set ignore_missing_imports for accelerate.*
from accelerate.tracking import (  # type: ignore[import-untyped, unused-ignore]
    GeneralTracker,
    on_main_process,
)

from trackd import Run
from trackd.integrations._common import RunHandle, plain, split_metrics

__all__ = ["TrackdTracker"]


class TrackdTracker(GeneralTracker):  # type: ignore[misc]  # GeneralTracker is untyped (Any)
    """`TrackdTracker(project, run_name=None, **init_kwargs)`; `init_kwargs` go to `trackd.init`.

    The run starts in `init_trackers()`; its config is the `config` given there;
    `end_training()` finishes it. Text values passed to `log()` go to the summary.
    """

    name = "trackd"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, project: str, run_name: str | None = None, **init_kwargs: Any) -> None:
        self.project = project
        self.run_name = run_name
        self._handle = RunHandle(project, run_name, init_kwargs)
        super().__init__()

    @property
    def tracker(self) -> Run:
        """The trackd run (once `init_trackers()` has started it, on the main process)."""
        if self._handle.run is None:
            raise AttributeError("TrackdTracker.tracker: no run yet; call init_trackers() first")
        return self._handle.run

    @on_main_process  # type: ignore[untyped-decorator]  # accelerate's decorators are untyped
    def start(self) -> None:
        self._handle.live()

    @on_main_process  # type: ignore[untyped-decorator]
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self._handle.live().log_config(plain(values))

    @on_main_process  # type: ignore[untyped-decorator]
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        metrics, text = split_metrics(values)
        run = self._handle.live()
        if metrics:
            run.log(metrics, step=step)
        if text:
            run.set_summary(text)

    @on_main_process  # type: ignore[untyped-decorator]
    def finish(self) -> None:
        self._handle.end()
