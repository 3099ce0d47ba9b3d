"""Trackio sink: each trackd run is one run in the local Trackio store.

It writes through Trackio's own storage layer, `trackio.sqlite_storage.SQLiteStorage`
(`bulk_log`, what `trackio.init()`/`log()` end in when logging locally), so there is
no `trackio.init()` background thread, no dashboard and no server, and what it writes
is what Trackio's dashboard and `trackio.Api` read. The store is `TRACKIO_DIR`, which
Trackio reads when it is imported (in `open()`, so from the daemon's environment),
else `$HF_HOME/trackio`.

How runs appear:

* project: the trackd project, as for every sink (DESIGN.md, "How runs appear in each
  backend"), so one daemon serves every training script under the project it names.
  The spec's target (`trackio:PROJECT`) is the fallback project for a run whose
  trackd project Trackio refuses (a `registry-` prefix, a suffix such as `_system`
  that would collide with another project's files): its records go there, with a
  warning, rather than to the dead letters.
* run name: the trackd run name. Run id: the trackd run id. Trackio lets its writer
  choose run ids, so the id itself is the mapping: nothing to keep in a RunMap, and
  it stays the same after a state directory is lost or a `trackd replay`.
* metrics: one Trackio row per trackd row, with its step and the client's timestamp;
  keys Trackio reserves ("step", "time", ...) become "__key", as `trackio.log()` does.
* config: the run's config merged with later `log_config()` values, plus Trackio's
  run metadata `_Created` and `_Group` and, since Trackio has no tags, summary, run
  status or artifact store of its own, `_Tags`, `_Summary`, `_Status` ("running",
  "finished", "failed"), `_Error`, `_Ended` and `_Artifacts` (references). Keys
  starting with "_" are Trackio's run metadata, which `trackio.init()` refuses in a
  user's config, so these do not collide with config logged through Trackio itself.
* media: a row of its own at its step (beside the row of the numbers logged with it),
  holding under its key what `trackio.log()` stores for a `trackio.Image`, `Video` or
  `Table`, so Trackio's dashboard shows it: an image or video is
  `{"_type": "trackio.image" | "trackio.video", "file_path": ..., "caption": ...}`, its
  file in Trackio's media directory, `MEDIA_DIR/PROJECT/RUN/STEP/KEY-SHA16.FORMAT`
  (Trackio's own layout, `file_path` relative to `MEDIA_DIR`), hard-linked from trackd's
  store where it can be (else copied); a table is `{"_type": "trackio.table", "_value":
  [{column: value, ...}, ...]}`, its rows inline, and Trackio's tables have no caption.
  The file name comes from the key and the content (Trackio picks a random one), so a
  re-sent record finds its file in place. A histogram is `trackio.Histogram`'s
  `{"_type": "trackio.histogram", "bins": edges, "values": counts}`, inline.
* alerts: rows of Trackio's alerts table (`SQLiteStorage.bulk_alert`, what
  `trackio.alert()` ends in), level in Trackio's lower case, at the run's last stored
  step; each alert's id is a hash of it, so a re-sent one is ignored.
* system samples: Trackio's system-metrics table (`log_system`'s), by time, under its
  monitors' names (`cpu/utilization`, `gpu/0/utilization`, ...).

Idempotence. Trackio dedupes metric rows by `log_id` (an `INSERT OR IGNORE` on a
unique index: how it makes its own re-sends and fragment imports idempotent). Each
row's log_id here is a hash of the trackd run id, the step, the client timestamp and
the keys, all fixed when `log()` was called, so a row re-sent after a daemon crash,
or delivered again by a replay, is ignored by the database; metrics need no
checkpoint. The config is replaced whole, so writing it again is harmless, but
Trackio writes a run's config only within a `bulk_log` of at least one row. The
sink sends it with the run's rows when it changed; when it changed without new rows
(log_config, set_tags, set_summary, finish) it sends one of the run's stored rows
again (its "anchor", whose log_id makes the insert a no-op) to carry the config. A
run with no rows yet keeps its config pending until it has some: Trackio lists no
run without metrics. The checkpoint holds each open run's merged config, whether it
is pending and its anchor; the records after the saved cursor, applied again in
order, rebuild the same config.

Durability is Trackio's: its SQLite runs in WAL mode with synchronous=NORMAL, which
survives a killed process but may lose the last commits to a power cut; set
TRACKIO_SQLITE_SYNCHRONOUS=full in the daemon's environment to close that window.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trackd.sinks.base import (
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    handles,
    is_retriable_os_error,
    mapped_errors,
)
from trackd.sinks.media_files import read_table
from trackd.sinks.notices import Notices
from trackd.sinks.paths import path_component
from trackd.sinks.stored_files import place_file, stored_file
from trackd.sinks.system_samples import since_run_start, system_node, system_values


class TrackioSink(Sink):
    kind = "trackio"
    target_key = "project"
    known_options = ()

    def open(self, context: SinkContext) -> None:
        """Trackio's internal names this sink uses (none is in ``trackio.__all__``), all
        imported here; tests/test_sdk_private_names.py fails naming each (and each keyword
        passed) when Trackio changes it, and pyproject.toml bounds the version:
        ``trackio.sqlite_storage.SQLiteStorage`` (``bulk_log``, ``bulk_log_system``,
        ``bulk_alert``, ``get_run_config``, ``validate_project_name``),
        ``trackio.media.get_project_media_path``, ``trackio.utils.MEDIA_DIR`` and
        ``RESERVED_KEYS``. The public ``trackio.init``/``log`` are no fallback: they start
        a background sender per run and cannot take a record's own time or log id."""
        try:
            from trackio.media import get_project_media_path
            from trackio.sqlite_storage import SQLiteStorage
            from trackio.utils import MEDIA_DIR, RESERVED_KEYS
        except ImportError as exc:
            raise SinkError(
                f"trackio: {exc}; install it with pip install 'trackd[trackio]'", retriable=False
            ) from exc
        # Trackio's functions are untyped; held as Any so that strict typing stops here.
        self._storage: Any = SQLiteStorage
        self._media_path: Any = get_project_media_path
        self._media_dir = Path(MEDIA_DIR)
        self._reserved = frozenset(RESERVED_KEYS)
        self._notices = Notices(self.kind)
        try:
            self._storage.validate_project_name(self.target)
        except ValueError as exc:
            raise SinkError(f"trackio: fallback project: {exc}", retriable=False) from exc
        state = context.state or {}
        self._runs: dict[str, _Run] = {
            run_id: _Run.restore(saved) for run_id, saved in state.get("runs", {}).items()
        }

    def write(self, batch: list[Record]) -> None:
        rows: dict[str, _Rows] = {}
        ended: set[str] = set()
        with mapped_errors(_ERRORS):
            for record in batch:
                run = self._run(record.run)
                handler = self.handler(record.type)
                if handler is None:
                    self._notices(f"{record.type} records have no Trackio form; skipped")
                else:
                    handler(run, record, rows)
                if record.type == "run_end":
                    ended.add(record.run.id)
                elif record.type == "run_start":
                    ended.discard(record.run.id)
            for run_id, run in self._runs.items():
                self._store(run_id, run, rows.get(run_id))
        for run_id in ended:
            run = self._runs.pop(run_id)
            if run.pending:
                self._notices("a run ended without metrics; Trackio lists no run without them")

    def _run(self, info: RunInfo) -> _Run:
        run = self._runs.get(info.id)
        if run is None:
            project = info.project
            try:
                self._storage.validate_project_name(project)
            except ValueError as exc:
                self._notices(f"{exc}; such runs go to project {self.target!r}")
                project = self.target
            stored = self._storage.get_run_config(project, run_id=info.id)
            run = _Run(project=project, name=info.name, config=dict(stored or {}))
            self._runs[info.id] = run
        return run

    # --- one handler per record type: (the run as Trackio stores it, the record, the metric
    # rows gathered per run in this batch). Records other than metrics, media, alerts and
    # system samples merge into the run's config, stored with the batch. ---

    @handles("metrics")
    def _on_metrics(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        out = rows.setdefault(record.run.id, _Rows())
        for step, ts, values in record.body["rows"]:
            out.add(record.run.id, step, ts, self._metrics(values))

    @handles("media")
    def _on_media(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        body = record.body
        media = {body["key"]: self._media(run, body)}
        out = rows.setdefault(record.run.id, _Rows())
        out.add(record.run.id, body["step"], body["ts"], self._metrics(media))

    @handles("alert")
    def _on_alert(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        self._write_alert(record.run.id, run, record.body)

    @handles("system")
    def _on_system(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        self._write_system(run, record)

    @handles("run_start")
    def _on_run_start(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        info, config = record.run, run.config
        config.update(info.config)
        config.setdefault("_Created", _iso(info.started))  # a resumed run keeps its own
        config["_Group"] = info.group
        if info.tags:
            config["_Tags"] = {**config.get("_Tags", {}), **info.tags}
        config.update(_Status="running", _Error=None, _Ended=None)
        run.pending = True

    @handles("config")
    def _on_config(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        run.config.update(record.body["values"])
        run.pending = True

    @handles("tags", "summary")
    def _on_values(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        key = f"_{record.type.title()}"
        run.config[key] = {**run.config.get(key, {}), **record.body["values"]}
        run.pending = True

    @handles("artifact")
    def _on_artifact(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        body = record.body
        run.config["_Artifacts"] = {**run.config.get("_Artifacts", {}), body["name"]: body["path"]}
        run.pending = True

    @handles("run_end")
    def _on_run_end(self, run: _Run, record: Record, rows: dict[str, _Rows]) -> None:
        body = record.body
        run.config.update(_Status=body["status"], _Error=body.get("error"))
        run.config["_Ended"] = _iso(body["ended"])
        run.pending = True

    def _write_alert(self, run_id: str, run: _Run, body: dict[str, Any]) -> None:
        """Into Trackio's alerts table, as `trackio.alert()` stores one; its alert id comes
        from the alert itself, so a re-sent one is ignored (INSERT OR IGNORE)."""
        identity = "\0".join([run_id, repr(body["ts"]), body["title"], body["text"]])
        self._storage.bulk_alert(
            project=run.project,
            run=run.name,
            run_id=run_id,
            titles=[body["title"]],
            texts=[body["text"] or None],
            levels=[body["level"].lower()],
            steps=[None if run.anchor is None else run.anchor[1]],
            timestamps=[_iso(body["ts"])],
            alert_ids=["trackd-" + hashlib.sha256(identity.encode()).hexdigest()[:32]],
        )

    @staticmethod
    def _write_histogram(body: dict[str, Any]) -> dict[str, Any]:
        """`trackio.Histogram._to_dict()`'s form."""
        return {"_type": "trackio.histogram", "bins": body["edges"], "values": body["counts"]}

    def _write_system(self, run: _Run, record: Record) -> None:
        """A sample as `trackio.log_system()` stores it (Trackio's system-metrics table, by
        time, no step), under the names Trackio's own CPU and GPU monitors use; another
        node's (not rank 0's) under `NODE/`. Its log_id makes a re-sent sample a no-op."""
        body = record.body
        node = system_node(record.run, body["node"])
        values = system_values(since_run_start(body), _SYSTEM_NAMES, _GPU_NAMES)
        if node:
            values = {f"{node}/{key}": value for key, value in values.items()}
        identity = "\0".join([record.run.id, body["node"], repr(body["ts"])])
        self._storage.bulk_log_system(
            project=run.project,
            run=run.name,
            run_id=record.run.id,
            metrics_list=[values],
            timestamps=[_iso(body["ts"])],
            log_ids=["trackd-system-" + hashlib.sha256(identity.encode()).hexdigest()[:32]],
        )

    def _media(self, run: _Run, body: dict[str, Any]) -> dict[str, Any]:
        """What `trackio.log()` stores for the media object, its file placed as Trackio would."""
        if body["kind"] == "histogram":
            return self._write_histogram(body)
        source = stored_file(body, self.kind)
        if body["kind"] == "table":
            table = read_table(source)
            rows = [dict(zip(table["columns"], row, strict=False)) for row in table["data"]]
            return {"_type": "trackio.table", "_value": rows}
        directory = Path(self._media_path(project=run.project, run=run.name, step=body["step"]))
        name = f"{path_component(body['key'])}-{body['sha256'][:16]}.{body['format']}"
        place_file(source, directory / name)
        relative = (directory / name).relative_to(self._media_dir)
        kind = f"trackio.{body['kind']}"
        return {"_type": kind, "file_path": str(relative), "caption": body.get("caption")}

    def _metrics(self, values: dict[str, Any]) -> dict[str, Any]:
        """Rename the keys Trackio reserves for its own columns, as trackio.log() does."""
        reserved = self._reserved
        return {
            f"__{key}" if key in reserved or key.startswith("__") else key: value
            for key, value in values.items()
        }

    def _store(self, run_id: str, run: _Run, rows: _Rows | None) -> None:
        """One transaction per run: its new rows, and its config if that changed."""
        if rows is None:
            if not run.pending or run.anchor is None:
                return  # nothing new, or no stored row yet to carry the config
            rows = _Rows()
            rows.carry(run.anchor)
        self._storage.bulk_log(
            project=run.project,
            run=run.name,
            run_id=run_id,
            metrics_list=rows.metrics,
            steps=rows.steps,
            timestamps=rows.timestamps,
            log_ids=rows.log_ids,
            config=run.config if run.pending else None,
        )
        run.pending = False
        run.anchor = rows.last()

    def checkpoint(self) -> dict[str, Any]:
        return {"runs": {run_id: run.save() for run_id, run in self._runs.items()}}

    def close(self) -> None:
        """Nothing is held open: Trackio opens and closes a connection per call."""


@dataclass
class _Run:
    """An open run as the sink knows it: where it goes, its merged config, its anchor."""

    project: str
    name: str
    config: dict[str, Any]
    pending: bool = False
    anchor: tuple[str, int, str] | None = None  # (log_id, step, timestamp) of a stored row

    def save(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "name": self.name,
            "config": self.config,
            "pending": self.pending,
            "anchor": None if self.anchor is None else list(self.anchor),
        }

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> _Run:
        anchor = saved.get("anchor")
        return cls(
            project=saved["project"],
            name=saved["name"],
            config=dict(saved["config"]),
            pending=bool(saved["pending"]),
            anchor=None if anchor is None else (str(anchor[0]), int(anchor[1]), str(anchor[2])),
        )


@dataclass
class _Rows:
    """One run's rows of a batch, in the column lists `bulk_log` takes."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    timestamps: list[str] = field(default_factory=list)
    log_ids: list[str] = field(default_factory=list)

    def add(self, run_id: str, step: int, ts: float, values: dict[str, Any]) -> None:
        self.metrics.append(values)
        self.steps.append(step)
        self.timestamps.append(_iso(ts))
        self.log_ids.append(_log_id(run_id, step, ts, values))

    def carry(self, anchor: tuple[str, int, str]) -> None:
        """A stored row again: the database ignores it, its config is written."""
        log_id, step, timestamp = anchor
        self.metrics.append({})
        self.steps.append(step)
        self.timestamps.append(timestamp)
        self.log_ids.append(log_id)

    def last(self) -> tuple[str, int, str]:
        return self.log_ids[-1], self.steps[-1], self.timestamps[-1]


GIB = 1 / 1024**3  # Trackio's monitors report memory in GiB
# trackd's sample names -> Trackio's (trackio/cpu.py, trackio/gpu.py); names its monitors do
# not have follow their pattern.
_SYSTEM_NAMES = {
    "cpu": ("cpu/utilization", 1.0),
    "cpu.count": ("cpu/count_logical", 1.0),
    "memory.used": ("memory/used", GIB),
    "memory.available": ("memory/available", GIB),
    "memory.percent": ("memory/percent", 1.0),
    "swap.used": ("swap/used", GIB),
    "swap.percent": ("swap/percent", 1.0),
    "disk.percent": ("disk/percent", 1.0),
    "disk.read_bytes": ("disk/read_bytes", 1.0),
    "disk.write_bytes": ("disk/write_bytes", 1.0),
    "network.sent": ("network/sent_bytes", 1.0),
    "network.recv": ("network/recv_bytes", 1.0),
    "proc.cpu": ("process/cpu_percent", 1.0),
    "proc.rss": ("process/rss", GIB),
    "proc.memory.percent": ("process/memory_percent", 1.0),
    "proc.threads": ("process/threads", 1.0),
}
_GPU_NAMES = {
    "util": ("gpu/{i}/utilization", 1.0),
    "memory.used": ("gpu/{i}/allocated_memory", GIB),
    "memory.total": ("gpu/{i}/total_memory", GIB),
    "memory.percent": ("gpu/{i}/memory_usage", 0.01),  # Trackio's is a fraction
    "power": ("gpu/{i}/power", 1.0),
    "power.percent": ("gpu/{i}/power_percent", 1.0),
    "temp": ("gpu/{i}/temp", 1.0),
    "clock.sm": ("gpu/{i}/sm_clock", 1.0),
    "proc.memory": ("gpu/{i}/process_memory", GIB),
}


def _log_id(run_id: str, step: int, ts: float, values: dict[str, Any]) -> str:
    """The same for the same `log()` call however often it is delivered, else different."""
    identity = "\0".join([run_id, str(step), repr(ts), *sorted(values)])
    return "trackd-" + hashlib.sha256(identity.encode()).hexdigest()[:32]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _os_retriable(exc: BaseException) -> bool:
    """Trackio's file lock gives up after 10 s with an IOError that has no errno."""
    return getattr(exc, "errno", None) is None or is_retriable_os_error(exc)


# Trackio's and SQLite's errors as retriable (the store may recover) or permanent.
_ERRORS = ErrorTable(
    "trackio",
    {
        sqlite3.OperationalError: True,  # locked, busy, disk I/O, cannot open
        OSError: _os_retriable,
        sqlite3.Error: False,
        ValueError: False,
        TypeError: False,
        KeyError: False,
    },
)
