"""What the daemon knows as of the WAL's durable end: sessions and runs.

`sessions` maps each client session to the highest sequence number made
durable, which is what dedupes a message that arrives twice. `runs` is the
run table behind `trackd runs` and behind the RunInfo each sink record
carries. Both are updated only from committed records, in WAL order, so the
ledger always describes exactly a WAL prefix; it is checkpointed with that
position, and at startup rebuilt from the checkpoint plus the WAL after it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgpack

from trackd.daemon.wal import Position
from trackd.protocol import Message
from trackd.sinks.base import RunInfo

RECENT_ALERTS = 20


class Ledger:
    def __init__(self) -> None:
        self.sessions: dict[str, int] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.position: Position = (0, 0)
        self._infos: dict[str, RunInfo] = {}
        # The latest alerts, for `trackd status`: kept in memory only (the WAL holds them all).
        self.alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)

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
            self.count_rows(run_id, len(rows), max(row[0] for row in rows) if rows else None)
        elif kind == "media" and run_id in self.runs:
            self._reach(self.runs[run_id], body["step"])
        elif kind == "alert":
            self.alerts.append({"run": run_id, **body})
        elif kind == "run_end" and run_id in self.runs:
            self.runs[run_id].update(
                status=body["status"], ended=body["ended"], error=body.get("error")
            )

    def count_rows(self, run_id: str, rows: int, last_step: int | None) -> None:
        run = self.runs.get(run_id)
        if run is not None and rows:
            run["rows"] += rows
            self._reach(run, last_step)

    @staticmethod
    def _reach(run: dict[str, Any], step: int | None) -> None:
        """`last_step` is the highest step of anything logged (rows and media), so that a
        resumed run continues after it even if its steps went back or ended on media."""
        if step is not None and (run["last_step"] is None or step > run["last_step"]):
            run["last_step"] = step

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
        # a name of its own per saving thread: the periodic save and the one at shutdown may
        # overlap, and must not rename each other's half-written file
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        with temporary.open("wb") as handle:
            handle.write(snapshot)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        ledger = cls()
        if path.exists():
            saved = msgpack.unpackb(path.read_bytes())
            ledger.position = tuple(saved["position"])
            ledger.sessions = saved["sessions"]
            ledger.runs = saved["runs"]
        return ledger
