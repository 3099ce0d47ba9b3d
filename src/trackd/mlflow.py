"""`import trackd.mlflow as mlflow`: MLflow's fluent tracking API, sent through trackd.

The experiment is the trackd project; an MLflow run is a trackd run whose id is what
`active_run().info.run_id` says (32 hex digits, as MLflow's), so `start_run(run_id=...)`
resumes it. MLflow's semantics are kept: a logging call with no active run starts one;
each metric key is its own series, at step 0 unless given, with the caller's timestamp
(ms) when given; params are stringified, cut at 6000 characters with a warning, and cannot
change; `start_run` as a context manager ends the run FAILED when its block raises; a
nested run carries `mlflow.parentRunId` (the MLflow sink makes it the parent's MLflow id).

Tracking calls not listed here raise `NotImplementedError`; any other name
(`search_runs`, `MlflowClient`, `get_run`) is the real mlflow's, imported on first use and
pointed at the tracking URI given to `set_tracking_uri`. Importing this module imports
neither mlflow nor numpy.
"""

from __future__ import annotations

import os
import re
import time

from trackd.client import registry
from trackd.client.media import Image as _TrackdImage
from trackd.client.run import Run as _TrackdRun
from trackd.client.shim import known_run, real_attribute, remember_run
from trackd.client.values import scalar

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
DEFAULT_EXPERIMENT = "Default"
DEFAULT_EXPERIMENT_ID = "0"
STATUSES = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}
PARENT_TAG = "mlflow.parentRunId"
_KEY = re.compile(r"^[/\w.\- :]*$")  # MLflow's rule for metric, param and tag names
UNSUPPORTED = frozenset(
    {"autolog", "log_table", "log_input", "log_inputs", "log_outputs", "log_model"}
    | {"set_experiment_tag", "set_experiment_tags", "delete_tag", "log_trace", "start_span"}
    | {"log_param_async", "last_active_run", "get_parent_run"}
)

GOOD_KEYS_KEPT = 100_000
_good_keys: set[str] = set()  # metric names already checked against MLflow's rule
_tracking_uri: str | None = None
_experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
_stack: list[ActiveRun] = []


class Experiment:
    """What `set_experiment` returns: the experiment's id is its name (the trackd project)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.experiment_id = DEFAULT_EXPERIMENT_ID if name == DEFAULT_EXPERIMENT else name
        self.lifecycle_stage = "active"

    def __repr__(self) -> str:
        return f"<trackd.mlflow.Experiment {self.name!r}>"


class RunInfo:
    """`run.info` as scripts read it."""

    def __init__(self, trackd_run: _TrackdRun, experiment: Experiment) -> None:
        self.run_id = self.run_uuid = trackd_run.id
        self.run_name = trackd_run.name
        self.experiment_id = experiment.experiment_id
        self.start_time = int(time.time() * 1000)
        self.end_time: int | None = None
        self.status = "RUNNING"
        self.lifecycle_stage = "active"
        self.artifact_uri: str | None = None


class RunData:
    """`run.data`: the params and tags this process gave the run (metrics are not kept: as in
    MLflow, whose `active_run().data` is the run as it was when it started)."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}


class ActiveRun:
    """A started run; as a context manager it ends FINISHED, or FAILED when the block raises."""

    def __init__(self, trackd_run: _TrackdRun, experiment: Experiment) -> None:
        self._trackd = trackd_run
        self.info = RunInfo(trackd_run, experiment)
        self.data = RunData()

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            _end(self, "FINISHED")
        else:
            self._trackd.__exit__(exc_type, exc, tb)  # failed, with the traceback
            _end(self, "KILLED" if exc_type is KeyboardInterrupt else "FAILED")

    def __repr__(self) -> str:
        return f"<trackd.mlflow.ActiveRun run_id={self.info.run_id} name={self.info.run_name!r}>"


# --- experiments and runs -------------------------------------------------------------


def set_tracking_uri(uri: str | os.PathLike[str]) -> None:
    """Remembered for the calls that reach the real mlflow (`search_runs`...): what a run logs
    goes where the daemon's sinks send it."""
    global _tracking_uri
    _tracking_uri = os.fspath(uri)
    real = _real_if_imported()
    if real is not None:
        real.set_tracking_uri(_tracking_uri)


