"""The daemon's asyncio pieces (ingest, fan-out, delivery, control) in-process, on a real WAL in a
temporary directory, delivering into `trackd.testing.InMemorySink`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from conftest import until
from trackd.daemon.batcher import Batcher
from trackd.daemon.control import Control
from trackd.daemon.delivery import Backoff, Delivery
from trackd.daemon.fanout import Fanout, SinkWorker
from trackd.daemon.ingest import Ingest
from trackd.daemon.ledger import Ledger
from trackd.daemon.retention import Retention
from trackd.daemon.server import on_loop
from trackd.daemon.settings import Settings
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import encode
from trackd.sinks.base import SinkSpec
from trackd.testing import InMemorySink

pytestmark = pytest.mark.asyncio


@dataclass
class Core:
    """One daemon's core without its sockets: WAL, ledger, ingest, one in-memory sink."""

    wal: WriteAheadLog
    ledger: Ledger
    ingest: Ingest
    fanout: Fanout
    sink: InMemorySink
    acks: list[bytes]

    def send(self, message: dict[str, Any]) -> None:
        assert self.ingest.receive(encode(message), self.acks.append)


@pytest_asyncio.fixture
async def core(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Core]:
    wal = WriteAheadLog(tmp_path / "wal")
    ledger = Ledger()
    ledger.publish(wal.durable_end, wal.durable_seq)
    spec = SinkSpec("memory", request.node.name, {})
    sink = InMemorySink(spec.target)
    delivery = Delivery(spec, sink, tmp_path / "deadletter.jsonl", Backoff(0.01, 0.1))
    worker = SinkWorker(delivery, Batcher(wal, ledger), tmp_path / "sink", 0.0, 60.0)
    fanout = Fanout([worker])
    ingest = Ingest(wal, ledger, lambda topic, frame, at: None, fanout.wake)
    yield Core(wal, ledger, ingest, fanout, sink, [])
    await fanout.drain(ledger.position, timeout=10)
    wal.close()


def run_start(seq: int, run: str = "r1") -> dict[str, Any]:
    body = {"project": "p", "name": "n", "started": time.time()}
    return {"v": 1, "s": "s1", "q": seq, "t": "run_start", "r": run, "b": body}


def metrics(seq: int, step: int, run: str = "r1") -> dict[str, Any]:
    rows = [[step, time.time(), {"loss": 1.0 / (step + 1)}]]
    return {"v": 1, "s": "s1", "q": seq, "t": "metrics", "r": run, "b": {"rows": rows}}


async def test_a_sink_never_reads_a_record_before_the_ledger_knows_its_run(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced interleaving: a commit has landed in the WAL (its durable end moved), the event
    loop has not applied it to the ledger yet, and the sink worker looks. It must find
    nothing to read; once the ledger has the commit, every record carries its run's project.
    Before issue 12 the worker read up to the WAL's durable end and delivered the run under
    the placeholder project "unknown"."""
    held: list[tuple[Any, ...]] = []
    apply_commit = core.ingest._committed
    monkeypatch.setattr(core.ingest, "_committed", lambda *commit: held.append(commit))
    core.ingest.start()
    core.fanout.start()
    core.send(run_start(1))
    core.send(metrics(2, 0))
    await until(lambda: len(held) == 2 or (held and core.wal.durable_seq == 2))
    assert core.wal.durable_end > core.ledger.position  # committed, not yet applied
    worker = core.fanout.workers[0]
    core.fanout.wake()  # as another commit or a linger timeout would
    await until(lambda: worker.caught_up)
    assert core.sink.records() == [], "read past what the ledger has applied"

    for commit in held:
        apply_commit(*commit)
    await until(lambda: len(core.sink.records()) == 2)
    assert [(r.type, r.run.project, r.run.name) for r in core.sink.records()] == [
        ("run_start", "p", "n"),
        ("metrics", "p", "n"),
    ]
    await until(lambda: worker.status()["lag_records"] == 0)  # the cursor follows the store


async def test_lag_in_records_is_counted_across_segments_and_restarts(
    core: Core, tmp_path: Path
) -> None:
    """Records are numbered as they commit, so lag in records is a subtraction: checked
    against what was sent, over several segments, while the sink is held and after."""
    core.wal.segment_bytes = 300  # a segment every few records
    worker = core.fanout.workers[0]
    core.ingest.start()
    for seq in range(1, 41):
        core.send(metrics(seq, seq) if seq > 1 else run_start(seq))
        await until(lambda seq=seq: core.ledger.seq == seq)  # one commit each
    assert len(core.wal.segments()) > 5
    assert worker.status()["lag_records"] == 40  # the worker has not started
    core.fanout.start()
    await until(lambda: len(core.sink.records()) == 40)
    # The sink stores a batch on its thread; the worker moves its cursor past it once the
    # event loop takes the result, a moment later.
    await until(lambda: worker.status()["lag_records"] == 0)
    core.wal.close()

    reopened = WriteAheadLog(tmp_path / "wal", segment_bytes=300)
    assert reopened.durable_seq == 40
    assert [reopened.seq_at(position) for position in _positions(reopened)] == list(range(1, 41))


def _positions(wal: WriteAheadLog) -> list[Position]:
    return [position for position, _ in wal.scan(wal.start)]


async def test_retention_gets_its_ledger_snapshot_from_the_event_loop(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention runs in a worker thread; the snapshot it saves is taken by the ledger's owner
    (the event loop), where the ledger matches its position. It used to be taken in the
    worker thread, while the loop applied commits."""
    takers: list[int] = []
    snapshot = core.ledger.snapshot

    def recorded() -> bytes:
        takers.append(threading.get_ident())
        return snapshot()

    monkeypatch.setattr(core.ledger, "snapshot", recorded)
    core.ingest.start()
    core.send(run_start(1))
    await until(lambda: core.ledger.seq == 1)
    loop = asyncio.get_running_loop()
    taken = await asyncio.to_thread(on_loop, core.ledger.snapshot, loop)
    assert takers == [threading.get_ident()]
    assert msgpack.unpackb(taken)["position"] == list(core.ledger.position)


async def test_control_answers_from_what_the_ledger_has_applied(
    core: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` and the `wal` command (behind `tail --since-start`) in-process: the WAL read
    stops at the ledger's published end, so every record it returns has its run's topic."""
    held: list[tuple[Any, ...]] = []
    apply_commit = core.ingest._committed
    monkeypatch.setattr(core.ingest, "_committed", lambda *commit: held.append(commit))
    settings = Settings(data_dir=tmp_path, runtime_dir=tmp_path / "rt")
    retention = Retention(core.wal, core.fanout, lambda: None, 3600.0, 0, "block")
    control = Control(settings, core.ingest, core.fanout, retention, lambda: None)
    core.ingest.start()
    core.send(run_start(1))
    core.send(metrics(2, 0))
    await until(lambda: core.wal.durable_seq == 2)
    assert control.read_wal(None, None)["records"] == []  # committed, not yet applied
    for commit in held:
        apply_commit(*commit)
    answer = control.read_wal(None, None)
    assert [topic for _, topic, _ in answer["records"]] == ["p/n/", "p/n/"]
    status = control.status()
    (sink,) = status["sinks"].values()
    assert sink["lag_records"] == 2  # the worker was never started
    assert status["state"] == {"unreadable_files": 0, "last_error": None}
    assert status["ingest"]["messages"] == 2
