"""State files replaced whole: written to a temporary file, fsynced, then renamed over.

The one way the daemon and the sinks save what they must find again after a
crash (the ledger checkpoint, delivery progress, run maps, the JSONL sink's
run files): a reader sees the old file or the new one, never half of either.
A state file of the daemon's own is created 0600 (`private`); a file in a
directory the user chose for a sink keeps the user's umask.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, *, private: bool = True) -> None:
    # a name of its own per thread: two saves of one file may overlap (the periodic ledger
    # save and the one at shutdown) and must not rename each other's half-written file
    temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def write_json_atomic(
    path: Path, value: Any, *, private: bool = True, indent: int | None = None
) -> None:
    text = json.dumps(value, indent=indent, default=str) + ("\n" if indent else "")
    write_atomic(path, text.encode(), private=private)


def read_json(path: Path) -> Any:
    """The document in `path`; ValueError (naming the file) if it is not whole JSON."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
