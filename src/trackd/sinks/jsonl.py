"""The embedded default sink: one directory of plain files per run.

    ROOT/PROJECT/RUNNAME-RUNID8/
      run.json  config.json  metrics.jsonl  summary.json  artifacts/

`run.json` carries DESIGN.md's fields and, beyond them, the run's tags (from
`init(tags=...)` and `set_tags`), since a plain-files sink has nowhere else to
keep them.

`metrics.jsonl` is the only file appended to; the others are replaced whole
(write to a temporary name, rename), so they are never half-written and
writing them again is harmless. Appends are made exactly-once across crashes
by truncation: the checkpoint saved with the cursor holds each open file's
size, and before the first append to a file the checkpoint does not cover,
its size is written to a small journal (fsynced). On open, every file is cut
back to the size the cursor corresponds to, and the fan-out re-sends from the
cursor.

Sink files are written from the sink's own worker thread (every sink runs
in one, since SDKs block), so plain file calls never block the daemon's
event loop; aiofiles would only add a second thread hop per call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

from trackd.sinks.base import Record, RunInfo, Sink, SinkContext, SinkError

_UNSAFE = re.compile(r"[^\w.@+=-]+")
_OPEN_FILES = 64


class JsonlSink(Sink):
    kind = "jsonl"
    target_key = "path"

    def open(self, context: SinkContext) -> None:
        self.root = Path(self.target).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            context.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"jsonl: cannot create {self.root}: {exc}", retriable=True) from exc
        state = context.state or {}
        self._sizes: dict[str, int] = dict(state.get("sizes", {}))
        self._pinned: dict[str, list[str]] = dict(state.get("pinned", {}))
        self._epoch: int = state.get("epoch", 0)
        self._journal_path = context.state_dir / "presizes.jsonl"
        self._recover()
        self._journal = self._journal_path.open("w", encoding="utf-8")
        self._mark_epoch()
        self._files: dict[str, IO[str]] = {}
        self._dirty: set[str] = set()
        self._summaries: dict[str, dict[str, Any]] = {}
        self._summary_dirty: set[str] = set()
        self._batch_start: dict[str, int] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    def _recover(self) -> None:
        """Cut every metrics file back to the size the saved cursor corresponds to.

        The journal holds epoch markers (one per checkpoint) and, after each, the
        size of every file before its first append since that checkpoint. Only the
        entries after the saved checkpoint's marker matter, and for each file the
        first of them.
        """
        sizes: dict[str, int] = {}
        if self._journal_path.exists():
            after_saved = False
            for line in self._journal_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line: its file had not been appended to yet
                if "epoch" in entry:
                    after_saved = after_saved or entry["epoch"] == self._epoch
                elif after_saved:
                    sizes.setdefault(entry["file"], entry["size"])
        sizes.update(self._sizes)
        for relative, size in sizes.items():
            path = self.root / relative
            if path.exists() and path.stat().st_size > size:
                os.truncate(path, size)
        self._sizes = {rel: size for rel, size in sizes.items() if rel in self._sizes}

    def write(self, batch: list[Record]) -> None:
        """All or nothing: a batch that fails midway leaves the metrics files as they were.

        The fan-out re-sends a failed batch (whole, or record by record after a
        permanent error), so rows appended before the failure would otherwise land twice.
        """
        self._batch_start = dict(self._sizes)
        try:
            self._write(batch)
        except BaseException:
            self._undo_appends()
            raise

    def _undo_appends(self) -> None:
        for relative, size in self._sizes.items():
            start = self._batch_start[relative]
            if start != size:
                handle = self._files.pop(relative.rsplit("/", 1)[0], None)
                if handle is not None:
                    handle.close()
                os.truncate(self.root / relative, start)
                self._sizes[relative] = start

    def _write(self, batch: list[Record]) -> None:
        lines: dict[str, list[str]] = {}
        try:
            for record in batch:
                run_dir = self._run_dir(record.run)
                if record.type == "metrics":
                    out = lines.setdefault(run_dir, [])
                    summary = self._summary(run_dir)
                    self._summary_dirty.add(run_dir)
                    pinned = self._pinned.get(run_dir, ())
                    for step, ts, values in record.body["rows"]:
                        out.append(json.dumps({"step": step, "ts": ts, **values}))
                        for key, value in values.items():
                            if key not in pinned:
                                summary[key] = value
                else:
                    self._flush_lines(lines)
                    lines = {}
                    self._apply(run_dir, record)
            self._flush_lines(lines)
            for run_dir in self._summary_dirty:
                self._replace(run_dir, "summary.json", self._summaries[run_dir])
            self._summary_dirty.clear()
        except OSError as exc:
            raise SinkError(f"jsonl: {exc}", retriable=True) from exc

    def _apply(self, run_dir: str, record: Record) -> None:
        body = record.body
        if record.type == "run_start":
            (self.root / run_dir).mkdir(parents=True, exist_ok=True)
            self._configs[run_dir] = {**self._config(run_dir), **record.run.config}
            self._replace(run_dir, "config.json", self._configs[run_dir])
            self._write_run(run_dir, record.run, status="running", ended=None, error=None)
        elif record.type == "config":
            self._config(run_dir).update(body["values"])
            self._replace(run_dir, "config.json", self._configs[run_dir])
        elif record.type == "summary":
            self._summary(run_dir).update(body["values"])
            self._summary_dirty.add(run_dir)
            pinned = self._pinned.setdefault(run_dir, [])
            pinned.extend(key for key in body["values"] if key not in pinned)
        elif record.type == "tags":
            current = self._read(run_dir, "run.json")
            current["tags"] = {**current.get("tags", {}), **body["values"]}
            self._replace(run_dir, "run.json", current)
        elif record.type == "artifact":
            self._copy_artifact(run_dir, body["path"], body["name"])
        elif record.type == "run_end":
            self._write_run(
                run_dir,
                record.run,
                status=body["status"],
                ended=body["ended"],
                error=body.get("error"),
            )
            self._close_run(run_dir)

    def _flush_lines(self, lines: dict[str, list[str]]) -> None:
        for run_dir, rows in lines.items():
            if rows:
                handle = self._metrics_file(run_dir)
                handle.write("\n".join(rows) + "\n")
                handle.flush()
                self._sizes[f"{run_dir}/metrics.jsonl"] = handle.tell()
                self._dirty.add(run_dir)

    def _metrics_file(self, run_dir: str) -> IO[str]:
        handle = self._files.get(run_dir)
        if handle is None:
            if len(self._files) >= _OPEN_FILES:
                oldest = next(iter(self._files))
                self._files.pop(oldest).close()
            relative = f"{run_dir}/metrics.jsonl"
            path = self.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if relative not in self._sizes:
                size = path.stat().st_size if path.exists() else 0
                self._journal.write(json.dumps({"file": relative, "size": size}) + "\n")
                self._journal.flush()
                os.fsync(self._journal.fileno())
                self._sizes[relative] = size
                self._batch_start[relative] = size
            handle = path.open("a", encoding="utf-8")
            self._files[run_dir] = handle
        return handle

    def _run_dir(self, run: RunInfo) -> str:
        return f"{_safe(run.project)}/{_safe(run.name)}-{run.id[:8]}"

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
                "started": previous.get("started", run.started),
                "ended": ended,
                "status": status,
                "error": error,
                "tags": {**previous.get("tags", {}), **run.tags},
            },
        )

    def _replace(self, run_dir: str, name: str, value: dict[str, Any]) -> None:
        directory = self.root / run_dir
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{name}.tmp"
        temporary.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, directory / name)

    def _copy_artifact(self, run_dir: str, source: str, name: str) -> None:
        target = self.root / run_dir / "artifacts" / _safe(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except FileNotFoundError as exc:
            raise SinkError(
                f"jsonl: artifact {source!r} no longer exists", retriable=False
            ) from exc

    def _close_run(self, run_dir: str) -> None:
        handle = self._files.pop(run_dir, None)
        if handle is not None:
            os.fsync(handle.fileno())
            handle.close()
        if run_dir in self._summaries:
            self._replace(run_dir, "summary.json", self._summaries.pop(run_dir))
        self._summary_dirty.discard(run_dir)
        self._configs.pop(run_dir, None)
        self._pinned.pop(run_dir, None)
        self._dirty.discard(run_dir)

    def checkpoint(self) -> dict[str, Any]:
        """Make appended lines durable, then describe the files as they now are."""
        for run_dir in self._dirty:
            handle = self._files.get(run_dir)
            if handle is not None:
                os.fsync(handle.fileno())
        self._dirty.clear()
        open_files = {f"{run_dir}/metrics.jsonl" for run_dir in self._files}
        self._sizes = {rel: size for rel, size in self._sizes.items() if rel in open_files}
        self._epoch += 1
        self._mark_epoch()
        return {"sizes": dict(self._sizes), "pinned": dict(self._pinned), "epoch": self._epoch}

    def _mark_epoch(self) -> None:
        self._journal.write(json.dumps({"epoch": self._epoch}) + "\n")
        self._journal.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        if not self._journal.closed:
            self._journal.close()


def _safe(name: str) -> str:
    """A path component from a project or run name: no separators, no leading dot."""
    return _UNSAFE.sub("_", name).lstrip(".") or "_"
