"""A reader for W&B transaction logs (`run-ID.wandb`), which wandb no longer ships.

The file is a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by the LevelDB
log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type and
payload, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4); a record too
big for the rest of a block is split FIRST, MIDDLE..., LAST; fewer than 7 bytes left
in a block are zero padding. Each record is a serialized `wandb_internal_pb2.Record`.
Written independently of the sink's own reader, so a test does not trust what it checks.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")


def payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    position, record = HEADER.size, b""
    while position + CHUNK.size <= len(data):
        room = BLOCK - position % BLOCK
        if room < CHUNK.size:
            position += room
            continue
        checksum, length, kind = CHUNK.unpack_from(data, position)
        start = position + CHUNK.size
        chunk = data[start : start + length]
        if kind == 0 or len(chunk) < length:
            return  # the unwritten end of a log its writer did not finish
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"bad checksum at {position}"
        position = start + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            yield record


def wandb_env(root: Path) -> dict[str, str]:
    """Offline, and every directory wandb may write to inside the test's own."""
    (root / "wandb").mkdir(parents=True, exist_ok=True)
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "WANDB_SILENT": "true",
    }


def _key(item: Any) -> str:
    return str(item.key) if item.key else "/".join(item.nested_key)


@dataclass
class Session:
    """What one transaction log (one session of a run) holds."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)  # system samples, with "_timestamp"
    exit_code: int | None = None
    output: list[tuple[str, str]] = field(default_factory=list)  # (stream, raw text)
    environment: dict[str, Any] = field(default_factory=dict)
    output_log: str = ""  # the session's files/output.log


def read_session(path: Path) -> Session:
    session = Session(path)
    output_log = path.parent / "files" / "output.log"
    session.output_log = output_log.read_text() if output_log.exists() else ""
    for payload in payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record.FromString(payload)  # type: ignore[attr-defined]
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            session.run_id, session.project = run.run_id, run.project
            session.name, session.group, session.tags = (
                run.display_name,
                run.run_group,
                list(run.tags),
            )
            for item in run.config.update:
                session.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                session.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                session.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            assert row["_step"] == record.history.step.num
            session.history.append(row)
        elif kind == "artifact":
            artifact = record.artifact
            session.artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                    "files": [
                        {"path": entry.path, "size": entry.size, "local_path": entry.local_path}
                        for entry in artifact.manifest.contents
                    ],
                }
            )
        elif kind == "alert":
            alert = record.alert
            session.alerts.append({"title": alert.title, "text": alert.text, "level": alert.level})
        elif kind == "stats":
            sample = {item.key: json.loads(item.value_json) for item in record.stats.item}
            sample["_timestamp"] = record.stats.timestamp.ToNanoseconds() / 1e9
            session.stats.append(sample)
        elif kind == "exit":
            session.exit_code = record.exit.exit_code
        elif kind == "output_raw":
            stderr = wandb_internal_pb2.OutputRawRecord.STDERR  # type: ignore[attr-defined]
            stream = "stderr" if record.output_raw.output_type == stderr else "stdout"
            session.output.append((stream, record.output_raw.line))
        elif kind == "environment":
            env = record.environment
            session.environment.update(
                {
                    "program": env.program,
                    "args": list(env.args),
                    "python": env.python,
                    "executable": env.executable,
                    "host": env.host,
                    "git": {"remote_url": env.git.remote_url, "commit": env.git.commit},
                }
            )
    return session


def read_runs(wandb_dir: Path) -> dict[str, list[Session]]:
    """{W&B run id: its sessions, oldest first} for every log under `wandb_dir`."""
    runs: dict[str, list[Session]] = {}
    logs = sorted(wandb_dir.glob("*run-*/run-*.wandb"), key=lambda path: path.stat().st_mtime_ns)
    for path in logs:
        if path.parent.is_symlink():
            continue  # "latest-run"
        session = read_session(path)
        if session.run_id:  # else wandb-core died before it stored anything of the session
            runs.setdefault(session.run_id, []).append(session)
    return runs
