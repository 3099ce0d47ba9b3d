"""trackd as a Hugging Face Accelerate tracker.

    accelerator = Accelerator(log_with=[TrackdTracker(project="p", run_name="r")])
    accelerator.init_trackers("p", config={"lr": 1e-3})
    accelerator.log({"loss": loss}, step=step)
    accelerator.end_training()

Like Accelerate's own trackers, every method acts on the main process only.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

# accelerate ships no type hints (no py.typed); `unused-ignore` keeps this line clean once
# pyproject.toml's mypy overrides set ignore_missing_imports for accelerate.*
from accelerate.tracking import (  # type: ignore[import-untyped, unused-ignore]
    GeneralTracker,
    on_main_process,
)

from trackd import Image, Run, Table
from trackd.client.media import Media
from trackd.integrations._common import RunHandle, plain, split_metrics

__all__ = ["TrackdTracker"]

log = logging.getLogger("trackd.integrations.accelerate")


class TrackdTracker(GeneralTracker):  # type: ignore[misc]  # GeneralTracker is untyped (Any)
    """`TrackdTracker(project, run_name=None, **init_kwargs)`; `init_kwargs` go to `trackd.init`.

    The run starts in `init_trackers()`; its config is the `config` given there;
    `end_training()` finishes it. Text values passed to `log()` go to the summary. Like
    accelerate's W&B and MLflow trackers it offers `log_images`, `log_table`,
    `log_artifact`, `log_artifacts` and `log_figure`, so code calling them through
    `accelerator.get_tracker("trackd")` keeps working.
    """

    name = "trackd"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, project: str, run_name: str | None = None, **init_kwargs: Any) -> None:
        self.project = project
        self.run_name = run_name
        self._handle = RunHandle(project, run_name, init_kwargs)
        self._dropped: set[str] = set()  # keys already warned about
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
        """Numbers (and trackd media) as a row; text to the summary; any other value is
        dropped with a warning, once per key, as accelerate's MLflow tracker drops what
        is not a number."""
        media = {key: value for key, value in values.items() if isinstance(value, Media)}
        metrics, other = split_metrics({k: v for k, v in values.items() if k not in media})
        text = {key: value for key, value in other.items() if isinstance(value, str)}
        for key in other.keys() - text.keys() - self._dropped:
            self._dropped.add(key)
            log.warning(
                "TrackdTracker: %r is a %s, not a number or text; dropped",
                key,
                type(values.get(key, other[key])).__name__,
            )
        run = self._handle.live()
        if metrics or media:
            run.log({**metrics, **media}, step=step)
        if text:
            run.set_summary(text)

    @on_main_process  # type: ignore[untyped-decorator]
    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """W&B's tracker's call: {key: [images]} (arrays or PIL images); one image is logged
        under its key, several under `KEY/0`, `KEY/1`, ... (a trackd key holds one)."""
        row: dict[str, Any] = {}
        for key, images in values.items():
            listed = list(images) if isinstance(images, list | tuple) else [images]
            for index, image in enumerate(listed):
                name = key if len(listed) == 1 else f"{key}/{index}"
                row[name] = image if isinstance(image, Image) else Image(image)
        self._handle.live().log(row, step=step)

    @on_main_process  # type: ignore[untyped-decorator]
    def log_table(
        self,
        table_name: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """W&B's tracker's call: a `trackd.Table` under `table_name`."""
        table = Table(columns=columns, data=data, dataframe=dataframe)
        self._handle.live().log({table_name: table}, step=step)

    @on_main_process  # type: ignore[untyped-decorator]
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """MLflow's tracker's call: the file, named `ARTIFACT_PATH/BASENAME`."""
        name = os.path.basename(local_path)
        self._handle.live().log_artifact(
            local_path, name=posixpath.join(artifact_path, name) if artifact_path else name
        )

    @on_main_process  # type: ignore[untyped-decorator]
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """MLflow's tracker's call: every file below `local_dir`, named by its path there."""
        run = self._handle.live()
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            run.log_artifact(
                path, name=posixpath.join(artifact_path, relative) if artifact_path else relative
            )

    @on_main_process  # type: ignore[untyped-decorator]
    def log_figure(self, figure: Any, artifact_file: str, **save_kwargs: Any) -> None:
        """MLflow's tracker's call: a matplotlib or plotly figure saved as `artifact_file`
        (its extension picks the format, as `mlflow.log_figure` does) and logged as an
        artifact of that name."""
        with tempfile.TemporaryDirectory(prefix="trackd-figure-") as scratch:
            path = os.path.join(scratch, posixpath.basename(artifact_file))
            if hasattr(figure, "savefig"):  # matplotlib
                figure.savefig(path, **save_kwargs)
            elif path.endswith(".html") and hasattr(figure, "write_html"):  # plotly
                figure.write_html(path, **save_kwargs)
            elif hasattr(figure, "write_image"):
                figure.write_image(path, **save_kwargs)
            else:
                raise TypeError(
                    f"log_figure(): expected a matplotlib or plotly figure, "
                    f"got {type(figure).__name__}"
                )
            self._handle.live().log_artifact(path, name=artifact_file)

    @on_main_process  # type: ignore[untyped-decorator]
    def finish(self) -> None:
        self._handle.end()
