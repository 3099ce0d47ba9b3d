"""What the daemon knows as of the WAL's durable end: sessions and runs.

`sessions` maps each client session to the highest sequence number made
durable, which is what dedupes a message that arrives twice. `runs` is the
run table behind `trackd runs` and behind the RunInfo each sink record
carries. Both are updated only from committed records, in WAL order, so the
ledger always describes exactly a WAL prefix; it is checkpointed with that
position, and at startup rebuilt from the checkpoint plus the WAL after it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack

from trackd.daemon.wal import Position
from trackd.jsonfile import write_atomic
from trackd.protocol import Message
from trackd.sinks.base import RunInfo


class Ledger:
    def __init__(self) -> None:
        self.sessions: dict[str, int] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.position: Position = (0, 0)  # readers may read the WAL up to here
        self.seq = 0  # how many records lie before `position` (wal/ numbers them)
        self._infos: dict[str, RunInfo] = {}

    def apply(self, message: Message) -> None:
        session, seq = message["s"], message["q"]
        if seq > self.sessions.get(session, 0):
            self.sessions[session] = seq
        kind, run_id, body = message["t"], message["r"], message["b"]
        if kind == "run_start":
            run = self.runs.setdefault(run_id, {"rows": 0, "last_step": None})
            run.update(
                id=run_id,
                project=body["project"],
                name=body["name"],
                group=body.get("group"),
                host=body.get("host"),
                pid=body.get("pid"),
                rank=body.get("rank"),
                started=body["started"],
                config=body.get("config", {}),
                tags=body.get("tags", {}),
                status="running",
                ended=None,
                error=None,
            )
            self._infos.pop(run_id, None)
            return
        if kind == "metrics":
            rows = body["rows"]
            self.count_rows(run_id, len(rows), rows[-1][0] if rows else None)
        elif kind == "run_end" and run_id in self.runs:
            self.runs[run_id].update(
                status=body["status"], ended=body["ended"], error=body.get("error")
            )

    def publish(self, position: Position, seq: int) -> None:
        """Let readers past `position`: only once every record before it has been applied."""
        self.seq = seq
        self.position = position

    def count_rows(self, run_id: str, rows: int, last_step: int | None) -> None:
        run = self.runs.get(run_id)
        if run is not None and rows:
            run["rows"] += rows
            run["last_step"] = last_step

    def info(self, run_id: str) -> RunInfo:
        """The RunInfo sinks see; a run whose start was never received gets a placeholder."""
        info = self._infos.get(run_id)
        if info is None:
            run = self.runs.get(run_id)
            if run is None:
                info = RunInfo(id=run_id, project="unknown", name=run_id[:8])
            else:
                info = RunInfo(
                    id=run_id,
                    project=run["project"],
                    name=run["name"],
                    group=run["group"],
                    host=run["host"],
                    pid=run["pid"],
                    rank=run["rank"],
                    started=run["started"],
                    config=run["config"],
                    tags=run["tags"],
                )
                self._infos[run_id] = info
        return info

    def topic(self, run_id: str) -> bytes:
        run = self.runs.get(run_id)
        if run is None:
            return f"unknown/{run_id[:8]}/".encode()
        return f"{run['project']}/{run['name']}/".encode()

    def snapshot(self) -> bytes:
        """The ledger as bytes; taken on the event loop, where it is consistent with `position`."""
        return msgpack.packb(
            {
                "position": list(self.position),
                "sessions": self.sessions,
                "runs": self.runs,
                "saved": time.time(),
            }
        )

    @staticmethod
    def save(snapshot: bytes, path: Path) -> None:
        """Atomically replace the checkpoint file (off the event loop: it fsyncs)."""
        write_atomic(path, snapshot)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        """The checkpoint; ValueError if it cannot be read whole (the caller rebuilds it)."""
        ledger = cls()
        if path.exists():
            try:
                saved = msgpack.unpackb(path.read_bytes())
                position = tuple(saved["position"])
                sessions, runs = saved["sessions"], saved["runs"]
                if (
                    len(position) != 2
                    or not isinstance(sessions, dict)
                    or not isinstance(runs, dict)
                ):
                    raise ValueError("bad fields")
            except Exception as exc:  # msgpack raises ValueError, TypeError and its own
                raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
            ledger.position, ledger.sessions, ledger.runs = position, sessions, runs
        return ledger
