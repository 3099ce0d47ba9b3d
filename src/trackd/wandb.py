"""`import trackd.wandb as wandb`: W&B's tracking calls, sent through trackd.

The calls a training script makes (`init`, `log`, `config`, `summary`, `finish`, media,
artifacts, `alert`) keep W&B's semantics: `log` accumulates a row until it is committed
(`commit=False`, or `step=` given) and refuses a step below the current one with a warning,
as W&B does. `define_metric`, `watch` and `login` are accepted and do nothing (each marked
once per run; `trackd status` counts them under `ingest.ignored_calls`). Tracking calls not
listed here raise `NotImplementedError`; any other name (`wandb.Api`, `wandb.errors`) is the
real wandb's, imported on first use. Importing this module imports neither wandb nor numpy.

`mode="disabled"` (or `WANDB_MODE=disabled`) disables the run; W&B's "online" and
"offline" both log through the daemon, whose sinks decide where the run goes.
"""

from __future__ import annotations

import os

from trackd.client import registry
from trackd.client.media import Histogram
from trackd.client.media import Image as _TrackdImage
from trackd.client.media import Table as _TrackdTable
from trackd.client.media import Video as _TrackdVideo
from trackd.client.run import Run as _TrackdRun
from trackd.client.shim import (
    check_keys,
    known_run,
    mark_ignored,
    not_supported,
    real_attribute,
    remember_run,
)

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType
    from typing import Any

RESUME = {None: None, False: None, "never": None, "allow": "allow", True: "allow"}
RESUME |= {"auto": "allow", "must": "must"}
REINIT = (None, True, False, "default", "return_previous", "finish_previous", "create_new")
INIT_IGNORED = frozenset(  # accepted: where W&B writes, logs in or what it captures
    {"entity", "dir", "anonymous", "settings", "save_code", "magic", "force"}
    | {"allow_val_change", "config_exclude_keys", "config_include_keys"}
    | {"sync_tensorboard", "tensorboard", "monitor_gym", "project_path"}
)
# Tracking calls of the real module that would act on the real library's run, not ours.
UNSUPPORTED = frozenset(
    {"save", "restore", "use_artifact", "log_model", "use_model", "link_model", "mark_preempting"}
    | {"unwatch", "sweep", "agent", "controller", "attach", "setup", "teardown", "log_code"}
    | {"Object3D", "Molecule", "Audio", "Html", "Plotly", "Graph", "plot", "plot_table"}
)


class AlertLevel:
    """W&B's alert levels (`wandb.AlertLevel.WARN`), as the strings trackd takes."""

    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"


class _PreInit:
    """`wandb.config` / `wandb.summary` before `init()`: using them is an error, as in W&B."""

    _name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError(f"call trackd.wandb.init() before using wandb.{self._name}")

    __getattr__ = __getitem__ = __setattr__ = __setitem__ = _refuse


