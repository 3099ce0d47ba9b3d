"""The sink contract, and the registry that finds sinks by kind.

A sink is three calls, in the shape of an OpenTelemetry exporter:

* ``open(context)``: connect, create directories, and restore from
  ``context.state`` (what ``checkpoint()`` returned at the last durable
  cursor) so that a batch written again after a crash lands once;
* ``write(batch)``: deliver records in WAL order; return normally only when
  they are stored;
* ``close()``: release everything; safe to call twice.

``checkpoint()`` returns the JSON-able state the fan-out saves atomically
with the sink's cursor (the default: none).

Errors::

    Exception
     └── SinkError(retriable: bool)   raised by write/open, mapped once at the boundary
          ├── retriable=True    connection refused, timeout, 5xx, 429: backoff and retry
          └── retriable=False   validation, 4xx: the record goes to the dead-letter file

Any other exception escaping a sink is a bug in it; the fan-out counts it,
logs it with its traceback once, and retries.

Sinks register in the ``trackd.sinks`` entry-point group under their kind and
are built from a spec string ``KIND:TARGET[?key=value&...]`` or a config
table ``{kind = ..., <target_key> = ..., ...}``. A sink imports its SDK in
``open()``, never at module import.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from trackd.jsonfile import read_json, write_json_atomic

ENTRY_POINT_GROUP = "trackd.sinks"


class SinkError(Exception):
    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What every record's run looks like to a sink, from its run_start."""

    id: str
    project: str
    name: str
    group: str | None = None
    host: str | None = None
    pid: int | None = None
    rank: int | None = None
    started: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, object]:
        """The trackd side of the run, stored beside each backend's own run id so a backend
        run leads back to its trackd run, host, process and rank (absent fields left out)."""
        fields: dict[str, object] = {"run_id": self.id, "project": self.project}
        fields |= {"group": self.group, "host": self.host, "pid": self.pid, "rank": self.rank}
        fields["started"] = self.started
        return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Record:
    """One WAL record: a protocol message (`type`, `body`) of `run`, at WAL `position`."""

    position: tuple[int, int]
    type: str
    run: RunInfo
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SinkContext:
    state: dict[str, Any] | None
    state_dir: Path


class Sink:
    kind: ClassVar[str]
    target_key: ClassVar[str]
    # Metric rows per batch at most: a slow backend gets smaller batches, so its cursor
    # (saved after each) moves every few seconds even through a large backlog.
    batch_rows: ClassVar[int] = 100_000
    # The options a spec may give (`KIND:TARGET?NAME=VALUE`): any other is refused at start-up,
    # naming the known ones, so that a misspelt option is not silently ignored. None (the
    # default for third-party sinks) leaves options unchecked.
    known_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, target: str, **options: str) -> None:
        known = self.known_options
        if known is not None and (unknown := sorted(set(options) - set(known))):
            raise ValueError(
                f"{self.kind} sink: unknown option {unknown[0]!r}"
                f" (known: {', '.join(known) or 'none'})"
            )
        self.target = target
        self.options = options

    def choice(self, option: str, choices: tuple[str, ...], default: str) -> str:
        """A spec option that takes one of a few words (e.g. `mode`), refused at start-up
        naming the choices when it is anything else."""
        value = self.options.get(option) or default
        if value not in choices:
            raise ValueError(f"{self.kind} sink: {option} must be one of {choices}, got {value!r}")
        return value

    def open(self, context: SinkContext) -> None:
        raise NotImplementedError

    def write(self, batch: list[Record]) -> None:
        raise NotImplementedError

    def checkpoint(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        raise NotImplementedError

    def concurrency(self) -> dict[str, Any] | None:
        """For a sink that sends calls concurrently, its limit now and the figures behind it
        (`concurrency.ConcurrencyLimit.status`): `trackd status` shows them."""
        return None

    def notice_counts(self) -> dict[str, int]:
        """How often each notice (see `Notices`) came up: `trackd status` shows them."""
        notices = getattr(self, "_notices", None)
        return dict(notices.counts) if isinstance(notices, Notices) else {}


@dataclass(frozen=True)
class SinkSpec:
    kind: str
    target: str
    options: dict[str, str]

    @property
    def text(self) -> str:
        query = "&".join(f"{key}={value}" for key, value in sorted(self.options.items()))
        return f"{self.kind}:{self.target}" + (f"?{query}" if query else "")

    @property
    def shown(self) -> str:
        """The spec as logs, `trackd status` and `config show` show it: secrets masked."""
        options = self.shown_options
        query = "&".join(f"{key}={value}" for key, value in sorted(options.items()))
        return f"{self.kind}:{self.shown_target}" + (f"?{query}" if query else "")

    @property
    def shown_target(self) -> str:
        return _URL_PASSWORD.sub(r"//\1:***@", self.target)

    @property
    def shown_options(self) -> dict[str, str]:
        """Options with secret-looking values masked, and the values (not the names) of
        a header table (e.g. aim's `headers`: proxy credentials, `Authorization`)."""
        return {key: _shown_option(key, value) for key, value in self.options.items()}

    @property
    def name(self) -> str:
        """A stable, file-name-safe identity: the sink's cursor and dead letters are keyed by it."""
        return f"{self.kind}-{hashlib.sha256(self.text.encode()).hexdigest()[:10]}"

    @classmethod
    def parse(cls, text: str) -> SinkSpec:
        kind, sep, rest = text.partition(":")
        if not sep or not kind or not rest:
            raise ValueError(f"sink spec {text!r}: expected KIND:TARGET, e.g. jsonl:/path/to/runs")
        target, _, query = rest.partition("?")
        return cls(kind, target, dict(parse_qsl(query, keep_blank_values=True)))

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> SinkSpec:
        kind = table.get("kind")
        if not isinstance(kind, str):
            raise ValueError('sinks: every [[sinks]] table needs kind = "..."')
        sink_class = sink_class_for(kind)
        options = {key: _option_text(value) for key, value in table.items() if key != "kind"}
        target = options.pop(sink_class.target_key, None)
        if target is None:
            raise ValueError(f'sinks: a {kind} sink needs {sink_class.target_key} = "..."')
        return cls(kind, target, options)

    def build(self) -> Sink:
        return sink_class_for(self.kind)(self.target, **self.options)


_URL_PASSWORD = re.compile(r"//([^:/@]+):([^@/]+)@")
_SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "key")
HEADER_OPTIONS = frozenset({"headers"})


def looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _shown_option(name: str, value: str) -> str:
    if name in HEADER_OPTIONS:
        try:
            table = json.loads(value)
        except ValueError:
            return "***"
        return json.dumps({str(k): "***" for k in table}) if isinstance(table, dict) else "***"
    return "***" if looks_secret(name) else value


def _option_text(value: Any) -> str:
    """A config table's option as a spec option: a nested table (e.g. aim's `headers`) or a
    list as JSON, which its sink parses; anything else as text."""
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def sink_class_for(kind: str) -> type[Sink]:
    found = entry_points(group=ENTRY_POINT_GROUP, name=kind)
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ValueError(f"sink kind {kind!r} is not installed (known: {', '.join(known)})")
    try:
        sink_class: type[Sink] = next(iter(found)).load()
    except ImportError as exc:
        raise ValueError(
            f"sink kind {kind!r} cannot be loaded ({exc}); try: pip install 'trackd[{kind}]'"
        ) from exc
    return sink_class


def call_mapped(
    mapped: Callable[[Exception], SinkError | None], function: Callable[..., Any], *args: Any
) -> Any:
    """Call an SDK function; what it raises is mapped once, here at the boundary, to a
    SinkError by the sink's `mapped` (None: not an SDK failure but a bug, raised as is)."""
    try:
        return function(*args)
    except SinkError:
        raise
    except Exception as exc:
        error = mapped(exc)
        if error is None:
            raise
        raise error from exc


def retriable_status(code: int) -> bool:
    """HTTP statuses worth retrying: timeouts, rate limits and server errors; other 4xx are not."""
    return code in (408, 425, 429) or code >= 500


def is_retriable_os_error(exc: BaseException) -> bool:
    """Whether an OS-level failure may pass: refused or reset connections, timeouts, a full or
    read-only disk, permissions an operator can fix, I/O errors. Only errors that name a bad
    request (an invalid or too-long name) are permanent: retrying costs a wait, while giving
    up sends every record to the dead letters."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno not in _PERMANENT_ERRNOS


_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG})


class RunMap:
    """trackd run id -> the backend's run id, kept durably in the sink's state directory.

    A daemon restart, a replay or `resume="allow"` must continue the backend run it
    created before instead of creating a second one; each sink that creates runs in
    its backend records them here before writing to them.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._map: dict[str, str] = read_json(path)
        except FileNotFoundError:
            self._map = {}
        except ValueError as exc:  # a truncated file must not keep the sink from opening
            logging.getLogger("trackd.sinks").error(
                "%s; starting with no runs known (a run may be created again)", exc
            )
            self._map = {}

    def get(self, run_id: str) -> str | None:
        return self._map.get(run_id)

    def set(self, run_id: str, backend_id: str) -> None:
        self._map[run_id] = backend_id
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path, self._map)


