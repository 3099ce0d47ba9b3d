"""Append-only files (JSONL lines, TensorBoard events) made exactly-once across crashes."""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from trackd.sinks.stored_files import fsync_directory

OPEN_FILES = 64


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
