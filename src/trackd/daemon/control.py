"""The control socket: status, runs, run, latest, flush, wal and shutdown, each a
MessagePack request."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib.metadata import version
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from trackd.daemon.fanout import Fanout
from trackd.daemon.ingest import Ingest
from trackd.daemon.retention import Retention
from trackd.daemon.settings import Settings
from trackd.daemon.state import StateDamage

log = logging.getLogger("trackd.control")
# From the package's metadata, not `trackd.__version__`: the daemon takes nothing from the
# client's public module (DESIGN's layering).
VERSION = version("trackd")


class Control:
    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        fanout: Fanout,
        retention: Retention,
        shutdown: Callable[[], None],
        system: Callable[[], dict[str, Any]] | None = None,
        damage: StateDamage | None = None,
        pick_up_spools: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.fanout = fanout
        self.retention = retention
        self._shutdown = shutdown
        self._system = system
        self._started = time.time()
        self.damage = damage or StateDamage()
        self._pick_up_spools = pick_up_spools
        self._reader = ingest.wal.reader()  # `tail --since-start`'s cursor

    async def serve(self, socket: zmq.asyncio.Socket) -> None:
        answering: set[asyncio.Task[None]] = set()
        while True:
            parts = await socket.recv_multipart()
            task = asyncio.create_task(self._answer(socket, parts))
            answering.add(task)
            task.add_done_callback(answering.discard)

    async def _answer(self, socket: zmq.asyncio.Socket, parts: list[bytes]) -> None:
        identity, payload = parts[0], parts[-1]
        try:
            request = msgpack.unpackb(payload)
            command = request.get("cmd") if isinstance(request, dict) else None
            if command == "status":
                reply: dict[str, Any] = {"result": self.status()}
            elif command == "runs":
                reply = {"result": self.runs()}
            elif command == "run":
                run = self.ingest.ledger.runs.get(request.get("id"))
                reply = {"result": None if run is None else _run_fields(run)}
            elif command == "latest":  # what init(resume=...) continues
                run = self.ingest.ledger.latest(
                    str(request.get("project")), str(request.get("name"))
                )
                reply = {"result": None if run is None else _run_fields(run)}
            elif command == "flush":
                wait = float(request.get("wait", 30.0))
                if self._pick_up_spools is not None:  # finished clients' spools count too
                    await self._pick_up_spools()
                reply = {"result": await self.fanout.wait_caught_up(wait)}
            elif command == "wal":
                reply = {"result": self.read_wal(request.get("position"), request.get("max_bytes"))}
            elif command == "shutdown":
                self._shutdown()
                reply = {"result": True}
            else:
                reply = {"error": f"cmd: unknown command {command!r}"}
        except (ValueError, TypeError) as exc:
            reply = {"error": f"request: {exc}"}
        except Exception as exc:  # a bug must cost one answer, never the control socket
            log.exception("control: failed to answer")
            reply = {"error": f"internal: {type(exc).__name__}: {exc}"}
        await socket.send_multipart([identity, msgpack.packb(reply, default=str)])

    def status(self) -> dict[str, Any]:
        now = time.time()
        stats = self.ingest.stats
        wal = self.ingest.wal
        runs = self.ingest.ledger.runs.values()
        endpoints = self.settings.endpoints
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime": round(now - self._started, 3),
            "data_dir": str(self.settings.data_dir),
            "endpoints": {
                "ingest": endpoints.ingest,
                "stream": endpoints.stream,
                "control": endpoints.control,
            },
            "ingest": {
                "messages": stats.messages,
                "rows": stats.rows,
                "bytes": stats.bytes,
                "rows_per_second": round(stats.rate(now), 1),
                "duplicates": stats.duplicates,
                "gaps": stats.gaps,
                "blocked": stats.blocked,
                "errors": dict(stats.errors),
                "errors_total": sum(stats.errors.values()),
                "last_error": stats.last_error,
                "ignored_calls": dict(stats.ignored_calls),
            },
            "wal": {
                "bytes": wal.size(),
                "segments": len(wal.segments()),
                "durable_end": list(wal.durable_end),
                "last_error": wal.last_error,
                "max_bytes": self.settings.max_wal_bytes,
                "on_full": self.settings.on_full,
                **wal.damage(),
                **asdict(self.retention.stats),
            },
            "runs": {
                "total": len(self.ingest.ledger.runs),
                "running": sum(1 for run in runs if run.get("status") == "running"),
            },
            "sinks": {worker.spec.name: worker.status() for worker in self.fanout.workers},
            "alerts": [self._alert(alert) for alert in self.ingest.ledger.alerts],
            "system": self._system() if self._system else {"interval": 0, "found": "off"},
            "state": self.damage.status(),
        }

    def _alert(self, alert: dict[str, Any]) -> dict[str, Any]:
        run = self.ingest.ledger.runs.get(alert["run"], {})
        where = {"project": run.get("project"), "name": run.get("name")}
        return {**alert, **where}

    def read_wal(self, position: object, max_bytes: object) -> dict[str, Any]:
        """Durable records from `position` (the WAL's start if nil), for `tail --since-start`."""
        wal, ledger = self.ingest.wal, self.ingest.ledger
        start = (
            (int(position[0]), int(position[1]))
            if isinstance(position, list | tuple) and len(position) == 2
            else wal.start
        )
        limit = min(int(max_bytes), 8 << 20) if isinstance(max_bytes, int) else 1 << 20
        end = ledger.position  # not the WAL's durable end: the ledger must know each run
        records = self._reader.read(max(start, wal.start), end, limit)
        return {
            "records": [
                [list(at), ledger.topic(msgpack.unpackb(frame)["r"]).decode(), frame]
                for at, frame in records
            ],
            "next": list(records[-1][0]) if records else list(max(start, wal.start)),
            "end": list(end),
        }

    def runs(self) -> list[dict[str, Any]]:
        return [_run_fields(run) for run in self.ingest.ledger.runs.values()]


_RUN_FIELDS = (
    "id",
    "project",
    "name",
    "group",
    "status",
    "rows",
    "last_step",
    "started",
    "ended",
    "host",
    "pid",
)


def _run_fields(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run.get(key) for key in _RUN_FIELDS}