def get_tracking_uri() -> str | None:
    return _tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def set_experiment(
    experiment_name: str | None = None, experiment_id: str | None = None
) -> Experiment:
    global _experiment
    if (experiment_name is None) == (experiment_id is None):
        raise ValueError("set_experiment(): pass exactly one of experiment_name, experiment_id")
    name = _experiment_name(experiment_name or experiment_id, "set_experiment()")
    _experiment = name
    return Experiment(name)


def create_experiment(
    name: str, artifact_location: str | None = None, tags: dict[str, Any] | None = None
) -> str:
    """The new experiment's id (its name: the trackd project appears with its first run)."""
    return Experiment(_experiment_name(name, "create_experiment()")).experiment_id


def get_experiment_by_name(name: str) -> Experiment:
    return Experiment(_experiment_name(name, "get_experiment_by_name()"))


def start_run(
    run_id: str | None = None,
    experiment_id: str | None = None,
    run_name: str | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
    log_system_metrics: bool | None = None,
) -> ActiveRun:
    """Start a run, or resume one (`run_id`); nested under the active run with nested=True."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    if _stack and not nested:
        raise RuntimeError(
            f"Run with UUID {_stack[0].info.run_id} is already active. To start a new run, first "
            "end the current run with mlflow.end_run(). To start a nested run, call start_run "
            "with nested=True"
        )
    name, experiment = run_name, experiment_id
    if run_id is not None:
        known = known_run(run_id)
        if known is not None:
            name, experiment = name or known.get("name"), experiment or known.get("project")
    project = _experiment_name(experiment, "start_run()") if experiment else _experiment
    run_tags = _tags(tags or {}, "start_run(): tags")
    parent = parent_run_id or (_stack[-1].info.run_id if nested and _stack else None)
    if parent:
        run_tags[PARENT_TAG] = parent
    if description:
        run_tags["mlflow.note.content"] = description
    trackd_run = _TrackdRun(
        project,
        name,
        tags=run_tags,
        resume="must" if run_id is not None else None,
        run_id=run_id,
    )
    registry.register(trackd_run)
    remember_run(trackd_run)  # MLflow resumes by run id alone, so offline too
    active = ActiveRun(trackd_run, Experiment(project))
    active.data.tags.update(run_tags)
    _stack.append(active)
    return active


def active_run() -> ActiveRun | None:
    return _stack[-1] if _stack else None


def end_run(status: str = "FINISHED") -> None:
    if _stack:
        _end(_stack[-1], status)


def _end(active: ActiveRun, status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"end_run(): status must be one of {list(STATUSES)}, got {status!r}")
    if active in _stack:
        _stack.remove(active)
    active._trackd.finish(STATUSES[status])
    active.info.status = status
    active.info.end_time = int(time.time() * 1000)


# --- logging ----------------------------------------------------------------------------


def log_param(key: str, value: Any, synchronous: bool | None = None) -> Any:
    """Stringify, cut at MLflow's limit with a warning, and refuse a changed value."""
    log_params({key: value})
    return str(value)[:MAX_PARAM_VALUE]


def log_params(
    params: dict[str, Any], synchronous: bool | None = None, run_id: str | None = None
) -> None:
    active = _run_for(run_id, "log_params")
    if not isinstance(params, dict):
        raise TypeError(f"log_params(): params must be a dict, got {type(params).__name__}")
    stored = active.data.params
    new = {}
    for key, value in params.items():
        _check_key(key, "param")
        text = _limited(str(value), MAX_PARAM_VALUE, "Param value")
        if key in stored:
            if stored[key] != text:
                raise ValueError(
                    f"log_param(): changing param values is not allowed: param {key!r} was "
                    f"{stored[key][:100]!r}, got {text[:100]!r}"
                )
            continue
        new[key] = text
    if new:
        active._trackd.log_config(new)
        stored.update(new)


def log_metric(
    key: str,
    value: float,
    step: int | None = None,
    synchronous: bool | None = None,
    timestamp: int | None = None,
    run_id: str | None = None,
    **kwargs: Any,
) -> None:
    """One point of the series `key`: at `step` (default 0), at `timestamp` ms (default now)."""
    _log_row(_run_for(run_id, "log_metric"), {key: value}, step, timestamp, "log_metric")


