"""A `media` record as a sink stores it: its file's name, its index entry, a table's content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trackd.sinks.paths import relative_path


def media_file_name(body: dict[str, Any]) -> str:
    """Where a `media` record's file goes below a sink's media directory:
    `KEY/STEP-SHA8.FORMAT`, with the key's "/" kept as directories; the same record
    delivered twice names the same file."""
    key = relative_path(str(body["key"]))
    return f"{key}/{body['step']}-{str(body['sha256'])[:8]}.{body['format']}"


def media_index(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The JSON a sink keeps about a media file (jsonl's index row value, a backend's
    caption): its kind, where it went, and the metadata the client sent."""
    skip = {"step", "ts", "key", "path"}
    return {"_type": body["kind"], "path": path, **{k: v for k, v in body.items() if k not in skip}}


def read_table(path: Path) -> dict[str, Any]:
    """A `table` media file: the client's JSON `{"columns": [...], "data": [[...], ...]}`."""
    table: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return table
