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
  ``trackd/error``; system samples -> W&B stats records (the System panel), as wandb's
  own monitor writes them, under its names (``cpu``, ``gpu.0.gpu``, ...). wandb's own
  console capture, system metrics and metadata collection are off: the daemon is not
  the training process. Instead console records become wandb's console output records
  (``files/output.log`` and the Logs tab), and the run_start's ``code``/``env``
  (init(save_code=True)) become wandb's run metadata (the ``EnvironmentRecord``:
  program, args, python, executable, host, git remote and commit). These, the stats
  and the alert records go through ``Run._interface`` (private; see ``_interface``).
* alert -> an AlertRecord in the run's transaction log, as ``run.alert(title, text,
  level)`` writes it, which ``wandb sync`` (or online mode) turns into W&B's alert.
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
3. Artifacts, system samples (stats records), console lines (output records) and alerts
   are exactly-once by identity: per open run the checkpoint keeps those handed over
   but not yet seen in complete blocks of the log. An artifact is named by its
   ``trackd.artifact`` metadata; the sink's stats, output and alert records carry theirs
   in the record's ``uuid`` (``trackd:KIND:DIGEST`` of the sample's time and node, the
   line's time, stream, text and place in its record, the alert's time and title), and
   are kept serialized. Attaching a run reads its earlier logs whole for the identities
   they hold (only records that carry one are decoded), writes the kept ones that are
   missing and skips any re-sent one already there. As it reads an earlier log it also
   writes that session's ``files/output.log`` anew from the lines the log holds, so a
   line lost to a crash and written again later is in one session's file only.
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
import functools
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
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    handles,
    is_retriable_os_error,
    response_retriable,
)
from trackd.sinks.media_files import read_table
from trackd.sinks.notices import Notices
from trackd.sinks.paths import relative_path
from trackd.sinks.runmap import RunMap
from trackd.sinks.stored_files import place_file, stored_file
from trackd.sinks.system_samples import since_run_start, system_node, system_values

if TYPE_CHECKING:
    import wandb

log = logging.getLogger("trackd.sinks.wandb")
MODES = ("offline", "online")
TAG_LIMIT = 64
PROJECT_LIMIT = 128
ARTIFACT_NAME_LIMIT = 128
ARTIFACT_KEY = "trackd.artifact"  # the metadata that names a trackd artifact in a W&B log
# The `uuid` prefix of a stats, console or alert record the sink writes: the rest is the
# record's identity, so that a log read back tells which of them it holds.
MARK = "trackd:"
SERVICE_EXIT_SECONDS = 30.0
ALERT_WAIT_MS = 60_000  # run.alert()'s default wait_duration

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
MIB = 1 / 1024**2
# trackd's sample names -> wandb's system monitor's (W&B's "System metrics" reference). W&B
# measures the disk of "/", trackd that of its data directory; disk and network counters
# start at the run's first sample in both (`since_run_start`).
_SYSTEM_NAMES = {
    "proc.threads": ("proc.cpu.threads", 1.0),
    "proc.rss": ("proc.memory.rssMB", MIB),
    "proc.memory.percent": ("proc.memory.percent", 1.0),
    "memory.available": ("proc.memory.availableMB", MIB),
    "memory.percent": ("memory_percent", 1.0),
    "disk.percent": ("disk./.usagePercent", 1.0),
    "disk.used": ("disk./.usageGB", 1 / 1024**3),
    "disk.read_bytes": ("disk.in", MIB),
    "disk.write_bytes": ("disk.out", MIB),
    "network.sent": ("network.sent", 1.0),
    "network.recv": ("network.recv", 1.0),
}
_GPU_NAMES = {
    "util": ("gpu.{i}.gpu", 1.0),
    "memory.percent": ("gpu.{i}.memoryAllocated", 1.0),
    "memory.used": ("gpu.{i}.memoryAllocatedBytes", 1.0),
    "temp": ("gpu.{i}.temp", 1.0),
    "power": ("gpu.{i}.powerWatts", 1.0),
    "power.percent": ("gpu.{i}.powerPercent", 1.0),
    "clock.sm": ("gpu.{i}.smClock", 1.0),
    "proc.memory": ("gpu.process.{i}.memoryAllocatedBytes", 1.0),
}
# A log record's payload -> its history step (int), its identity (str: a marked record's,
# a trackd artifact's), or None.
RecordReader = Callable[[bytes], int | str | None]


