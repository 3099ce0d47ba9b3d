"""What the daemon knows as of the WAL's durable end: sessions and runs.

`sessions` maps each client session to the highest sequence number made
durable, which is what dedupes a message that arrives twice. `runs` is the
run table behind `trackd runs` and behind the RunInfo each sink record
carries. Both are updated only from committed records, in WAL order, so the
ledger always describes exactly a WAL prefix; it is checkpointed with that
position, and at startup rebuilt from the checkpoint plus the WAL after it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgpack

from trackd.daemon.wal import Position
from trackd.jsonfile import write_atomic
from trackd.protocol import Message
from trackd.sinks.base import RunInfo

RECENT_ALERTS = 20
log = logging.getLogger("trackd.ledger")


class Ledger:
    def __init__(self) -> None:
        self.sessions: dict[str, int] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.position: Position = (0, 0)  # readers may read the WAL up to here
        self.seq = 0  # how many records lie before `position` (wal/ numbers them)
        self._infos: dict[str, RunInfo] = {}
        # The latest alerts, for `trackd status`: kept in memory only (the WAL holds them all).
        self.alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        # A resume the client could not resolve (offline, or no daemon at init): its
        # provisional run id -> (the run it continues, the shift of its steps).
        self.aliases: dict[str, tuple[str, int]] = {}

    def latest(
        self, project: str, name: str, other_than: str | None = None
    ) -> dict[str, Any] | None:
        """The latest started run of this project and name: what a resume continues."""
        found = [
            run
            for run_id, run in self.runs.items()
            if run.get("project") == project and run.get("name") == name and run_id != other_than
        ]
        return max(found, key=lambda run: run.get("started") or 0.0, default=None)

    def resolve(self, message: Message) -> Message:
        """The message as it is to be stored: a session whose resume is still open (its
        run_start has `resolve`) continues the latest run of its project and name.

        That run is found when the run_start arrives (from the live socket, a spool or a
        replay) and from then on every message of the provisional run id is stored under
        the resumed run's id, its steps shifted past the resumed run's highest step, as
        the client would have numbered them had it known. The rewritten run_start keeps
        the provisional id (`alias`) and the shift (`step_offset`), so the mapping is
        rebuilt from the WAL after a crash. With no such run the session is a new run.
        """
        run_id, body = message["r"], message["b"]
        alias = self.aliases.get(run_id)
        if alias is None and message["t"] == "run_start" and body.get("resolve"):
            target = self.latest(body["project"], body["name"], other_than=run_id)
            if target is None:
                log.warning(
                    "resume=%r of %s/%s: no such run; started a new one",
                    body.get("resume"),
                    body["project"],
                    body["name"],
                )
                return message
            last = target.get("last_step")
            alias = self.aliases[run_id] = (target["id"], 0 if last is None else last + 1)
        if alias is None:
            return message
        return _rewritten(message, run_id, *alias)

    def apply(self, message: Message) -> None:
        session, seq = message["s"], message["q"]
        if seq > self.sessions.get(session, 0):
            self.sessions[session] = seq
        kind, run_id, body = message["t"], message["r"], message["b"]
        if kind == "run_start":
            if body.get("alias"):
                self.aliases[body["alias"]] = (run_id, int(body.get("step_offset") or 0))
            run = self.runs.setdefault(run_id, {"rows": 0, "last_step": None})
            run.update(
                id=run_id,
                project=body["project"],
                name=body["name"],
                group=body.get("group"),
                host=body.get("host"),
                pid=body.get("pid"),
                rank=body.get("rank"),
                local_rank=body.get("local_rank"),
                world_size=body.get("world_size"),
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
        elif kind == "system" and run_id in self.runs and body.get("since"):
            # the run's counters at its first sample (see `daemon.system`): for good
            self.runs[run_id].setdefault("system_base", body["since"])
        elif kind == "alert":
            self.alerts.append({"run": run_id, **body})
        elif kind == "joined" and run_id in self.runs and "pid" in body:
            # another rank's process: the system sampler measures every rank on its node
            ranks = self.runs[run_id].setdefault("ranks", [])
            if [body.get("host"), body["pid"]] not in ranks:  # a forked child joins as its parent
                ranks.append([body.get("host"), body["pid"]])
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
                    local_rank=run.get("local_rank"),  # absent from a ledger saved before
                    world_size=run.get("world_size"),
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
                "aliases": self.aliases,
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
                aliases = {
                    alias: (str(target), int(offset))
                    for alias, (target, offset) in saved.get("aliases", {}).items()
                }
                if (
                    len(position) != 2
                    or not isinstance(sessions, dict)
                    or not isinstance(runs, dict)
                ):
                    raise ValueError("bad fields")
            except Exception as exc:  # msgpack raises ValueError, TypeError and its own
                raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
            ledger.position, ledger.sessions, ledger.runs = position, sessions, runs
            ledger.aliases = aliases
        return ledger


def _rewritten(message: Message, alias: str, target: str, offset: int) -> Message:
    kind, body = message["t"], message["b"]
    if kind == "run_start":
        body = {**body, "resolve": False, "alias": alias, "step_offset": offset}
    elif kind == "metrics" and offset:
        body = {"rows": [[step + offset, ts, values] for step, ts, values in body["rows"]]}
    elif kind == "media" and offset:
        body = {**body, "step": body["step"] + offset}
    return {**message, "r": target, "b": body}