class Notices:
    """Count a recurring condition (a media kind it cannot show, a truncated value); log it once."""

    def __init__(self, sink: str) -> None:
        self._sink = sink
        self.counts: dict[str, int] = {}

    def __call__(self, notice: str) -> None:
        seen = self.counts.get(notice, 0)
        self.counts[notice] = seen + 1
        if not seen:
            logging.getLogger(f"trackd.sinks.{self._sink}").warning("%s: %s", self._sink, notice)


def system_node(run: RunInfo, node: str) -> str | None:
    """The node a `system` sample is filed under in a backend: None for the run's first node.

    Samples of the node rank 0 runs on (or of a run that is not distributed) take the
    backend's plain system-metric names; every other node's carry its host name (as
    MLflow's `system/<node_id>/...` and W&B's node labels do), so the samples of two
    nodes, each with its own daemon feeding the same backend run, never share a key.
    """
    return None if run.rank in (None, 0) and run.host in (None, node) else node


def system_values(
    values: dict[str, float],
    names: dict[str, tuple[str, float]],
    gpu_names: dict[str, tuple[str, float]],
) -> dict[str, float]:
    """A sample's values renamed for a backend: `names` maps trackd's node and process
    names, `gpu_names` those after `gpu.I.`, each to (the backend's name, with `{i}` for
    the GPU index; a factor for its unit). A name the backend has no place for is left out."""
    renamed: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("gpu."):
            index, _, rest = key[4:].partition(".")
            if rest in gpu_names and index.isdigit():
                name, factor = gpu_names[rest]
                renamed[name.format(i=index)] = value * factor
        elif key in names:
            name, factor = names[key]
            renamed[name] = value * factor
    return renamed


def media_file_name(body: dict[str, Any]) -> str:
    """Where a `media` record's file goes below a sink's media directory:
    `KEY/STEP-SHA8.FORMAT`, with the key's "/" kept as directories; the same record
    delivered twice names the same file."""
    key = relative_path(str(body["key"]))
    return f"{key}/{body['step']}-{str(body['sha256'])[:8]}.{body['format']}"


def relative_path(name: str) -> str:
    """A user's name (a media key, an artifact name) as a relative path that stays below
    its root: "/" kept as directories, each part a `path_component`."""
    return "/".join(path_component(part) for part in name.split("/"))


def stored_file(body: dict[str, Any], sink: str) -> Path:
    """The file of an `artifact` or `media` record in trackd's content-addressed store.

    Sinks read or link it from there (never whole into memory: artifacts can be
    gigabytes). Gone, it cannot come back, so its record goes to the dead letters."""
    path = Path(body["path"])
    if not path.is_file():
        what = "media" if "kind" in body else "artifact"
        raise SinkError(f"{sink}: {what} {body['path']!r} no longer exists", retriable=False)
    return path


def place_file(source: Path, target: Path) -> None:
    """Put a stored file at `target`, whole or not at all: a hard link where the store is
    on the same filesystem (no copy, however large), else a streamed copy under a
    temporary name, renamed into place. The store never changes a file, so a target
    already there is the same file (a record delivered again) and is left alone."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def read_table(path: Path) -> dict[str, Any]:
    """A `table` media file: the client's JSON `{"columns": [...], "data": [[...], ...]}`."""
    table: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return table


def markdown_table(table: dict[str, Any], caption: str | None) -> str:
    """A logged table as Markdown, for backends whose only form for it is text."""
    columns = [str(column) for column in table["columns"]]
    lines = [f"| {' | '.join(markdown_cell(c) for c in columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(markdown_cell(str(v)) for v in row)} |" for row in table["data"]]
    return "\n".join(([caption, ""] if caption else []) + lines)


def markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def media_index(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The JSON a sink keeps about a media file (jsonl's index row value, a backend's
    caption): its kind, where it went, and the metadata the client sent."""
    skip = {"step", "ts", "key", "path"}
    return {"_type": body["kind"], "path": path, **{k: v for k, v in body.items() if k not in skip}}


_UNSAFE = re.compile(r"[^\w.@+=-]+")
OPEN_FILES = 64


def path_component(name: str) -> str:
    """A path component from a project or run name: no separators, no leading dot."""
    return _UNSAFE.sub("_", name).lstrip(".") or "_"


def fsync_directory(path: Path) -> None:
    """A new file's directory entry must be durable before a checkpoint may count on it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AppendOnlyFiles:
    """Append-only files made exactly-once across crashes by cutting them back.

    A sink that appends to files (JSONL lines, TensorBoard events) cannot tell, after
    a crash, which of the records re-sent from its saved cursor it had already
    appended. So `checkpoint()` (saved atomically with the cursor) holds each open
    file's size, and before the first append to a file the checkpoint does not
    cover, the file's size goes to a small fsynced journal. On opening, every file
    is cut back to the size the cursor corresponds to; a batch that fails midway is
    cut back at once (`undo`), and again before the next batch if that cut failed.
    """

    def __init__(self, root: Path, journal: Path, state: dict[str, Any]) -> None:
        self._root = root
        self._journal_path = journal
        # Files being appended to -> their size; the checkpoint's own entries cover its files.
        self._sizes: dict[str, int] = {str(k): int(v) for k, v in state.get("sizes", {}).items()}
        self._epoch = int(state.get("epoch", 0))
        self._recover()
        self._journal = journal.open("w", encoding="utf-8")
        self._marked = False
        self._handles: OrderedDict[str, io.FileIO] = OrderedDict()
        self._dirty: set[str] = set()
        self._batch_start: dict[str, int] = {}
        self._cuts: dict[str, int] = {}
        self._finished: set[str] = set()

    def _recover(self) -> None:
        """Cut every file back to what the saved cursor corresponds to.

        Epoch markers are written lazily (before the first journal entry after each
        checkpoint), so the entries that matter are those after any marker at or past
        the saved epoch, and for each file the first of them.
        """
        cuts: dict[str, int] = {}
        if self._journal_path.exists():
            after_saved = False
            for line in self._journal_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line: its file had not been appended to yet
                if "epoch" in entry:
                    after_saved = entry["epoch"] >= self._epoch
                elif after_saved:
                    cuts.setdefault(entry["file"], entry["size"])
        cuts.update(self._sizes)
        for relative, size in cuts.items():
            path = self._root / relative
            if path.exists() and path.stat().st_size > size:
                os.truncate(path, size)

    def begin(self) -> None:
        """Start a batch; first finish cutting back a failed one, if that failed too."""
        for relative, size in list(self._cuts.items()):
            self._cut(relative, size)
        self._batch_start = {}

    def append(self, relative: str, header: bytes, data: bytes) -> None:
        handle = self._handle(relative)
        size = self._sizes[relative]
        self._batch_start.setdefault(relative, size)
        payload = data if size else header + data
        view = memoryview(payload)
        self._sizes[relative] = size + len(payload)  # before writing: undo must cut a partial one
        self._dirty.add(relative)
        self._finished.discard(relative)  # a resumed run appends again
        while view:
            written = handle.write(view)
            view = view[written or 0 :]

    def undo(self) -> None:
        """Cut the files a failed batch appended to back to where the batch started."""
        for relative, start in self._batch_start.items():
            if self._sizes.get(relative, start) != start:
                self._cuts[relative] = start
        self._batch_start = {}
        for relative, size in list(self._cuts.items()):
            try:
                self._cut(relative, size)
            except OSError:
                return  # kept in _cuts: begin() tries again before anything is appended

    def _cut(self, relative: str, size: int) -> None:
        handle = self._handles.pop(relative, None)
        if handle is not None:
            handle.close()
        path = self._root / relative
        if path.exists():
            os.truncate(path, size)
        self._sizes[relative] = size
        del self._cuts[relative]

    def _handle(self, relative: str) -> io.FileIO:
        handle = self._handles.get(relative)
        if handle is not None:
            self._handles.move_to_end(relative)
            return handle
        if len(self._handles) >= OPEN_FILES:
            oldest, evicted = self._handles.popitem(last=False)
            if oldest in self._dirty:
                os.fsync(evicted.fileno())
                self._dirty.discard(oldest)
            evicted.close()
        path = self._root / relative
        created = not path.exists()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
        if relative not in self._sizes:
            self._journal_size(relative, 0 if created else path.stat().st_size)
        handle = io.FileIO(path, "a")
        if created:
            fsync_directory(path.parent)
        # The file is the truth: a checkpointed size is too large if someone removed it.
        self._sizes[relative] = os.fstat(handle.fileno()).st_size
        self._handles[relative] = handle
        return handle

    def _journal_size(self, relative: str, size: int) -> None:
        if not self._marked:
            self._journal.write(json.dumps({"epoch": self._epoch}) + "\n")
            self._marked = True
        self._journal.write(json.dumps({"file": relative, "size": size}) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._sizes[relative] = size

    def finish(self, relative: str) -> None:
        """A run ended: the next checkpoint makes its file durable and stops covering it."""
        self._finished.add(relative)

    def checkpoint(self) -> dict[str, Any]:
        """fsync what was appended; files of ended runs are then complete and left alone."""
        for relative in sorted(self._dirty):
            handle = self._handles.get(relative)
            if handle is not None:
                os.fsync(handle.fileno())
        self._dirty.clear()
        for relative in self._finished:
            handle = self._handles.pop(relative, None)
            if handle is not None:
                handle.close()
            self._sizes.pop(relative, None)
        self._finished.clear()
        self._epoch += 1
        self._marked = False
        return {"sizes": dict(self._sizes), "epoch": self._epoch}

    def close_all(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        if not self._journal.closed:
            self._journal.close()
