"""Weights & Biases sink: each trackd run is one W&B run, written through the wandb SDK.

Spec: ``wandb:PROJECT[?mode=offline|online&entity=E&tags=a,b&dir=D]`` (or a table
with ``project = ...``). The default mode is offline: runs are written under
``$WANDB_DIR/wandb/offline-run-*`` exactly as W&B itself writes them (``dir``
overrides ``$WANDB_DIR``), for ``wandb sync`` later; ``mode=online`` uploads as it goes.

How runs appear:

* project: PROJECT is the W&B project. ``*`` (or an empty target, as in
  ``wandb:?mode=offline``) means each run goes to the W&B project named after its
  trackd project, which is what DESIGN.md asks of every sink; a fixed PROJECT gathers
  every trackd project in one W&B project, where ``config.trackd.project`` tells them
  apart. ``entity`` is the W&B entity (default: the logged-in user's).
* one trackd run = one W&B run, named like the trackd run, in its group. The W&B run
  id is kept in a RunMap (the trackd run id itself for a new run, so even a lost state
  directory or a ``trackd replay`` resumes the same W&B run); a later session (daemon
  restart, replay, ``resume="allow"``) continues it with ``id=`` and ``resume="allow"``.
  Several runs at once are several W&B runs in the daemon (``reinit="create_new"``).
* config -> config, plus ``trackd`` (``RunInfo.metadata()``); tags -> W&B
  tags ``name:value`` (``name`` if the value is empty) plus the spec's ``tags``;
  metrics -> history rows at their step with the client's time as ``_timestamp``;
  summary -> summary; media -> ``wandb.Image`` / ``wandb.Video`` / ``wandb.Table`` /
  ``wandb.Histogram`` (from the counts and edges, W&B's ``np_histogram``) in the
  history row of their step (merged with that step's numbers, and kept in "pending" like
  any row, so a crash re-logs them too); the end -> exit code 0 (finished) or 1
  (failed), with the status and error in summary ``trackd/status`` and
  ``trackd/error``. Console capture, system metrics and git/code saving are off: the
  daemon is not the training process.
* alert -> ``run.alert(title, text, level)``: an AlertRecord in the run's transaction
  log, which ``wandb sync`` (or online mode) turns into W&B's alert.
* artifact -> a W&B artifact, as ``run.log_artifact(path, name=NAME)`` makes one: named
  NAME ("/" -> "-", at most 128 characters), type "unspecified", holding the one file
  under NAME, with ``metadata["trackd.artifact"]`` = {name, sha256}. The file is not
  copied: it is added with ``policy="immutable"``, so the artifact's manifest points at
  trackd's content-addressed store (whose files never change), which wandb uploads from
  (``wandb sync`` offline). Its MD5 is computed here, in chunks: ``add_file`` would
  mmap the whole file to hash it, its pages then counting in the daemon's memory. The
  same name and content logged again is one artifact (W&B would make no new version).

Exactly once across daemon crashes. W&B keeps one history row per step and accepts
only increasing steps; rows for the step in progress merge. So per attached run the
sink keeps the last step it handed over and skips rows below it (and at it, once that
row is known to be stored): a re-sent row either merges the same values into the row
in progress or is skipped. The hard part is knowing what is stored. wandb-core writes
each run's transaction log (``run-ID.wandb``, LevelDB log format) in whole 32 KiB
blocks and completes the last block only when the run finishes, so when the daemon
dies the records in the unfinished block are lost, although ``log()`` returned long
ago and the fan-out's cursor moved past them. The cursor alone cannot be trusted, so:

1. At every checkpoint the sink reads the complete blocks appended to each attached
   run's log and finds the last step whose row is stored there. The checkpoint state
   keeps, per open run, the rows handed over after that step ("pending": about a block's
   worth) and the run's merged config, summary and tags: what a crash may take.
2. After a crash, ``open()`` first waits for the dead daemon's wandb-core to exit (it
   may still be writing blocks). Then for each open run with pending rows past the last
   step stored in the run's logs, it resumes the W&B run, re-applies config, summary and
   tags, and re-logs the pending rows after that step. The records the
   fan-out re-sends from its cursor follow, and any row at or below the last step
   stored or handed over is skipped. In online mode the server's resume step
   (``starting_step``) counts too; rows that reached a local log but not the server stay
   recoverable with ``wandb sync`` on that run directory.
3. Artifacts are exactly-once the same way: per open run the checkpoint keeps the
   artifacts handed over but not yet seen in complete blocks of the log, each named by
   its ``trackd.artifact`` metadata; attaching a run reads its earlier logs whole for
   the artifacts they hold (only records that mention ``trackd.artifact`` are decoded),
   logs the kept ones that are missing and skips any re-sent one already there.
4. A finished run's log is complete (``finish()`` closes it), so after its run_end the
   sink stores the run's end time in ``ended.json``; records of that run arriving later
   are re-deliveries and are skipped, until a run_start that began after that end (a
   resumed trackd run). Without this a re-sent run_end would resume a finished run only
   to finish it again.

A daemon that stops cleanly marks its open runs preempting and finishes them with exit
code 1 (W&B's way of saying "will be resumed"), which completes their logs; the next
session resumes them.

Errors: ``UsageError``/``AuthenticationError``, a 4xx from the server, a bad value:
permanent. Other wandb errors, timeouts, 5xx/429 and OS errors: retriable; an error
from a live run (wandb-core gone) also finishes every attached run, so the retry
resumes them in a healthy service (two live runs with one id are refused).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackd.sinks.base import (
    Notices,
    Record,
    RunInfo,
    RunMap,
    Sink,
    SinkContext,
    SinkError,
    is_retriable_os_error,
    place_file,
    read_table,
    relative_path,
    retriable_status,
    stored_file,
)

if TYPE_CHECKING:
    import wandb

log = logging.getLogger("trackd.sinks.wandb")
MODES = ("offline", "online")
TAG_LIMIT = 64
PROJECT_LIMIT = 128
ARTIFACT_NAME_LIMIT = 128
ARTIFACT_KEY = "trackd.artifact"  # the metadata that names a trackd artifact in a W&B log
SERVICE_EXIT_SECONDS = 30.0

# The transaction log: LevelDB log format after a 7-byte header (":W&B", magic 0xBEE1,
# version 0) that opens the first block; chunks have a CRC-32 (IEEE) of type + payload.
BLOCK = 32 * 1024
TAIL_BLOCKS = 8
FILE_HEADER = 7
CHUNK = struct.Struct("<IHB")
FULL, FIRST, LAST = 1, 2, 4
_UNSAFE_PROJECT = re.compile(r"[/\\#?%:]")

Row = list[Any]  # [step, ts, {key: value}], as in a metrics record
MEDIA = "trackd.media"  # a row value {MEDIA: body}: a media record waiting to be logged
# A log record's payload -> its history step (int), its trackd artifact (str), or None.
RecordReader = Callable[[bytes], int | str | None]


class WandbSink(Sink):
    kind = "wandb"
    target_key = "project"
    known_options = ("mode", "entity", "tags", "dir")

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        self._mode = options.get("mode") or "offline"
        if self._mode not in MODES:
            raise ValueError(f"wandb sink: mode must be one of {MODES}, got {self._mode!r}")
        self._entity = options.get("entity") or None
        self._dir = options.get("dir") or None
        self._extra_tags = [tag.strip() for tag in options.get("tags", "").split(",")]
        self._notices = Notices("wandb")

    def open(self, context: SinkContext) -> None:
        try:
            import wandb
            from wandb.proto import wandb_internal_pb2
        except ImportError as exc:
            raise SinkError(f"wandb: {exc}; pip install 'trackd[wandb]'", retriable=False) from exc

        def read_record(payload: bytes) -> int | str | None:
            record = wandb_internal_pb2.Record.FromString(payload)  # type: ignore[attr-defined]
            kind = record.WhichOneof("record_type")
            if kind == "history":
                return int(record.history.step.num)
            if kind == "artifact" and record.artifact.metadata:
                marked = json.loads(record.artifact.metadata).get(ARTIFACT_KEY)
                return _artifact_identity(marked) if isinstance(marked, dict) else None
            return None

        self._wandb = wandb
        self._media_dir = context.state_dir / "media"
        self._read_record: RecordReader = read_record
        context.state_dir.mkdir(parents=True, exist_ok=True)
        self._run_ids = RunMap(context.state_dir / "runs.json")
        self._ended = RunMap(context.state_dir / "ended.json")
        self._attached: dict[str, _Attached] = {}
        self._refused: dict[str, str] = {}
        state = context.state or {}
        self._states = {key: _RunState(**value) for key, value in state.get("runs", {}).items()}
        _wait_for_service_exit(state.get("pid"))
        for run_id, run_state in self._states.items():
            lost_rows = run_state.pending and run_state.pending[-1][0] > self._stored_step(
                run_state
            )
            if lost_rows or run_state.artifacts:
                try:
                    self._call(run_id, self._attach, run_id, run_state)
                except SinkError as error:
                    if error.retriable:
                        raise  # open() is tried again; a refused run waits for its records

    # --- delivery -----------------------------------------------------------------------

    def write(self, batch: list[Record]) -> None:
        for record in batch:
            self._apply(record)

    def _apply(self, record: Record) -> None:
        run = record.run
        if self._ended_before(record):
            return
        refused = self._refused.get(run.id)
        if refused is not None and record.type != "run_start":
            raise SinkError(refused, retriable=False)
        state = self._states.get(run.id) or self._new_state(run)
        attached = self._attached.get(run.id) or self._call(run.id, self._attach, run.id, state)
        self._refused.pop(run.id, None)
        body = record.body
        if record.type == "run_start":
            self._update(run.id, attached, state, config=self._config(run), tags=run.tags)
        elif record.type == "metrics":
            self._call(run.id, self._log_rows, attached, state, body["rows"])
        elif record.type == "media":
            row = [body["step"], body["ts"], {body["key"]: {MEDIA: body}}]
            self._call(run.id, self._log_rows, attached, state, [row])
        elif record.type == "config":
            self._update(run.id, attached, state, config=body["values"])
        elif record.type == "tags":
            self._update(run.id, attached, state, tags=body["values"])
        elif record.type == "summary":
            state.summary.update(body["values"])
            self._call(run.id, attached.handle.summary.update, body["values"])
        elif record.type == "artifact":
            self._call(run.id, self._log_artifact, attached, state, body)
        elif record.type == "alert":
            self._call(run.id, self._write_alert, attached, body)
        elif record.type == "run_end":
            self._call(run.id, self._finish, attached, body)
            del self._attached[run.id], self._states[run.id]
            self._ended.set(run.id, repr(float(body["ended"])))

    def _ended_before(self, record: Record) -> bool:
        """Whether the record belongs to a W&B run that already ended (a re-delivery)."""
        ended = self._ended.get(record.run.id)
        if not ended:
            return False
        if record.type == "run_start" and float(record.body["started"]) > float(ended):
            self._ended.set(record.run.id, "")  # a resumed trackd run: a new session
            return False
        return True

    def _new_state(self, run: RunInfo) -> _RunState:
        wandb_id = self._run_ids.get(run.id)
        if wandb_id is None:
            wandb_id = run.id
            self._run_ids.set(run.id, wandb_id)
        state = _RunState(
            wandb_id=wandb_id,
            project=self._project(run),
            name=run.name,
            group=run.group,
            config=self._config(run),
            tags=dict(run.tags),
        )
        self._states[run.id] = state
        return state

    def _attach(self, run_id: str, state: _RunState) -> _Attached:
        """Start or resume the W&B run, then re-log what its earlier logs may lack."""
        handle = self._wandb.init(
            project=state.project,
            entity=self._entity,
            id=state.wandb_id,
            name=state.name,
            group=state.group,
            config=state.config,
            tags=self._labels(state.tags),
            mode=self._mode,  # type: ignore[arg-type]
            dir=self._dir,
            resume="allow",
            reinit="create_new",
            settings=self._wandb.Settings(
                console="off",
                silent=True,
                save_code=False,
                disable_git=True,
                x_disable_stats=True,
                x_disable_meta=True,
                x_disable_machine_info=True,
                x_save_requirements=False,
            ),
        )
        log_path = Path(handle.settings.sync_file)
        state.log_dir = str(log_path.parent.parent)
        stored = max(handle.starting_step - 1, self._stored_step(state, exclude=log_path))
        if state.summary:
            handle.summary.update(state.summary)
        follower = _LogFollower(log_path, self._read_record)
        artifacts = self._stored_artifacts(state, exclude=log_path)
        attached = _Attached(handle, follower, last=stored, artifacts=artifacts)
        self._attached[run_id] = attached
        pending, state.pending = state.pending, []
        self._log_rows(attached, state, pending)
        kept, state.artifacts = state.artifacts, []
        for body in kept:
            self._log_artifact(attached, state, body)
        if state.pending or state.artifacts:
            log.info(
                "wandb: run %s resumed: re-logged %d rows and %d artifacts",
                state.wandb_id,
                len(state.pending),
                len(state.artifacts),
            )
        return attached

    def _logs(self, state: _RunState, exclude: Path | None) -> list[Path]:
        """The run's transaction logs (one per session), newest first."""
        if state.log_dir is None:
            return []
        logs = {
            path.resolve() for path in Path(state.log_dir).glob(f"*/run-{state.wandb_id}.wandb")
        }
        if exclude is not None:
            logs.discard(exclude.resolve())
        return sorted(logs, key=_mtime, reverse=True)

    def _stored_step(self, state: _RunState, exclude: Path | None = None) -> int:
        """The last step stored in the run's transaction logs (-1: none), newest log first."""
        for path in self._logs(state, exclude):
            step = _last_step_in(path, self._read_record)
            if step >= 0:
                return step
        return -1

    def _stored_artifacts(self, state: _RunState, exclude: Path | None) -> set[str]:
        """The trackd artifacts in the run's earlier logs, which are read whole; only the
        records that mention the marker are decoded."""
        marker = ARTIFACT_KEY.encode()

        def read_artifact(payload: bytes) -> int | str | None:
            return self._read_record(payload) if marker in payload else None

        found: set[str] = set()
        for path in self._logs(state, exclude):
            found |= _artifacts_in(path, read_artifact)
        return found

    def _log_rows(self, attached: _Attached, state: _RunState, rows: Iterable[Row]) -> None:
        handle = attached.handle
        for row in rows:
            step, ts, values = row
            if step < attached.last or (step == attached.last and not attached.in_progress):
                continue  # stored already, or below a step W&B has moved past
            if any(isinstance(value, dict) for value in values.values()):
                values = {key: self._media(value) for key, value in values.items()}
            handle.log({**values, "_timestamp": ts}, step=step)
            attached.last, attached.in_progress = step, True
            state.pending.append(row)

    def _log_artifact(self, attached: _Attached, state: _RunState, body: dict[str, Any]) -> None:
        """Log the artifact unless the run's logs hold it or it was handed over already."""
        marked = {"name": body["name"], "sha256": body.get("sha256") or Path(body["path"]).name}
        identity = _artifact_identity(marked)
        if identity in attached.artifacts:
            return
        source = stored_file(body, "wandb")
        entry = relative_path(body["name"])
        name = entry.replace("/", "-")[:ARTIFACT_NAME_LIMIT]
        if name != body["name"]:
            self._notices(
                f"artifact names are W&B names without '/', of at most {ARTIFACT_NAME_LIMIT} chars"
            )
        artifact = self._wandb.Artifact(name, type="unspecified", metadata={ARTIFACT_KEY: marked})
        # add_file hashes through an mmap of the whole file (a 1 GiB artifact would be 1 GiB
        # of the daemon's RSS); the method it ends in takes the same digest, streamed here.
        digest = base64.b64encode(_md5(source)).decode("ascii")
        artifact._add_local_file(name=entry, path=str(source), digest=digest, policy="immutable")
        attached.handle.log_artifact(artifact)
        attached.artifacts.add(identity)
        state.artifacts.append({"name": body["name"], "path": body["path"], **marked})

    @staticmethod
    def _write_alert(attached: _Attached, body: dict[str, Any]) -> None:
        """`run.alert()`: an AlertRecord in the run's transaction log (sent by `wandb sync`
        offline), W&B's levels being trackd's."""
        attached.handle.alert(title=body["title"], text=body["text"], level=body["level"])

    def _write_histogram(self, body: dict[str, Any]) -> Any:
        if not body["counts"]:  # wandb.Histogram refuses one of no bins (no finite value)
            self._notices("empty histograms are logged to W&B as null")
            return None
        return self._wandb.Histogram(np_histogram=(body["counts"], body["edges"]))

    def _media(self, value: Any) -> Any:
        """A W&B media object for a media record's body (numbers pass through)."""
        if not isinstance(value, dict) or MEDIA not in value:
            return value
        body = value[MEDIA]
        if body["kind"] == "histogram":
            return self._write_histogram(body)
        source = stored_file(body, "wandb")
        caption = body.get("caption")
        if body["kind"] == "table":
            table = read_table(source)
            return self._wandb.Table(columns=table["columns"], data=table["data"])
        # W&B tells a file's type by its extension; the store names files by digest alone.
        named = self._media_dir / f"{body['sha256']}.{body['format']}"
        place_file(source, named)
        if body["kind"] == "video":
            return self._wandb.Video(str(named), caption=caption, format=body["format"])
        return self._wandb.Image(str(named), caption=caption)

    def _update(
        self,
        run_id: str,
        attached: _Attached,
        state: _RunState,
        *,
        config: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        if config:
            state.config.update(config)
            self._call(run_id, attached.handle.config.update, config, allow_val_change=True)
        if tags:
            state.tags.update(tags)
            labels = self._labels(state.tags)

            def set_tags() -> None:
                attached.handle.tags = tuple(labels)

            self._call(run_id, set_tags)

    def _finish(self, attached: _Attached, body: dict[str, Any]) -> None:
        status, error = body["status"], body.get("error")
        attached.handle.summary.update({"trackd/status": status, "trackd/error": error})
        attached.handle.finish(exit_code=0 if status == "finished" else 1)

    def checkpoint(self) -> dict[str, Any]:
        """Each open run's state, with the rows its log does not hold yet (see the docstring)."""
        for run_id, attached in self._attached.items():
            stored = attached.log.advance()
            state = self._states[run_id]
            state.pending = [row for row in state.pending if row[0] > stored]
            logged = attached.log.artifacts
            state.artifacts = [a for a in state.artifacts if _artifact_identity(a) not in logged]
        return {"pid": os.getpid(), "runs": {k: asdict(v) for k, v in self._states.items()}}

    def close(self) -> None:
        """Mark open runs preempting and finish them: their logs complete, resumed next time."""
        for attached in self._attached.values():
            with contextlib.suppress(Exception):
                attached.handle.mark_preempting()
                attached.handle.finish(exit_code=1)
        self._attached.clear()

    # --- mapping ------------------------------------------------------------------------

    def _project(self, run: RunInfo) -> str:
        wanted = run.project if self.target in ("", "*") else self.target
        project = _UNSAFE_PROJECT.sub("-", wanted)[:PROJECT_LIMIT] or "trackd"
        if project != wanted:
            self._notices(f"project {wanted!r} is not a valid W&B project name: {project!r}")
        return project

    def _config(self, run: RunInfo) -> dict[str, Any]:
        return {**run.config, "trackd": run.metadata()}

    def _labels(self, tags: dict[str, str]) -> list[str]:
        labels = [f"{name}:{value}" if value else name for name, value in tags.items()]
        labels += [tag for tag in self._extra_tags if tag]
        if any(len(label) > TAG_LIMIT for label in labels):
            self._notices(f"tags longer than {TAG_LIMIT} characters were cut short")
        return list(dict.fromkeys(label[:TAG_LIMIT] for label in labels))

    # --- errors -------------------------------------------------------------------------

    def _call(self, run_id: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the SDK; map what it raises. A failure of a live run resets every run."""
        attaching = function == self._attach
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            error = _mapped(self._wandb, exc)
            if error is None:
                raise
            if not error.retriable and attaching:
                self._refused[run_id] = str(error)
            if error.retriable and not attaching:
                self._reset()
            raise error from exc

    def _reset(self) -> None:
        """Finish every attached run (as far as a broken service lets us): the next record
        resumes them, in a new wandb-core if the old one is gone."""
        attached, self._attached = self._attached, {}
        for run in attached.values():
            with contextlib.suppress(Exception):
                run.handle.finish(exit_code=1)


@dataclass
class _RunState:
    """What must survive a crash for one open run: enough to resume it, and what its
    transaction log may have lost (the pending rows, the merged config/summary/tags)."""

    wandb_id: str
    project: str
    name: str
    group: str | None
    config: dict[str, Any]
    tags: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)
    pending: list[Row] = field(default_factory=list)
    log_dir: str | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # handed over, not yet seen


@dataclass
class _Attached:
    """A live W&B run: its handle, its log, and the last step handed over to it."""

    handle: wandb.Run
    log: _LogFollower
    last: int
    artifacts: set[str]  # identities stored in earlier logs or handed over to this session
    in_progress: bool = False  # whether the row at `last` still takes values


class _LogParser:
    """LevelDB log chunks reassembled into W&B records, keeping the last history step and
    the trackd artifacts seen."""

    def __init__(self, read_record: RecordReader) -> None:
        self.last_step = -1
        self.artifacts: set[str] = set()
        self._read_record = read_record
        self._partial: bytes | None = None

    def feed(self, block: bytes, start: int) -> bool:
        """One block (the last one may be short), from `start`. False, and nothing taken,
        if a chunk is torn: a block still being written, or the end of a broken log."""
        chunks: list[tuple[int, bytes]] = []
        position = start
        while position + CHUNK.size <= len(block):
            checksum, length, kind = CHUNK.unpack_from(block, position)
            if not (checksum or length or kind):
                break  # zeros pad the end of a block
            end = position + CHUNK.size + length
            if end > len(block) or zlib.crc32(block[position + 6 : end]) != checksum:
                return False
            chunks.append((kind, block[position + CHUNK.size : end]))
            position = end
        for kind, payload in chunks:
            if kind in (FULL, FIRST):
                self._partial = payload
            elif self._partial is not None:  # a middle or last chunk of a record we saw begin
                self._partial += payload
            if kind in (FULL, LAST) and self._partial is not None:
                found = self._read_record(self._partial)
                if isinstance(found, int):
                    self.last_step = max(self.last_step, found)
                elif found is not None:
                    self.artifacts.add(found)
                self._partial = None
        return True


class _LogFollower:
    """The last step and the artifacts stored in the live log of an attached run, read in
    whole blocks as wandb-core completes them."""

    def __init__(self, path: Path, read_record: RecordReader) -> None:
        self._path = path
        self._offset = 0
        self._parser = _LogParser(read_record)

    @property
    def artifacts(self) -> set[str]:
        return self._parser.artifacts

    def advance(self) -> int:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return self._parser.last_step
        for start in range(0, len(data) - BLOCK + 1, BLOCK):
            header = FILE_HEADER if self._offset == 0 else 0
            if not self._parser.feed(data[start : start + BLOCK], header):
                break
            self._offset += BLOCK
        return self._parser.last_step


def _last_step_in(path: Path, read_record: RecordReader) -> int:
    """The last history step in a log no one writes to any more (-1: none). Steps only
    grow, so the last few blocks usually tell; a log with no history there is read whole."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            for first in (max(0, size // BLOCK - TAIL_BLOCKS), 0):
                handle.seek(first * BLOCK)
                parser = _LogParser(read_record)
                for start in range(first * BLOCK, size, BLOCK):
                    block = handle.read(BLOCK)
                    if not parser.feed(block, FILE_HEADER if start == 0 else 0):
                        break
                if parser.last_step >= 0 or first == 0:
                    return parser.last_step
    except OSError:
        pass
    return -1


def _artifacts_in(path: Path, read_record: RecordReader) -> set[str]:
    """The trackd artifacts in a log no one writes to any more, read a block at a time."""
    parser = _LogParser(read_record)
    try:
        with path.open("rb") as handle:
            start = 0
            while block := handle.read(BLOCK):
                if not parser.feed(block, FILE_HEADER if start == 0 else 0):
                    break
                start += BLOCK
    except OSError:
        pass
    return parser.artifacts


def _md5(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").digest()


def _artifact_identity(marked: dict[str, Any]) -> str:
    """One trackd artifact in W&B: its name and content (from its `trackd.artifact`)."""
    return f"{marked.get('name')}\0{marked.get('sha256')}"


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _wait_for_service_exit(daemon_pid: object) -> None:
    """Wait (bounded) until the wandb-core a dead daemon started has exited.

    wandb-core outlives its parent for a moment and may still write blocks of the logs:
    reading them for the last stored step before it is gone would miss those, and the
    rows re-logged would be there twice. wandb-core names its parent (`--pid`), so the
    old daemon's pid from the checkpoint finds it in /proc (elsewhere: no wait).
    """
    if not isinstance(daemon_pid, int) or daemon_pid == os.getpid():
        return
    deadline = time.monotonic() + SERVICE_EXIT_SECONDS
    while _service_of(daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _service_of(daemon_pid: int) -> bool:
    wanted = str(daemon_pid).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        parent = args.index(b"--pid") + 1 if b"--pid" in args[:-1] else 0
        if parent and args[0].endswith(b"wandb-core") and args[parent] == wanted:
            return True
    return False


def _mapped(wandb_module: Any, exc: Exception) -> SinkError | None:
    """The SinkError for what the SDK raised; None for what is not the SDK's (a bug here)."""
    errors = wandb_module.errors
    message = f"wandb: {type(exc).__name__}: {exc}"
    if isinstance(exc, errors.UsageError | errors.AuthenticationError):
        return SinkError(message, retriable=False)
    if isinstance(exc, errors.CommError):
        response = getattr(exc.exc, "response", None)
        code = getattr(response, "status_code", None)
        return SinkError(message, retriable=not isinstance(code, int) or retriable_status(code))
    if isinstance(exc, OSError):
        return SinkError(message, retriable=is_retriable_os_error(exc))
    if isinstance(exc, TypeError | ValueError):
        return SinkError(message, retriable=False)
    if isinstance(exc, errors.Error) or type(exc).__module__.startswith("wandb"):
        return SinkError(message, retriable=True)
    return None