class WandbSink(Sink):
    kind = "wandb"
    target_key = "project"
    known_options = ("mode", "entity", "tags", "dir")

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        self._mode = self.choice("mode", MODES, "offline")
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

        decode: Callable[[bytes], Any] = wandb_internal_pb2.Record.FromString  # type: ignore[attr-defined]

        def read_record(payload: bytes) -> int | str | None:
            return _identity(decode(payload))

        self._wandb = wandb
        self._media_dir = context.state_dir / "media"
        self._decode = decode
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
            if lost_rows or run_state.artifacts or run_state.records:
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
        handler = self.handler(record.type)
        if handler is not None:
            handler(attached, state, record)

    # --- one handler per record type: (the attached W&B run, its state, the record) ---

    @handles("run_start")
    def _on_run_start(self, attached: _Attached, state: _RunState, record: Record) -> None:
        run = record.run
        self._update(run.id, attached, state, config=self._config(run), tags=run.tags)
        self._call(run.id, self._write_environment, attached, run, record.body)

    @handles("console")
    def _on_console(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._call(record.run.id, self._write_console, attached, state, record.body)

    @handles("metrics")
    def _on_metrics(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._call(record.run.id, self._log_rows, attached, state, record.body["rows"])

    @handles("media")
    def _on_media(self, attached: _Attached, state: _RunState, record: Record) -> None:
        body = record.body
        row = [body["step"], body["ts"], {body["key"]: {MEDIA: body}}]
        self._call(record.run.id, self._log_rows, attached, state, [row])

    @handles("config")
    def _on_config(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._update(record.run.id, attached, state, config=record.body["values"])

    @handles("tags")
    def _on_tags(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._update(record.run.id, attached, state, tags=record.body["values"])

    @handles("summary")
    def _on_summary(self, attached: _Attached, state: _RunState, record: Record) -> None:
        state.summary.update(record.body["values"])
        self._call(record.run.id, attached.handle.summary.update, record.body["values"])

    @handles("artifact")
    def _on_artifact(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._call(record.run.id, self._log_artifact, attached, state, record.body)

    @handles("alert")
    def _on_alert(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._call(record.run.id, self._write_alert, attached, state, record.body)

    @handles("system")
    def _on_system(self, attached: _Attached, state: _RunState, record: Record) -> None:
        self._call(record.run.id, self._write_system, attached, state, record)

    @handles("run_end")
    def _on_run_end(self, attached: _Attached, state: _RunState, record: Record) -> None:
        run_id, body = record.run.id, record.body
        self._call(run_id, self._finish, attached, body)
        del self._attached[run_id], self._states[run_id]
        self._ended.set(run_id, repr(float(body["ended"])))

    def _write_system(self, attached: _Attached, state: _RunState, record: Record) -> None:
        """A sample as a W&B stats record, what wandb's own system monitor writes (the run's
        System panel), under its names; another node's (not rank 0's) keys end in
        `/l:NODE`, as W&B labels a node's samples (`x_label`)."""
        from wandb.proto import wandb_internal_pb2

        pb: Any = wandb_internal_pb2  # generated: no attributes mypy can see

        body = record.body
        values = system_values(since_run_start(body), _SYSTEM_NAMES, _GPU_NAMES)
        cores = body["values"].get("cpu.count")
        if "proc.cpu" in body["values"] and cores:  # W&B's `cpu`: the process, over all cores
            values["cpu"] = body["values"]["proc.cpu"] / cores
        node = system_node(record.run, body["node"])
        # The interface's own `publish_stats` stamps the current time, where a sample
        # delivered late must keep its own: the record is made here.
        marked = pb.Record(uuid=_mark("stats", body["ts"], node))
        marked.stats.stats_type = pb.StatsRecord.StatsType.SYSTEM
        marked.stats.timestamp.FromNanoseconds(int(body["ts"] * 1e9))
        for key, value in values.items():
            marked.stats.item.add(
                key=f"{key}/l:{node}" if node else key, value_json=json.dumps(value)
            )
        self._hand_over(attached, state, [marked])

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
        identities = self._stored_identities(state, exclude=log_path)
        attached = _Attached(handle, follower, last=stored, stored=identities)
        self._attached[run_id] = attached
        pending, state.pending = state.pending, []
        self._log_rows(attached, state, pending)
        kept, state.artifacts = state.artifacts, []
        for body in kept:
            self._log_artifact(attached, state, body)
        marked, state.records = state.records, {}
        self._hand_over(
            attached, state, [self._decode(base64.b64decode(k)) for k in marked.values()]
        )
        if state.pending or state.artifacts or state.records:
            log.info(
                "wandb: run %s resumed: re-logged %d rows, %d artifacts, %d other records",
                state.wandb_id,
                len(state.pending),
                len(state.artifacts),
                len(state.records),
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

    def _stored_identities(self, state: _RunState, exclude: Path | None) -> set[str]:
        """The identities (artifacts, marked records) in the run's earlier logs."""
        found: set[str] = set()
        for path in self._logs(state, exclude):
            found |= self._identities_in(path)
        return found

    def _identities_in(self, path: Path) -> set[str]:
        """The identities in a log no one writes to any more, read whole (only the records
        that carry a mark are decoded). Its session's files/output.log is written anew from
        the console lines the log holds: it may hold lines the log lost to a crash, which a
        later session wrote again."""
        lines: list[str] = []

        def read_marked(payload: bytes) -> int | str | None:
            if MARK.encode() not in payload and ARTIFACT_KEY.encode() not in payload:
                return None
            record = self._decode(payload)
            if record.WhichOneof("record_type") == "output_raw":
                lines.append(record.output_raw.line)
            return _identity(record)

        found = _identities_in(path, read_marked)
        files = path.parent / "files"
        if lines or (files / "output.log").exists():
            _write_output_log(files, lines, "w")
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
        if attached.holds(identity):
            return
        source = stored_file(body, "wandb")
        entry = relative_path(body["name"])
        name = entry.replace("/", "-")[:ARTIFACT_NAME_LIMIT]
        if name != body["name"]:
            self._notices(
                f"artifact names are W&B names without '/', of at most {ARTIFACT_NAME_LIMIT} chars"
            )
        artifact = self._wandb.Artifact(name, type="unspecified", metadata={ARTIFACT_KEY: marked})
        _add_file(artifact, entry, source)
        attached.handle.log_artifact(artifact)
        attached.handed.add(identity)
        state.artifacts.append({"name": body["name"], "path": body["path"], **marked})

    def _write_alert(self, attached: _Attached, state: _RunState, body: dict[str, Any]) -> None:
        """An AlertRecord in the run's transaction log, as `run.alert()` writes it (sent by
        `wandb sync` offline, with its default wait of a minute between equal titles), W&B's
        levels being trackd's. Its identity is its time and title."""
        from wandb.proto import wandb_internal_pb2

        pb: Any = wandb_internal_pb2  # generated: no attributes mypy can see
        record = pb.Record(uuid=_mark("alert", body["ts"], body["title"]))
        record.alert.title, record.alert.text = body["title"], body["text"]
        record.alert.level, record.alert.wait_duration = body["level"], ALERT_WAIT_MS
        self._hand_over(attached, state, [record])

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

    def _write_console(self, attached: _Attached, state: _RunState, body: dict[str, Any]) -> None:
        """Console lines as wandb's own console capture sends them (`OutputRawRecord`s in the
        transaction log, one a line, with the line's time: what `wandb sync` fills the Logs
        tab from) and as the run's `files/output.log` (see `_hand_over`). A line's identity
        is its time, stream, text and place in the record (a line printed twice at once)."""
        from wandb.proto import wandb_internal_pb2

        pb: Any = wandb_internal_pb2  # generated: no attributes mypy can see
        records = []
        for index, (ts, stream, text) in enumerate(body["lines"]):
            record = pb.Record(uuid=_mark("console", ts, stream, index, text))
            output = record.output_raw
            kinds = pb.OutputRawRecord
            output.output_type = kinds.STDERR if stream == "stderr" else kinds.STDOUT
            output.line = f"{text}\n"
            output.timestamp.FromNanoseconds(int(ts * 1e9))
            records.append(record)
        self._hand_over(attached, state, records)

    def _hand_over(self, attached: _Attached, state: _RunState, records: list[Any]) -> None:
        """Hand wandb-core records marked with their identity (`uuid`), skipping those its
        logs hold or that were handed over already; each is kept in the state until a
        complete block of the log holds it (see the docstring).

        Private: the run's interface to wandb-core (`Run._interface`) and its `_publish`;
        the contract test in tests/test_sdk_private_names.py fails by name if wandb changes them.
        """
        interface = _interface(attached.handle)
        lines = []
        for record in records:
            if attached.holds(record.uuid):
                continue
            kept = base64.b64encode(record.SerializeToString()).decode("ascii")
            interface._publish(record)  # it stamps the record's stream: serialized before
            attached.handed.add(record.uuid)
            state.records[record.uuid] = kept
            if record.WhichOneof("record_type") == "output_raw":
                lines.append(record.output_raw.line)
        # wandb-core writes output.log only when it captures the console itself, which in
        # the daemon would capture the daemon's: so the file is written here, as it would be.
        if lines:
            _write_output_log(Path(attached.handle.settings.files_dir), lines, "a")

    def _write_environment(self, attached: _Attached, run: RunInfo, body: dict[str, Any]) -> None:
        """The training process's code and environment (init(save_code=True)) as wandb's own
        run metadata, an `EnvironmentRecord`: program, args, python, executable, host, git
        remote and commit. wandb's own collection is off in the daemon (x_disable_meta): it
        would describe the daemon, not the training process."""
        from wandb.proto import wandb_internal_pb2 as pb

        env, code = body.get("env"), body.get("code") or {}
        if not env:
            return
        argv = [str(arg) for arg in env.get("argv") or []]
        started = float(body.get("started") or run.started)
        record = pb.EnvironmentRecord(  # type: ignore[attr-defined]
            program=argv[0] if argv else "",
            args=argv[1:],
            python=str(env.get("python") or ""),
            executable=str(env.get("executable") or ""),
            host=str(env.get("host") or run.host or ""),
            writer_id=f"trackd-{run.id}-{started!r}",
        )
        record.started_at.FromNanoseconds(int(started * 1e9))
        if code.get("commit") or code.get("remote"):
            record.git.commit = str(code.get("commit") or "")
            record.git.remote_url = str(code.get("remote") or "")
        _interface(attached.handle).publish_environment(record)

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
            logged = attached.log.take_identities()
            state.artifacts = [a for a in state.artifacts if _artifact_identity(a) not in logged]
            state.records = {k: v for k, v in state.records.items() if k not in logged}
            # What was handed over lies before the cursor saved with this state: the fan-out
            # re-sends only what follows it (a batch it retries), but after a restart, whose
            # attach reads the logs again. So a long run's identities do not pile up here.
            attached.handed.clear()
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
            error = _errors().error(exc)
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
    records: dict[str, str] = field(default_factory=dict)  # marked: identity -> base64 Record


@dataclass
class _Attached:
    """A live W&B run: its handle, its log, and the last step handed over to it."""

    handle: wandb.Run
    log: _LogFollower
    last: int
    stored: set[str]  # identities in the run's earlier logs
    in_progress: bool = False  # whether the row at `last` still takes values
    handed: set[str] = field(default_factory=set)  # identities handed over since a checkpoint

    def holds(self, identity: str) -> bool:
        """Whether the identity is stored already or was handed over (a re-sent record)."""
        return identity in self.stored or identity in self.handed


class _LogParser:
    """LevelDB log chunks reassembled into W&B records, keeping the last history step and
    the identities (trackd artifacts, marked records) seen."""

    def __init__(self, read_record: RecordReader) -> None:
        self.last_step = -1
        self.identities: set[str] = set()
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
                    self.identities.add(found)
                self._partial = None
        return True


class _LogFollower:
    """The last step and the identities stored in the live log of an attached run, read in
    whole blocks as wandb-core completes them."""

    def __init__(self, path: Path, read_record: RecordReader) -> None:
        self._path = path
        self._offset = 0
        self._parser = _LogParser(read_record)

    def take_identities(self) -> set[str]:
        """The identities read since the last call (each is wanted once: a run's whole
        console would pile up here)."""
        taken, self._parser.identities = self._parser.identities, set()
        return taken

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


def _identities_in(path: Path, read_record: RecordReader) -> set[str]:
    """The identities in a log no one writes to any more, read a block at a time."""
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
    return parser.identities


def _identity(record: Any) -> int | str | None:
    """A log record's history step, or its identity: a marked record's (its `uuid`), a
    trackd artifact's (its `trackd.artifact` metadata); None for any other record."""
    if record.uuid.startswith(MARK):
        return str(record.uuid)
    kind = record.WhichOneof("record_type")
    if kind == "history":
        return int(record.history.step.num)
    if kind == "artifact" and record.artifact.metadata:
        marked = json.loads(record.artifact.metadata).get(ARTIFACT_KEY)
        return _artifact_identity(marked) if isinstance(marked, dict) else None
    return None


def _mark(kind: str, *parts: object) -> str:
    """The `uuid` of a record the sink writes: what identifies it among its kind."""
    digest = hashlib.sha1(json.dumps(parts).encode(), usedforsecurity=False).hexdigest()
    return f"{MARK}{kind}:{digest[:24]}"


def _write_output_log(files_dir: Path, lines: list[str], mode: str) -> None:
    with (files_dir / "output.log").open(mode, encoding="utf-8", errors="replace") as out:
        out.write("".join(lines))


# --- wandb's private names ----------------------------------------------------------
#
# All of them, listed here once (tests/test_sdk_private_names.py fails naming each when
# wandb changes it; pyproject.toml bounds the version):
#
# * ``Run._interface``, its ``_publish(record)`` and ``publish_environment(record)``:
#   console, stats and alert records and the run metadata handed to wandb-core
#   (`_interface`). There is no public call for them: without it those records are
#   refused (dead letters, replayable) while metrics, media and the rest still arrive.
# * ``Artifact._add_local_file(name, path, digest, policy)``: an artifact's file with a
#   digest streamed here (`_add_file`); without it, the public ``add_file``.
# * The transaction log: ``Run.settings.sync_file`` (``run-ID.wandb``) and its format,
#   LevelDB log blocks after a 7-byte header (`BLOCK`, `FILE_HEADER`, `CHUNK`), read
#   back to find what wandb-core stored (`_last_step_in`).


def _add_file(artifact: Any, entry: str, source: Path) -> None:
    """Add trackd's stored file to `artifact` under `entry`, by reference (immutable).

    The public ``add_file`` hashes through an mmap of the whole file (a 1 GiB artifact
    would be 1 GiB of the daemon's RSS); the private method it ends in takes the same
    digest, streamed here. Without that method, ``add_file``: more memory, same artifact."""
    add_local_file = getattr(artifact, "_add_local_file", None)
    if add_local_file is None:
        artifact.add_file(str(source), name=entry, policy="immutable")
        return
    digest = base64.b64encode(_md5(source)).decode("ascii")
    add_local_file(name=entry, path=str(source), digest=digest, policy="immutable")


def _interface(handle: Any) -> Any:
    """The run's wandb interface (`Run._interface`, private): the only way to hand
    wandb-core output and environment records. tests/test_sdk_private_names.py has the
    contract test that fails by name when wandb changes it."""
    interface = getattr(handle, "_interface", None)
    if interface is None:
        raise SinkError(
            "wandb: this wandb has no Run._interface; console/metadata need it", retriable=False
        )
    return interface


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


@functools.cache
def _errors() -> ErrorTable:
    """The SDK's exceptions as retriable or permanent (made once the sink imported wandb);
    those of no entry but from wandb itself are its own failures, retriable."""
    from wandb import errors

    return ErrorTable(
        "wandb",
        {
            errors.UsageError: False,
            errors.AuthenticationError: False,
            errors.CommError: _comm_retriable,
            OSError: is_retriable_os_error,
            TypeError: False,
            ValueError: False,
            errors.Error: True,
        },
        sdk_modules=frozenset({"wandb"}),
    )


def _comm_retriable(exc: BaseException) -> bool:
    """A failed exchange with the server: by the status of the response it wraps, if any."""
    return response_retriable(getattr(exc, "exc", None)) is not False
