"""The embedded default sink: one directory of plain files per run.

    ROOT/PROJECT/RUNNAME-RUNID8/
      run.json  config.json  metrics.jsonl  summary.json  alerts.jsonl  console.log
      artifacts/  media/  system.jsonl

A `media` record's file is copied to `media/KEY/STEP-SHA8.FORMAT` and indexed by a
row of its own in `metrics.jsonl`: `{"step": 3, "ts": ..., "KEY": {"_type": "image",
"path": "media/...", "sha256": ..., "caption": ..., "width": ..., ...}}`, beside the
numbers of the same `log()` call (same step). A histogram has no file: its index row
holds `{"_type": "histogram", "counts": [...], "edges": [...]}` itself. Each alert is
a line `{"ts", "title", "text", "level"}` of `alerts.jsonl`.

`run.json` carries DESIGN.md's fields and, beyond them, the run's tags (from
`init(tags=...)` and `set_tags`), since a plain-files sink has nowhere else to
keep them.

`run.json` also holds `code` and `env` from the run_start (null when the run was
started with `save_code=False`); `console.log` the run's console lines, as text.

`system.jsonl` holds one line per system sample: `{"ts": ..., "node": HOST, "cpu":
..., "gpu.0.util": ...}` (the sampler's names, see `trackd.daemon.sampler`).

`metrics.jsonl`, `alerts.jsonl`, `system.jsonl` and `console.log` are the only files
appended to, through `AppendOnlyFiles`, which makes the appends exactly-once across
crashes and all-or-nothing per batch by cutting files back; the other files are
replaced whole (write to a temporary name, rename), so they are never half-written and
writing them again is harmless.

Sink files are written from the sink's own worker thread (every sink runs
in one, since SDKs block), so plain file calls never block the daemon's
event loop; aiofiles would only add a second thread hop per call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import orjson

from trackd.jsonfile import write_json_atomic
from trackd.sinks.append_only import AppendOnlyFiles
from trackd.sinks.base import (
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    handles,
    mapped_errors,
)
from trackd.sinks.media_files import media_file_name, media_index
from trackd.sinks.paths import path_component


def json_lines(objects: list[dict[str, Any]]) -> bytes:
    """`metrics.jsonl` lines: one compact JSON object per line.

    Encoding is the daemon's largest cost per row at full rate: `json.dumps` takes about
    3 µs a row, orjson about 0.2 µs when it encodes a whole batch in one call (a call per
    row costs ten times that, in allocation). The batch comes out as one array, cut into
    lines at the `},{` between objects, which is safe while that sequence appears nowhere
    else (metric values are numbers, so only a key could hold it: then count differs).
    orjson writes NaN and infinities as null; a batch with a null (values are never
    None) goes through `json`, which writes them as NaN and Infinity, as a user expects
    of a loss that diverged.
    """
    if not objects:
        return b""
    data = orjson.dumps(objects)
    if data.count(b"},{") == len(objects) - 1 and b":null" not in data:
        return data[1:-1].replace(b"},{", b"}\n{") + b"\n"
    return "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in objects).encode()


CODE_STATE = ("code", "env")


class JsonlSink(Sink):
    kind = "jsonl"
    target_key = "path"
    known_options = ()
    # A batch is decoded whole, then held again as objects for the encoder (~700 bytes a
    # row in all): 20,000 rows keep that under 15 MB, where the default 100,000 made it
    # the largest share of the daemon's peak memory, and cost no measurable speed.
    batch_rows = 20_000

    def open(self, context: SinkContext) -> None:
        self.root = Path(self.target).expanduser()
        with mapped_errors(_ERRORS, f"cannot create {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            context.state_dir.mkdir(parents=True, exist_ok=True)
        state = context.state or {}
        self._pinned: dict[str, list[str]] = dict(state.get("pinned", {}))
        self._files = AppendOnlyFiles(self.root, context.state_dir / "presizes.jsonl", state)
        self._summaries: dict[str, dict[str, Any]] = {}
        self._summary_dirty: set[str] = set()
        self._configs: dict[str, dict[str, Any]] = {}

    def write(self, batch: list[Record]) -> None:
        """All or nothing: a batch that fails midway leaves the metrics files as they were.

        The fan-out re-sends a failed batch (whole, or record by record after a
        permanent error), so rows appended before the failure would otherwise land twice.
        """
        try:
            self._write(batch)
        except BaseException:
            self._files.undo()
            raise

    def _write(self, batch: list[Record]) -> None:
        lines: _Lines = {}
        with mapped_errors(_ERRORS):
            self._files.begin()  # may finish cutting back a failed batch: its errors are mapped too
            for record in batch:
                run_dir = self._run_dir(record.run)
                if record.type not in _BESIDE_LINES:
                    self._flush_lines(lines)  # what the record changes comes after its rows
                    lines.clear()
                handler = self.handler(record.type)
                if handler is not None:
                    handler(run_dir, record, lines)
            self._flush_lines(lines)
            for run_dir in self._summary_dirty:
                self._replace(run_dir, "summary.json", self._summaries[run_dir])
            self._summary_dirty.clear()

    def _media_row(self, run_dir: str, body: dict[str, Any]) -> dict[str, Any]:
        """The index row of a media record; a file-backed one is copied to `media/`."""
        if body["kind"] == "histogram":
            return self._write_histogram(body)
        relative = f"media/{media_file_name(body)}"
        self._copy_file(run_dir, body["path"], relative)
        return {"step": body["step"], "ts": body["ts"], body["key"]: media_index(body, relative)}

    @staticmethod
    def _write_histogram(body: dict[str, Any]) -> dict[str, Any]:
        """A histogram is its own index row: counts and edges inline, no file."""
        value = {"_type": "histogram", "counts": body["counts"], "edges": body["edges"]}
        if body.get("caption") is not None:
            value["caption"] = body["caption"]
        return {"step": body["step"], "ts": body["ts"], body["key"]: value}

    def _write_alert(self, run_dir: str, body: dict[str, Any]) -> None:
        alert = {key: body[key] for key in ("ts", "title", "text", "level")}
        self._files.append(f"{run_dir}/alerts.jsonl", b"", json_lines([alert]))

    # --- one handler per record type: (the run's directory below the root, the record,
    # the metrics and media rows gathered per run directory, appended in one go) ---

    @handles("metrics")
    def _on_metrics(self, run_dir: str, record: Record, lines: _Lines) -> None:
        out = lines.setdefault(run_dir, [])
        summary = self._summary(run_dir)
        self._summary_dirty.add(run_dir)
        pinned = self._pinned.get(run_dir, ())
        kept = {key: summary[key] for key in pinned if key in summary}
        for step, ts, values in record.body["rows"]:
            out.append({"step": step, "ts": ts, **values})
            summary.update(values)
        summary.update(kept)

    @handles("media")
    def _on_media(self, run_dir: str, record: Record, lines: _Lines) -> None:
        lines.setdefault(run_dir, []).append(self._media_row(run_dir, record.body))

    @handles("console")
    def _on_console(self, run_dir: str, record: Record, lines: _Lines) -> None:
        self._write_console(run_dir, record.body)

    @handles("system")
    def _on_system(self, run_dir: str, record: Record, lines: _Lines) -> None:
        self._write_system(run_dir, record.body)

    @handles("run_start")
    def _on_run_start(self, run_dir: str, record: Record, lines: _Lines) -> None:
        (self.root / run_dir).mkdir(parents=True, exist_ok=True)
        self._configs[run_dir] = {**self._config(run_dir), **record.run.config}
        self._replace(run_dir, "config.json", self._configs[run_dir])
        self._write_run(run_dir, record.run, status="running", ended=None, error=None)
        self._write_code_state(run_dir, record.body)

    @handles("config")
    def _on_config(self, run_dir: str, record: Record, lines: _Lines) -> None:
        self._config(run_dir).update(record.body["values"])
        self._replace(run_dir, "config.json", self._configs[run_dir])

    @handles("summary")
    def _on_summary(self, run_dir: str, record: Record, lines: _Lines) -> None:
        values = record.body["values"]
        self._summary(run_dir).update(values)
        self._summary_dirty.add(run_dir)
        pinned = self._pinned.setdefault(run_dir, [])
        pinned.extend(key for key in values if key not in pinned)

    @handles("tags")
    def _on_tags(self, run_dir: str, record: Record, lines: _Lines) -> None:
        current = self._read(run_dir, "run.json")
        current["tags"] = {**current.get("tags", {}), **record.body["values"]}
        self._replace(run_dir, "run.json", current)

    @handles("artifact")
    def _on_artifact(self, run_dir: str, record: Record, lines: _Lines) -> None:
        self._copy_artifact(run_dir, record.body["path"], record.body["name"])

    @handles("alert")
    def _on_alert(self, run_dir: str, record: Record, lines: _Lines) -> None:
        self._write_alert(run_dir, record.body)

    @handles("run_end")
    def _on_run_end(self, run_dir: str, record: Record, lines: _Lines) -> None:
        body = record.body
        error = body.get("error")
        self._write_run(
            run_dir, record.run, status=body["status"], ended=body["ended"], error=error
        )
        self._close_run(run_dir)

    def _write_system(self, run_dir: str, body: dict[str, Any]) -> None:
        """One line per sample in `system.jsonl`, the node's name beside its values."""
        row = {"ts": body["ts"], "node": body["node"], **body["values"]}
        self._files.append(f"{run_dir}/system.jsonl", b"", json_lines([row]))

    def _flush_lines(self, lines: _Lines) -> None:
        for run_dir, rows in lines.items():
            if rows:
                self._files.append(f"{run_dir}/metrics.jsonl", b"", json_lines(rows))

    def _run_dir(self, run: RunInfo) -> str:
        return f"{path_component(run.project)}/{path_component(run.name)}-{run.id[:8]}"

    def _summary(self, run_dir: str) -> dict[str, Any]:
        if run_dir not in self._summaries:
            self._summaries[run_dir] = self._read(run_dir, "summary.json")
        return self._summaries[run_dir]

    def _config(self, run_dir: str) -> dict[str, Any]:
        if run_dir not in self._configs:
            self._configs[run_dir] = self._read(run_dir, "config.json")
        return self._configs[run_dir]

    def _read(self, run_dir: str, name: str) -> dict[str, Any]:
        path = self.root / run_dir / name
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_run(
        self, run_dir: str, run: RunInfo, *, status: str, ended: float | None, error: str | None
    ) -> None:
        previous = self._read(run_dir, "run.json")
        self._replace(
            run_dir,
            "run.json",
            {
                "id": run.id,
                "project": run.project,
                "name": run.name,
                "group": run.group,
                "host": run.host,
                "pid": run.pid,
                "rank": run.rank,
                "local_rank": run.local_rank,
                "world_size": run.world_size,
                "started": previous.get("started", run.started),
                "ended": ended,
                "status": status,
                "error": error,
                "tags": {**previous.get("tags", {}), **run.tags},
                **{key: previous[key] for key in CODE_STATE if key in previous},
            },
        )

    def _write_code_state(self, run_dir: str, body: dict[str, Any]) -> None:
        """`code` and `env` from the run_start (init(save_code=True)) into run.json."""
        current = self._read(run_dir, "run.json")
        current.update({key: body.get(key) for key in CODE_STATE})
        self._replace(run_dir, "run.json", current)

    def _write_console(self, run_dir: str, body: dict[str, Any]) -> None:
        """console.log: the run's stdout and stderr lines in the order written, one a line."""
        text = "".join(f"{line[2]}\n" for line in body["lines"])
        self._files.append(f"{run_dir}/console.log", b"", text.encode(errors="replace"))

    def _replace(self, run_dir: str, name: str, value: dict[str, Any]) -> None:
        directory = self.root / run_dir
        directory.mkdir(parents=True, exist_ok=True)
        # the user chose the sink's directory: its files keep the user's umask
        write_json_atomic(directory / name, value, private=False, indent=2)

    def _copy_artifact(self, run_dir: str, source: str, name: str) -> None:
        self._copy_file(run_dir, source, f"artifacts/{path_component(name)}")

    def _copy_file(self, run_dir: str, source: str, relative: str) -> None:
        target = self.root / run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError as exc:
            raise SinkError(
                f"jsonl: artifact {source!r} no longer exists", retriable=False
            ) from exc

    def _close_run(self, run_dir: str) -> None:
        self._files.finish(f"{run_dir}/metrics.jsonl")
        self._files.finish(f"{run_dir}/alerts.jsonl")
        self._files.finish(f"{run_dir}/system.jsonl")
        self._files.finish(f"{run_dir}/console.log")
        if run_dir in self._summaries:
            self._replace(run_dir, "summary.json", self._summaries.pop(run_dir))
        self._summary_dirty.discard(run_dir)
        self._configs.pop(run_dir, None)
        self._pinned.pop(run_dir, None)

    def checkpoint(self) -> dict[str, Any]:
        return {**self._files.checkpoint(), "pinned": dict(self._pinned)}

    def close(self) -> None:
        self._files.close_all()


# Every failure to write the files may pass (a full or read-only disk, permissions): the
# records wait in the WAL; what is wrong with a record itself is handled where it is met.
_ERRORS = ErrorTable("jsonl", {OSError: True})

_Lines = dict[str, list[dict[str, Any]]]  # run directory -> its metrics/media rows, in order
# Records handled beside the rows gathered so far; any other is handled after they are written.
_BESIDE_LINES = frozenset({"metrics", "media", "console", "system"})
