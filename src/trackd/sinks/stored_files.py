"""Files from trackd's content-addressed store, placed whole and durably where a sink keeps them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trackd.sinks.base import SinkError


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


def fsync_directory(path: Path) -> None:
    """A new file's directory entry must be durable before a checkpoint may count on it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
