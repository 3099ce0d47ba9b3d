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

A sink handles each record type in one method marked ``@handles("TYPE")``, found
through one table, ``Sink.handlers`` (``handler(record.type)``), as aiokafka has a
handler per request type instead of a branch per type in every caller.

Errors::

    Exception
     └── SinkError(retriable: bool)   raised by write/open, mapped once at the boundary
          ├── retriable=True    connection refused, timeout, 5xx, 429: backoff and retry
          └── retriable=False   validation, 4xx: the record goes to the dead-letter file

Each sink maps its SDK's exceptions through one `ErrorTable` (exception class ->
retriable or permanent, looked up along the MRO), with `mapped_errors` or
`call_mapped` at the boundary. Any other exception escaping a sink is a bug in
it; the fan-out counts it, logs it with its traceback once, and retries.

Sinks register in the ``trackd.sinks`` entry-point group under their kind and
are built from a spec string ``KIND:TARGET[?key=value&...]`` or a config
table ``{kind = ..., <target_key> = ..., ...}``. A sink imports its SDK in
``open()``, never at module import.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

from trackd.sinks.notices import Notices

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
    local_rank: int | None = None
    world_size: int | None = None
    started: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, object]:
        """The trackd side of the run, stored beside each backend's own run id so a backend
        run leads back to its trackd run, host, process and rank (absent fields left out)."""
        fields: dict[str, object] = {"run_id": self.id, "project": self.project}
        fields |= {"group": self.group, "host": self.host, "pid": self.pid, "rank": self.rank}
        fields |= {"local_rank": self.local_rank, "world_size": self.world_size}
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

    # Record type -> the name of the method that handles it, from the `@handles` marks of
    # the class and its bases: a sink dispatches on a record's type through this one table.
    handlers: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = dict(cls.handlers)
        for name, member in vars(cls).items():
            for record_type in getattr(member, _HANDLES, ()):
                table[record_type] = name
        cls.handlers = MappingProxyType(table)

    def handler(self, record_type: str) -> Callable[..., Any] | None:
        """The bound method handling records of `record_type`; None for a type this sink
        does not handle (what it then does, skip or count a notice, is the sink's)."""
        name = self.handlers.get(record_type)
        return None if name is None else getattr(self, name)

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


_HANDLES = "trackd_handles"
_Method = TypeVar("_Method", bound=Callable[..., Any])


def handles(*record_types: str) -> Callable[[_Method], _Method]:
    """Mark a sink's method as the handler of records of `record_types` (see
    `Sink.handlers`); every handler of one sink takes the same arguments."""

    def mark(method: _Method) -> _Method:
        setattr(method, _HANDLES, record_types)
        return method

    return mark


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


Verdict = bool | Callable[[BaseException], bool | None]


@dataclass(frozen=True)
class ErrorTable:
    """One sink's SDK exceptions mapped to SinkError kinds, as httpx's
    `map_httpcore_exceptions` maps httpcore's: `kinds` is looked up along the exception's
    MRO, most specific class first, so a subclass's entry wins over its base's.

    A kind is a flag (retriable or permanent) or a function of the exception that says
    which (None: it cannot tell, the lookup goes on up the MRO). `first` judges before the
    table what no class says (an HTTP response any of an SDK's errors may carry); an
    exception no entry covers whose module is one of `sdk_modules` is the SDK's own
    failure, retriable; anything else is a bug in the sink and is not mapped.
    """

    sink: str
    kinds: Mapping[type[BaseException], Verdict]
    sdk_modules: frozenset[str] = frozenset()
    first: Callable[[BaseException], bool | None] | None = None

    def retriable(self, exc: BaseException) -> bool | None:
        if self.first is not None and (verdict := self.first(exc)) is not None:
            return verdict
        for cls in type(exc).__mro__:
            kind = self.kinds.get(cls)
            if kind is not None:
                verdict = kind if isinstance(kind, bool) else kind(exc)
                if verdict is not None:
                    return verdict
        return True if type(exc).__module__.split(".")[0] in self.sdk_modules else None

    def error(self, exc: BaseException, what: str | None = None) -> SinkError | None:
        """The SinkError for `exc` (its message: the sink, then `what` was done or else the
        exception's type); None for an exception the table does not cover."""
        retriable = self.retriable(exc)
        if retriable is None:
            return None
        message = f"{self.sink}: {what or type(exc).__name__}: {exc}"[:_MESSAGE_CHARS]
        return SinkError(message, retriable=retriable)


_MESSAGE_CHARS = 1000  # an SDK's message can carry a whole response body


@contextlib.contextmanager
def mapped_errors(errors: ErrorTable, what: str | None = None) -> Iterator[None]:
    """What the block raises is mapped once, here at the boundary, to a SinkError by the
    sink's table (not covered: a bug, raised as is)."""
    try:
        yield
    except SinkError:
        raise
    except Exception as exc:
        error = errors.error(exc, what)
        if error is None:
            raise
        raise error from exc


def call_mapped(errors: ErrorTable, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an SDK function, its exceptions mapped by the sink's table (`mapped_errors`)."""
    with mapped_errors(errors):
        return function(*args, **kwargs)


def response_retriable(exc: BaseException | None) -> bool | None:
    """For an error that carries an HTTP response (requests' errors do, whatever their
    class): whether its status is worth retrying; None when it carries none."""
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return retriable_status(code) if isinstance(code, int) else None


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
