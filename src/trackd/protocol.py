"""The wire and on-disk message format shared by the client and the daemon.

A frame is one MessagePack map, the *envelope*::

    {"v": 1, "s": session, "q": seq, "t": type, "r": run_id, "b": body}

`s` is the sending client session and `q` its sequence number (from 1, no
gaps); together they let the daemon store a re-sent message once. The body's
shape depends on `t` (see `validate`). The daemon answers on the same
socket with `{"t": "ack", "q": highest durable seq}` or
`{"t": "error", "q": seq or None, "error": text}`. A `reject` message is
written to the WAL by the daemon in place of a message it refused, so that
the refused sequence number stays used up across restarts; likewise `joined`
replaces the run_start of a process joining a run the daemon already has (its
`b.join` is true), so that a late rank never reopens a finished run; it keeps
that process's `host` and `pid`. A `system` message is one sample of the node
for one run, written by the daemon's own sampler under a session of its own:
`{ts, node, values: {name: number}}`.

A run_start with `b.resolve` true is a resume ("allow"/"must") the client could not
resolve (offline, or no daemon at init): the daemon stores it, and every later
message of that run id, under the latest run of the same project and name, steps
shifted past that run's highest step; the stored run_start then carries the
provisional id as `b.alias` and the shift as `b.step_offset`.

Two bodies carry their data inline rather than in the content-addressed store:

* a `media` of kind `histogram`: `{step, ts, key, kind: "histogram", counts, edges,
  caption?}`, where `counts` holds one non-negative number per bin and `edges` the
  bins' boundaries, one more than the counts (both empty for a histogram of no finite
  value). No `path`, `sha256`, `size` or `format`: a histogram is a few hundred
  numbers, so a store file would cost more than it carries.
* an `alert` (`trackd.alert`, W&B's and trackio's call): `{ts, title, text, level}`,
  `level` one of `ALERT_LEVELS`.

On disk (the daemon's WAL and the client's spool) frames are wrapped in
records: a little-endian u32 length, a u32 CRC-32 of the payload, then the
payload. A reader stops at the first record that is short or fails its CRC,
which is how a torn tail is found.

Depends on nothing of trackd: the client imports it.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import msgpack

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any, Final

    Message = dict[str, Any]
else:
    Message = dict

VERSION: Final = 1
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
MESSAGE_TYPES: Final = frozenset(
    {
        "run_start",
        "metrics",
        "config",
        "tags",
        "summary",
        "artifact",
        "media",
        "run_end",
        "alert",
        "reject",
        "joined",
        "system",
        "console",
    }
)
# Written by the daemon, never delivered to sinks: a refused message, and the run_start of a
# process joining a run the daemon already has (a non-zero rank of a distributed job).
INTERNAL_TYPES: Final = frozenset({"reject", "joined"})
RUN_STATUSES: Final = frozenset({"finished", "failed"})
# A `media` body references a file in the content-addressed store (bytes never travel in
# frames): {step, ts, key, kind, path, sha256, size, format, caption?, width?, height?,
# frames?, fps?, columns?, rows?}. `step` is the step of the log() call it came with.
MEDIA_KINDS: Final = frozenset({"image", "table", "video", "histogram"})
MEDIA_FORMATS: Final = {"image": ("png",), "table": ("json",), "video": ("gif", "mp4")}
# A tag a drop-in shim sets once per run for each documented no-op it accepted, named
# after the call (`trackd.ignored.wandb.watch`): the daemon counts them in its status.
IGNORED_TAG: Final = "trackd.ignored."
INLINE_MEDIA_KINDS: Final = frozenset({"histogram"})  # data in the body, no store file
ALERT_LEVELS: Final = ("INFO", "WARN", "ERROR")
CONSOLE_STREAMS: Final = ("stdout", "stderr")
_MAX_DEPTH: Final = 32


class ProtocolError(ValueError):
    """A frame or message that does not follow this module's schema; the text names the field.

    `sender` is the (session, seq) of a well-addressed message with a bad body,
    so the daemon can answer it and use up its sequence number.
    """

    sender: tuple[str, int] | None = None


def encode(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Decode and validate one frame; raise ProtocolError naming what is wrong."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame: {len(frame)} bytes is over the {max_bytes}-byte cap")
    try:
        message: Message = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises ValueError, TypeError and its own for bad input
        raise ProtocolError(f"frame: not MessagePack ({type(exc).__name__}: {exc})") from exc
    try:
        validate(message)
    except ProtocolError as exc:
        exc.sender = _sender(message)
        raise
    return message


def _sender(message: object) -> tuple[str, int] | None:
    if isinstance(message, dict):
        session, seq = message.get("s"), message.get("q")
        if type(session) is str and type(seq) is int and seq > 0:
            return session, seq
    return None


def validate(message: object) -> None:
    if not isinstance(message, dict):
        raise ProtocolError(f"frame: expected a map, got {_kind(message)}")
    version = message.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"v: unsupported protocol version {version!r} (this is {VERSION})")
    _require(message, "s", str)
    seq = _require(message, "q", int)
    if seq < 1:
        raise ProtocolError(f"q: sequence numbers start at 1, got {seq}")
    kind = _require(message, "t", str)
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"t: unknown message type {kind!r}")
    _require(message, "r", str)
    body = _require(message, "b", dict)
    _BODY_VALIDATORS[kind](body)


def _validate_run_start(body: Message) -> None:
    _require(body, "project", str, "b.")
    _require(body, "name", str, "b.")
    _optional(body, "group", str)
    _optional(body, "resume", str)
    _optional(body, "resolve", bool)
    _optional(body, "alias", str)
    _optional(body, "step_offset", int)
    _optional(body, "join", bool)
    _optional(body, "host", str)
    for field in ("pid", "rank", "local_rank", "world_size"):
        _optional(body, field, int)
    _require(body, "started", float, "b.")
    config = body.get("config", {})
    if not isinstance(config, dict):
        raise ProtocolError(f"b.config: expected a map, got {_kind(config)}")
    _check_tree(config, "b.config")
    _check_str_map(body.get("tags", {}), "b.tags")
    _validate_code_state(body)


def _validate_code_state(body: Message) -> None:
    """run_start's optional `code` {commit, branch, remote, dirty} and `env` {argv, python,
    executable, host, cuda_visible_devices}, recorded by init(save_code=True)."""
    for field in ("code", "env"):
        value = body.get(field)
        if value is not None:
            if not isinstance(value, dict):
                raise ProtocolError(f"b.{field}: expected a map or nil, got {_kind(value)}")
            _check_tree(value, f"b.{field}")


def _validate_metrics(body: Message) -> None:
    rows = _require(body, "rows", list, "b.")
    for index, row in enumerate(rows):
        where = f"b.rows[{index}]"
        if not isinstance(row, list) or len(row) != 3:
            raise ProtocolError(f"{where}: expected [step, ts, values], got {_kind(row)}")
        step, ts, values = row
        if type(step) is not int:
            raise ProtocolError(f"{where}.step: expected an int, got {_kind(step)}")
        if type(ts) is not float:
            raise ProtocolError(f"{where}.ts: expected a float, got {_kind(ts)}")
        if not isinstance(values, dict):
            raise ProtocolError(f"{where}.values: expected a map, got {_kind(values)}")
        _check_numbers(values, where, ".values")


def _check_numbers(numbers: dict[Any, Any], where: str, field: str) -> None:
    """A map of name -> number (a metrics row's values, a system sample's), named in an
    error as `where` + `field` (built only then: rows are checked by the hundred thousand)."""
    for key, value in numbers.items():
        if type(key) is not str:
            raise ProtocolError(f"{where}{field}: keys must be strings, got {_kind(key)}")
        if type(value) not in _SCALARS:
            raise ProtocolError(f"{where}{field}[{key!r}]: expected a number, got {_kind(value)}")


def _validate_values(body: Message) -> None:
    _check_tree(_require(body, "values", dict, "b."), "b.values")


def _validate_tags(body: Message) -> None:
    _check_str_map(_require(body, "values", dict, "b."), "b.values")


def _validate_artifact(body: Message) -> None:
    _require(body, "path", str, "b.")
    _require(body, "name", str, "b.")
    _optional(body, "sha256", str)
    _optional(body, "size", int)


def _validate_media(body: Message) -> None:
    step = _require(body, "step", int, "b.")
    _require(body, "ts", float, "b.")
    if not _require(body, "key", str, "b."):
        raise ProtocolError("b.key: expected a non-empty name")
    kind = _require(body, "kind", str, "b.")
    if kind not in MEDIA_KINDS:
        raise ProtocolError(f"b.kind: expected one of {sorted(MEDIA_KINDS)}, got {kind!r}")
    if step < 0:
        raise ProtocolError("b.step: must not be negative")
    _optional(body, "caption", str)
    if kind == "histogram":
        _validate_histogram(body)
        return
    _require(body, "path", str, "b.")
    _require(body, "sha256", str, "b.")
    size = _require(body, "size", int, "b.")
    fmt = _require(body, "format", str, "b.")
    if fmt not in MEDIA_FORMATS[kind]:
        raise ProtocolError(f"b.format: a {kind} is one of {MEDIA_FORMATS[kind]}, got {fmt!r}")
    if size < 0:
        raise ProtocolError("b.size: must not be negative")
    for field in ("width", "height", "frames", "rows"):
        _optional(body, field, int)
    _optional(body, "fps", float)
    columns = body.get("columns")
    if columns is not None and not (
        isinstance(columns, list) and all(type(c) is str for c in columns)
    ):
        raise ProtocolError(f"b.columns: expected a list of strings or nil, got {_kind(columns)}")


def _validate_histogram(body: Message) -> None:
    counts = _number_list(body, "counts")
    edges = _number_list(body, "edges")
    if any(count < 0 for count in counts):
        raise ProtocolError("b.counts: a bin count must not be negative")
    if len(edges) != (len(counts) + 1 if counts else 0):
        raise ProtocolError(
            f"b.edges: expected one more edge than counts ({len(counts)}), got {len(edges)}"
        )
    if any(low > high for low, high in itertools.pairwise(edges)):
        raise ProtocolError("b.edges: edges must not decrease")


def _number_list(body: Message, field: str) -> list[int | float]:
    values: list[int | float] = _require(body, field, list, "b.")
    for index, value in enumerate(values):
        if type(value) not in (int, float):
            raise ProtocolError(f"b.{field}[{index}]: expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise ProtocolError(f"b.{field}[{index}]: expected a finite number, got {value}")
    return values


def _validate_alert(body: Message) -> None:
    _require(body, "ts", float, "b.")
    _require(body, "title", str, "b.")
    _require(body, "text", str, "b.")
    level = _require(body, "level", str, "b.")
    if level not in ALERT_LEVELS:
        raise ProtocolError(f"b.level: expected one of {list(ALERT_LEVELS)}, got {level!r}")


def _validate_joined(body: Message) -> None:
    _validate_values(body)
    _optional(body, "host", str)
    _optional(body, "pid", int)


def _validate_system(body: Message) -> None:
    _require(body, "ts", float, "b.")
    if not _require(body, "node", str, "b."):
        raise ProtocolError("b.node: expected a non-empty host name")
    _check_numbers(_require(body, "values", dict, "b."), "b.", "values")
    _optional(body, "since", dict)  # the run's counters at its first sample (daemon.system)
    _check_numbers(body.get("since") or {}, "b.", "since")


def _validate_reject(body: Message) -> None:
    _require(body, "error", str, "b.")


def _validate_run_end(body: Message) -> None:
    status = _require(body, "status", str, "b.")
    if status not in RUN_STATUSES:
        raise ProtocolError(f"b.status: expected one of {sorted(RUN_STATUSES)}, got {status!r}")
    _optional(body, "error", str)
    _require(body, "ended", float, "b.")


def _validate_console(body: Message) -> None:
    """{lines: [[ts, stream, text], ...]}: stdout/stderr lines of the run, in order."""
    lines = _require(body, "lines", list, "b.")
    for index, line in enumerate(lines):
        where = f"b.lines[{index}]"
        if not isinstance(line, list) or len(line) != 3:
            raise ProtocolError(f"{where}: expected [ts, stream, text], got {_kind(line)}")
        ts, stream, text = line
        if type(ts) is not float:
            raise ProtocolError(f"{where}.ts: expected a float, got {_kind(ts)}")
        if stream not in CONSOLE_STREAMS:
            raise ProtocolError(
                f"{where}.stream: expected one of {CONSOLE_STREAMS}, got {stream!r}"
            )
        if type(text) is not str:
            raise ProtocolError(f"{where}.text: expected a string, got {_kind(text)}")


_SCALARS: Final = frozenset({int, float, bool})
_BODY_VALIDATORS: Final = {
    "run_start": _validate_run_start,
    "metrics": _validate_metrics,
    "config": _validate_values,
    "summary": _validate_values,
    "tags": _validate_tags,
    "artifact": _validate_artifact,
    "media": _validate_media,
    "run_end": _validate_run_end,
    "alert": _validate_alert,
    "reject": _validate_reject,
    "joined": _validate_joined,
    "system": _validate_system,
    "console": _validate_console,
}


def _require(mapping: Message, field: str, kind: type, prefix: str = "") -> Any:
    value = mapping.get(field)
    if type(value) is not kind and not (kind is dict and isinstance(value, dict)):
        raise ProtocolError(f"{prefix}{field}: expected {kind.__name__}, got {_kind(value)}")
    return value


def _optional(mapping: Message, field: str, kind: type) -> None:
    value = mapping.get(field)
    if value is not None and type(value) is not kind:
        raise ProtocolError(f"b.{field}: expected {kind.__name__} or nil, got {_kind(value)}")


def _check_str_map(value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a map, got {_kind(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ProtocolError(f"{where}[{key!r}]: expected a string, got {_kind(item)}")


def _check_tree(value: object, where: str, depth: int = 0) -> None:
    """Config and summary values: anything JSON can hold, keyed by strings."""
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str:
                raise ProtocolError(f"{where}: keys must be strings, got {_kind(key)}")
            _check_tree(item, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_tree(item, f"{where}[{index}]", depth + 1)
    else:
        raise ProtocolError(f"{where}: expected a JSON-like value, got {_kind(value)}")


def _kind(value: object) -> str:
    return "nil" if value is None else type(value).__name__


# --- on-disk records -------------------------------------------------------------

SPOOL_SUFFIX: Final = ".spool"
_HEADER: Final = struct.Struct("<II")
HEADER_BYTES: Final = _HEADER.size


def frame_record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def iter_records(
    buffer: bytes | memoryview, start: int = 0, max_bytes: int = MAX_FRAME_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Yield (end offset, payload) for each whole record from `start`; stop at a torn or bad one."""
    view = memoryview(buffer)
    offset, size = start, len(view)
    while offset + HEADER_BYTES <= size:
        length, crc = _HEADER.unpack_from(view, offset)
        end = offset + HEADER_BYTES + length
        if length > max_bytes or end > size:
            return
        payload = bytes(view[offset + HEADER_BYTES : end])
        if zlib.crc32(payload) != crc:
            return
        yield end, payload
        offset = end