def log_metrics(
    metrics: dict[str, float],
    step: int | None = None,
    synchronous: bool | None = None,
    run_id: str | None = None,
    timestamp: int | None = None,
    **kwargs: Any,
) -> None:
    if not isinstance(metrics, dict):
        raise TypeError(f"log_metrics(): metrics must be a dict, got {type(metrics).__name__}")
    _log_row(_run_for(run_id, "log_metrics"), metrics, step, timestamp, "log_metrics")


def _log_row(
    active: ActiveRun,
    values: dict[str, Any],
    step: int | None,
    timestamp: int | None,
    call: str,
) -> None:
    """Queue trackd's row of values with MLflow's step and time: the hot path of a
    training loop, so a key checked once is not checked again and floats pass as they are."""
    row: dict[str, float] = {}
    for key, value in values.items():
        if key not in _good_keys:
            _check_key(key, "metric")
            if len(_good_keys) < GOOD_KEYS_KEPT:
                _good_keys.add(key)
        row[key] = value if type(value) is float else float(scalar(value, f"{call}(): {key!r}"))
    if step is None:
        step = 0
    elif type(step) is not int:
        raise TypeError(f"{call}(): step must be an int, got {type(step).__name__}")
    if timestamp is not None and type(timestamp) is not int:
        raise TypeError(f"{call}(): timestamp must be an int (ms), got {type(timestamp).__name__}")
    trackd_run = active._trackd
    ts = time.time() if timestamp is None else timestamp / 1000
    with trackd_run._lock:
        enqueue = trackd_run._enqueue
        if enqueue is not None:
            enqueue(step, ts, row)


def set_tag(key: str, value: Any, synchronous: bool | None = None) -> None:
    set_tags({key: value})


def set_tags(tags: dict[str, Any], synchronous: bool | None = None) -> None:
    active = _run_for(None, "set_tags")
    values = _tags(tags, "set_tags()")
    active._trackd.set_tags(values)
    active.data.tags.update(values)


def log_artifact(
    local_path: str | os.PathLike[str], artifact_path: str | None = None, run_id: str | None = None
) -> None:
    """A file, or a directory (stored under its own name, as MLflow does)."""
    active = _run_for(run_id, "log_artifact")
    path = os.fspath(local_path)
    if os.path.isdir(path):
        folder = os.path.basename(os.path.normpath(path))
        _log_tree(active, path, _join(artifact_path, folder))
        return
    if not os.path.isfile(path):
        raise ValueError(f"log_artifact(): {path!r} is not a file or directory")
    active._trackd.log_artifact(path, name=_join(artifact_path, os.path.basename(path)))


def log_artifacts(
    local_dir: str | os.PathLike[str], artifact_path: str | None = None, run_id: str | None = None
) -> None:
    active = _run_for(run_id, "log_artifacts")
    root = os.fspath(local_dir)
    if not os.path.isdir(root):
        raise ValueError(f"log_artifacts(): {root!r} is not a directory")
    _log_tree(active, root, artifact_path)


def _log_tree(active: ActiveRun, root: str, artifact_path: str | None) -> None:
    for folder, _, files in os.walk(root):
        for file in sorted(files):
            path = os.path.join(folder, file)
            entry = os.path.relpath(path, root).replace(os.sep, "/")
            active._trackd.log_artifact(path, name=_join(artifact_path, entry))


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    if not isinstance(text, str):
        raise TypeError(f"log_text(): text must be a string, got {type(text).__name__}")
    _log_bytes(_run_for(run_id, "log_text"), text.encode(), artifact_file)


def log_dict(dictionary: dict[str, Any], artifact_file: str, run_id: str | None = None) -> None:
    """JSON, or YAML for a `.yaml`/`.yml` file, as MLflow writes them."""
    import json

    active = _run_for(run_id, "log_dict")
    if artifact_file.endswith((".yaml", ".yml")):
        import yaml  # type: ignore[import-untyped]

        text = yaml.dump(dictionary, default_flow_style=False)
    else:
        text = json.dumps(dictionary, indent=2)
    _log_bytes(active, text.encode(), artifact_file)