class Config:
    """`run.config`: attribute and item access; `update` refuses a changed value unless
    `allow_val_change=True`, as W&B's config does."""

    def __init__(self, run: Run) -> None:
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_items", {})

    def _merge(self, values: object, allow_val_change: bool | None, defaults: bool) -> None:
        values = _as_dict(values, "config")
        items: dict[str, Any] = self._items
        changes = {}
        for raw, value in values.items():
            if not isinstance(raw, str):
                raise TypeError(f"config: key {raw!r} must be a string")
            key = raw.strip("-")
            if key in items:
                if defaults or items[key] == value:
                    continue
                if not allow_val_change:
                    raise ValueError(
                        f"config: attempted to change value of key {key!r} from {items[key]!r} "
                        f"to {value!r}; pass allow_val_change=True to config.update()"
                    )
            changes[key] = value
        if changes:
            self._run._trackd.log_config(changes)
            items.update(changes)

    def update(self, d: object, allow_val_change: bool | None = None) -> None:
        self._merge(d, allow_val_change, defaults=False)

    def setdefaults(self, d: object) -> None:
        self._merge(d, None, defaults=True)

    def __setitem__(self, key: str, value: object) -> None:
        self._merge({key: value}, None, defaults=False)

    def __setattr__(self, key: str, value: object) -> None:
        self[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._items[key]
        except KeyError:
            raise AttributeError(f"wandb config has no key {key!r}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._items.items())

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


class Summary:
    """`run.summary`: what the script set (each metric's last value is added by the sink)."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._items: dict[str, Any] = {}

    def update(self, d: object) -> None:
        values = _as_dict(d, "summary")
        self._run._trackd.set_summary(values)
        self._items.update(values)

    def __setitem__(self, key: str, value: object) -> None:
        self.update({key: value})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def keys(self) -> list[str]:
        return list(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


class Run:
    """What `wandb.init()` returns: W&B's step and commit rules over a trackd run."""

    _UNSUPPORTED = UNSUPPORTED | {"use_artifact", "link_artifact", "log_model", "upsert_artifact"}

    def __init__(self, trackd_run: _TrackdRun, tags: list[str], notes: str | None) -> None:
        self._trackd = trackd_run
        self._log = trackd_run.log
        self._step = trackd_run._step  # after a resume: past the run's highest step
        self._pending: dict[str, Any] | None = None
        self._remembered = False  # started with an id: its last step noted for offline resumes
        self.config = Config(self)
        self.summary = Summary(self)
        self.tags = tuple(tags)
        self.notes = notes

    @property
    def id(self) -> str:
        return self._trackd.id

    @property
    def name(self) -> str:
        return self._trackd.name

    @property
    def project(self) -> str:
        return self._trackd.project

    @property
    def group(self) -> str | None:
        return self._trackd.group

    @property
    def step(self) -> int:
        return self._step

    @property
    def disabled(self) -> bool:
        return self._trackd.mode == "disabled"

    def log(
        self, data: dict[str, Any], step: int | None = None, commit: bool | None = None
    ) -> None:
        """W&B's rules: without `step` a row is committed (unless commit=False) and the step
        moves on; with a higher `step` the pending row is committed and the new one waits
        for a later step or commit=True; a lower `step` is ignored with a warning."""
        if step is None and commit is None and self._pending is None:
            try:  # the common case: one row, committed at once (inlined: a call costs 0.1 µs)
                self._log(data, self._step)
            except TypeError as error:
                self._log_converted(data, self._step, error)
            self._step += 1
            return
        if not isinstance(data, dict):
            raise TypeError(f"log(): data must be a dict, got {type(data).__name__}")
        if step is not None:
            if type(step) is not int:
                raise TypeError(f"log(): step must be an int, got {type(step).__name__}")
            if step < self._step:
                import logging

                logging.getLogger("trackd.wandb").warning(
                    "trackd.wandb: tried to log to step %d that is less than the current step "
                    "%d; steps must be monotonically increasing, so this data will be ignored",
                    step,
                    self._step,
                )
                return
            if step > self._step:
                self._commit()
                self._step = step
        elif commit is None:
            commit = True
        pending = self._pending if self._pending is not None else {}
        pending.update(data)
        self._pending = pending
        if commit:
            self._commit()

    def _commit(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self._send(pending, self._step)
            self._step += 1

    def _send(self, data: dict[str, Any], step: int) -> None:
        try:
            self._log(data, step)
        except TypeError as error:
            self._log_converted(data, step, error)

    def _log_converted(self, data: dict[str, Any], step: int, error: TypeError) -> None:
        """A row trackd refused: with W&B-only objects (a Table built row by row) made
        trackd's it goes again; without any, the refusal stands."""
        converted = _trackd_values(data)
        if converted is data:
            raise error
        self._log(converted, step)

    def log_artifact(
        self,
        artifact_or_path: Artifact | str | os.PathLike[str],
        name: str | None = None,
        type: str | None = None,
        aliases: list[str] | None = None,
    ) -> Artifact:
        """Each file of the artifact is stored with the run; a one-file artifact keeps the
        artifact's name (trackd artifacts have no type, aliases or versions)."""
        if isinstance(artifact_or_path, Artifact):
            artifact = artifact_or_path
        else:
            path = os.fspath(artifact_or_path)
            artifact = Artifact(name or os.path.basename(path), type or "unspecified")
            artifact.add_file(path)
        entries = artifact.entries
        if not entries:
            raise ValueError(f"log_artifact(): artifact {artifact.name!r} holds no file")
        for entry, source in entries.items():
            label = artifact.name if len(entries) == 1 else f"{artifact.name}/{entry}"
            self._trackd.log_artifact(source, name=label)
        return artifact

    def alert(
        self, title: str, text: str, level: str | None = None, wait_duration: object = None
    ) -> None:
        """Recorded on the run (shown by `trackd tail`); `wait_duration` is not applied."""
        self._trackd.alert(title, text, level=level or AlertLevel.INFO)

    def define_metric(self, name: str, *args: object, **kwargs: object) -> None:
        """Accepted and ignored: every key is charted against the step."""
        mark_ignored(self._trackd, "wandb.define_metric")

    def watch(self, models: object, *args: object, **kwargs: object) -> None:
        """Accepted and ignored: no gradient or parameter histograms are logged."""
        mark_ignored(self._trackd, "wandb.watch")

    def finish(self, exit_code: int | None = None, quiet: bool | None = None) -> None:
        """End the run: a non-zero exit code marks it failed."""
        global run, config, summary
        self._commit()
        if self._remembered:
            remember_run(self._trackd, last_step=self._step - 1)
        self._trackd.finish("failed" if exit_code else "finished")
        if run is self:
            run, config, summary = None, _PreInit("config"), _PreInit("summary")

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._commit()
        if exc_type is None:
            self.finish()
        else:
            self._trackd.__exit__(exc_type, exc, tb)
            self.finish(exit_code=1)

    def __getattr__(self, name: str) -> Any:
        if name in self._UNSUPPORTED:
            return not_supported(f"wandb.Run.{name}")
        raise AttributeError(f"trackd.wandb.Run has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<trackd.wandb.Run {self.project}/{self.name} id={self.id}>"


class Image(_TrackdImage):
    """`wandb.Image(data_or_path, mode=None, caption=None)`: a path, NumPy array or PIL image."""

    pillow_png = True

    def __init__(
        self, data_or_path: Any, mode: str | None = None, caption: str | None = None, **kwargs: Any
    ) -> None:
        _refuse_options("wandb.Image", kwargs, ("grouping", "file_type", "normalize"))
        if mode is not None and hasattr(data_or_path, "shape"):
            from PIL import Image as PILImage

            data_or_path = PILImage.fromarray(data_or_path, mode=mode)
        super().__init__(data_or_path, caption=caption)


class Video(_TrackdVideo):
    """`wandb.Video(data_or_path, caption=None, fps=None, format=None)`."""

    def __init__(
        self,
        data_or_path: Any,
        caption: str | None = None,
        fps: float | None = None,
        format: str | None = None,
    ) -> None:
        super().__init__(data_or_path, caption=caption, fps=fps)


class Table:
    """`wandb.Table(columns, data | rows | dataframe)`, with `add_data` and `add_column`:
    built row by row, so encoded only when logged."""

    def __init__(
        self,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        rows: list[list[Any]] | None = None,
        dataframe: Any = None,
        **kwargs: Any,
    ) -> None:
        _refuse_options("wandb.Table", kwargs, ("dtype", "optional", "allow_mixed_types"))
        if dataframe is not None:
            table = _TrackdTable(dataframe=dataframe)
            columns, data = table.columns, _json_rows(table)
        self.columns: list[str] = list(columns) if columns is not None else []
        given = data if data is not None else rows
        self.data: list[list[Any]] = [list(row) for row in given or []]
        if not self.columns and self.data:
            self.columns = [f"col{index}" for index in range(len(self.data[0]))]

    def add_data(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(
                f"Table.add_data(): {len(values)} values for {len(self.columns)} columns"
            )
        self.data.append(list(values))

    def add_column(self, name: str, data: list[Any]) -> None:
        rows = self.data or [[] for _ in data]
        if len(data) != len(rows):
            raise ValueError(f"Table.add_column(): {name!r} has {len(data)} values")
        self.columns.append(name)
        self.data = [[*row, value] for row, value in zip(rows, data, strict=True)]

    def get_column(self, name: str) -> list[Any]:
        index = self.columns.index(name)
        return [row[index] for row in self.data]

    def to_trackd(self) -> _TrackdTable:
        return _TrackdTable(columns=self.columns, data=self.data)


class Artifact:
    """`wandb.Artifact(name, type)`: files gathered here, stored with the run by
    `run.log_artifact(artifact)`."""

    def __init__(
        self,
        name: str,
        type: str,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Artifact(): name must be a non-empty string, got {name!r}")
        if not isinstance(type, str) or not type:
            raise TypeError(f"Artifact(): type must be a non-empty string, got {type!r}")
        _refuse_options("wandb.Artifact", kwargs, ("incremental", "use_as"))
        self.name, self.type, self.description = name, type, description
        self.metadata = dict(metadata or {})
        self.entries: dict[str, str] = {}  # name inside the artifact -> local file

    def add_file(
        self,
        local_path: str | os.PathLike[str],
        name: str | None = None,
        is_tmp: bool | None = False,
        **kwargs: Any,
    ) -> None:
        source = os.path.abspath(os.fspath(local_path))
        if not os.path.isfile(source):
            raise ValueError(f"Artifact.add_file(): {source!r} is not a file")
        self.entries[name or os.path.basename(source)] = source

    def add_dir(self, local_path: str | os.PathLike[str], name: str | None = None) -> None:
        root = os.fspath(local_path)
        if not os.path.isdir(root):
            raise ValueError(f"Artifact.add_dir(): {root!r} is not a directory")
        for folder, _, files in os.walk(root):
            for file in sorted(files):
                path = os.path.join(folder, file)
                entry = os.path.relpath(path, root)
                self.add_file(path, f"{name}/{entry}" if name else entry)

    def __getattr__(self, name: str) -> Any:
        if name in ("add_reference", "new_file", "add", "remove", "download", "save", "wait"):
            return not_supported(f"wandb.Artifact.{name}")
        raise AttributeError(f"trackd.wandb.Artifact has no attribute {name!r}")


# --- the module's functions, as in W&B ------------------------------------------------

run: Run | None = None
config: Config | _PreInit = _PreInit("config")
summary: Summary | _PreInit = _PreInit("summary")


def init(
    project: str | None = None,
    entity: str | None = None,
    name: str | None = None,
    config: dict[str, Any] | Any = None,
    tags: list[str] | tuple[str, ...] | None = None,
    group: str | None = None,
    job_type: str | None = None,
    notes: str | None = None,
    mode: str | None = None,
    resume: bool | str | None = None,
    id: str | None = None,
    dir: str | os.PathLike[str] | None = None,
    reinit: bool | str | None = None,
    resume_from: str | None = None,
    fork_from: str | None = None,
    **kwargs: Any,
) -> Run:
    """Start (or resume, with `id=` and `resume=`) a run and make it `wandb.run`."""
    global run, summary
    check_keys("wandb.init", kwargs, INIT_IGNORED)
    if resume_from or fork_from:
        raise NotImplementedError("wandb.init(resume_from=/fork_from=) is not supported")
    if resume not in RESUME:
        raise ValueError(f"wandb.init(): resume must be one of {list(RESUME)}, got {resume!r}")
    if reinit not in REINIT:
        raise ValueError(f"wandb.init(): reinit must be one of {REINIT}, got {reinit!r}")
    mode = mode or os.environ.get("WANDB_MODE") or "online"
    if mode not in ("online", "offline", "disabled", "dryrun", "run", "shared"):
        raise ValueError(f"wandb.init(): mode {mode!r} is not a W&B mode")
    if run is not None and reinit != "create_new":
        if reinit in (None, False, "default", "return_previous"):
            return run
        run.finish()
    wanted = resume or not name or not project  # else nothing to learn: no round trip
    known = known_run(id) if id is not None and wanted else None
    project = project or os.environ.get("WANDB_PROJECT") or (known or {}).get("project")
    name = name or os.environ.get("WANDB_NAME") or (known or {}).get("name")
    label_list = list(tags or ())
    trackd_tags = dict.fromkeys(label_list, "")
    if job_type:
        trackd_tags["job_type"] = job_type
    values = _as_dict(config, "wandb.init(): config") if config is not None else {}
    trackd_run = _TrackdRun(
        project or "uncategorized",
        name,
        group,
        tags=trackd_tags,
        resume=RESUME[resume] if id is not None or name else None,
        mode="disabled" if mode == "disabled" else "online",
        run_id=id,
    )
    registry.register(trackd_run)
    if id is not None:
        remember_run(trackd_run)
    new = Run(trackd_run, label_list, notes)
    new._remembered = id is not None
    last = (known or {}).get("last_step") if trackd_run._step == 0 and resume else None
    if isinstance(last, int):  # no daemon answered: continue after what this machine saw
        new._step = last + 1
    new.config.update(values)
    if notes:
        trackd_run.set_tags({"notes": notes})
    for call in sorted(_ignored_before_init):
        mark_ignored(trackd_run, call)
    _ignored_before_init.clear()
    if reinit != "create_new":
        globals()["config"] = new.config
        run, summary = new, new.summary
    return new


def log(data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
    current = run  # not through _current(): this is the training loop's call
    if current is None:
        raise RuntimeError("call trackd.wandb.init() before wandb.log()")
    current.log(data, step, commit)


def finish(exit_code: int | None = None, quiet: bool | None = None) -> None:
    if run is not None:
        run.finish(exit_code)


def log_artifact(
    artifact_or_path: Artifact | str | os.PathLike[str],
    name: str | None = None,
    type: str | None = None,
    aliases: list[str] | None = None,
) -> Artifact:
    return _current("log_artifact").log_artifact(artifact_or_path, name, type, aliases)


def alert(title: str, text: str, level: str | None = None, wait_duration: object = None) -> None:
    _current("alert").alert(title, text, level, wait_duration)


def define_metric(name: str, *args: object, **kwargs: object) -> None:
    """Accepted and ignored (marked once per run)."""
    _ignored("wandb.define_metric")


def watch(models: object, *args: object, **kwargs: object) -> None:
    """Accepted and ignored (marked once per run)."""
    _ignored("wandb.watch")


def login(*args: object, **kwargs: object) -> bool:
    """Accepted and ignored: the daemon's W&B sink is what logs in."""
    _ignored("wandb.login")
    return True


_ignored_before_init: set[str] = set()


def _ignored(call: str) -> None:
    if run is None:
        _ignored_before_init.add(call)  # `wandb.login()` comes before init: marked at init
    else:
        mark_ignored(run._trackd, call)


def _current(call: str) -> Run:
    if run is None:
        raise RuntimeError(f"call trackd.wandb.init() before wandb.{call}()")
    return run


def _as_dict(values: object, what: str) -> dict[str, Any]:
    if isinstance(values, dict):
        return values
    if hasattr(values, "__dict__") and not isinstance(values, type):  # an argparse Namespace
        return dict(vars(values))
    raise TypeError(f"{what}: expected a dict, got {type(values).__name__}")


def _refuse_options(call: str, given: dict[str, Any], ignored: tuple[str, ...]) -> None:
    for key, value in given.items():
        if key not in ignored and value is not None:
            raise NotImplementedError(f"{call}({key}=...) is not supported by trackd.wandb")


def _json_rows(table: _TrackdTable) -> list[list[Any]]:
    import json

    rows: list[list[Any]] = json.loads(table.data)["data"]
    return rows


def _trackd_values(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with W&B-only objects as trackd's (the same dict when there is none)."""
    converted = {
        key: value.to_trackd() if isinstance(value, Table) else value for key, value in data.items()
    }
    changed = any(converted[key] is not data[key] for key in data)
    return converted if changed else data


def __getattr__(name: str) -> Any:
    return real_attribute("wandb", name, UNSUPPORTED)


__all__ = [
    "AlertLevel",
    "Artifact",
    "Histogram",
    "Image",
    "Run",
    "Table",
    "Video",
    "alert",
    "config",
    "define_metric",
    "finish",
    "init",
    "log",
    "log_artifact",
    "login",
    "run",
    "summary",
    "watch",
]