def log_figure(
    figure: Any,
    artifact_file: str,
    *,
    save_kwargs: dict[str, Any] | None = None,
) -> None:
    """A matplotlib figure (`savefig`) or a plotly one (`write_html` / `write_image`)."""
    import tempfile

    active = _run_for(None, "log_figure")
    with tempfile.TemporaryDirectory(prefix="trackd-mlflow-") as folder:
        path = os.path.join(folder, os.path.basename(artifact_file))
        if hasattr(figure, "savefig"):
            figure.savefig(path, **(save_kwargs or {}))
        elif hasattr(figure, "write_html") and path.endswith(".html"):
            figure.write_html(path, **(save_kwargs or {}))
        elif hasattr(figure, "write_image"):
            figure.write_image(path, **(save_kwargs or {}))
        else:
            raise TypeError(f"log_figure(): unsupported figure type {type(figure).__name__}")
        active._trackd.log_artifact(path, name=artifact_file)


def log_image(
    image: Any,
    artifact_file: str | None = None,
    key: str | None = None,
    step: int | None = None,
    timestamp: int | None = None,
    synchronous: bool | None = None,
) -> None:
    """With `artifact_file`: the image as that artifact. With `key` (and `step`): a trackd
    image at that step (the MLflow sink names it `media/KEY/STEP-SHA8.png`)."""
    active = _run_for(None, "log_image")
    if (artifact_file is None) == (key is None):
        raise ValueError("log_image(): pass exactly one of artifact_file, key")
    picture = _TrackdImage(image)
    if key is not None:
        active._trackd.log({key: picture}, step=0 if step is None else step)
        return
    _log_bytes(active, picture.data, str(artifact_file))


def _log_bytes(active: ActiveRun, data: bytes, artifact_file: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trackd-mlflow-") as folder:
        path = os.path.join(folder, os.path.basename(artifact_file))
        with open(path, "wb") as handle:
            handle.write(data)
        active._trackd.log_artifact(path, name=artifact_file)


# --- helpers ----------------------------------------------------------------------------


def _run_for(run_id: str | None, call: str) -> ActiveRun:
    """The active run (started in the current experiment if there is none, as MLflow does)."""
    if not _stack:
        start_run()
    active = _stack[-1]
    if run_id is not None and run_id != active.info.run_id:
        for other in _stack:
            if other.info.run_id == run_id:
                return other
        raise NotImplementedError(f"mlflow.{call}(run_id=...) to a run that is not active")
    return active


def _experiment_name(value: object, call: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{call}: experiment must be a non-empty string, got {value!r}")
    return DEFAULT_EXPERIMENT if value == DEFAULT_EXPERIMENT_ID else value


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, str) or not _KEY.match(key) or len(key) > MAX_KEY:
        raise ValueError(
            f"invalid {what} name {key!r}: names may hold alphanumerics, underscores, dashes, "
            f"periods, spaces, colons and slashes, at most {MAX_KEY} characters"
        )


def _tags(tags: object, what: str) -> dict[str, str]:
    if not isinstance(tags, dict):
        raise TypeError(f"{what}: tags must be a dict, got {type(tags).__name__}")
    values = {}
    for key, value in tags.items():
        _check_key(key, "tag")
        values[key] = _limited(str(value), MAX_TAG_VALUE, "Tag value")
    return values


def _limited(text: str, limit: int, what: str) -> str:
    if len(text) <= limit:
        return text
    import logging

    logging.getLogger("trackd.mlflow").warning(
        "%s '%s...' (%d characters) is truncated to %d characters to meet the length limit.",
        what,
        text[:100],
        len(text),
        limit,
    )
    return text[:limit]


def _join(folder: str | None, name: str) -> str:
    return f"{folder.strip('/')}/{name}" if folder else name


def _real_if_imported() -> Any:
    import sys

    return sys.modules.get("mlflow")


def __getattr__(name: str) -> Any:
    found = real_attribute("mlflow", name, UNSUPPORTED)
    real = _real_if_imported()
    if _tracking_uri is not None and real is not None and real.get_tracking_uri() != _tracking_uri:
        real.set_tracking_uri(_tracking_uri)  # the real mlflow reads where the runs went
    return found


__all__ = [
    "ActiveRun",
    "active_run",
    "create_experiment",
    "end_run",
    "get_experiment_by_name",
    "get_tracking_uri",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_figure",
    "log_image",
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "log_text",
    "set_experiment",
    "set_tag",
    "set_tags",
    "set_tracking_uri",
    "start_run",
]
