"""How the client's delivery thread paces itself (client/transport.py), and how often the
daemon's fan-out saves a sink's cursor (daemon/fanout.py).

It frames a quiet run only every `IDLE_SECONDS` and at most `PASS_ITEMS` items a
wake-up, rows packed by `log()` itself; these tests pin down what that must never
cost: a flush or finish does not wait for the idle period, and a burst arrives
whole, in order, exactly once, across several messages, with messages and rows
packed late (a CUDA value's) in their places.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import trackd
from conftest import Daemon, wait_for
from trackd.client import registry, transport
from trackd.daemon import fanout

NEVER = 3600.0  # an idle period no test could wait out: only a wake-up can pack


@pytest.fixture(autouse=True)
def _no_run_left_open() -> Iterator[None]:
    yield
    for run in list(registry._open):
        run.finish(timeout=1)


@pytest.fixture
def no_idle_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet run is never packed on a timer: whatever gets delivered, a flush or close woke the
    thread for (its send-again and give-up timers still run every POLL_SECONDS)."""
    monkeypatch.setattr(transport, "IDLE_SECONDS", NEVER)


def metric_rows(daemon: Daemon, project: str) -> list[dict[str, Any]]:
    (path,) = (daemon.data_dir / "runs" / project).glob("*/metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flush_right_after_one_log_is_acked_without_waiting_for_the_idle_period(
    daemon: Daemon, no_idle_pack: None
) -> None:
    daemon.start()
    run = trackd.init(project="pace", name="flush")
    assert run.flush(timeout=60) is True  # run_start
    run.log({"loss": 0.5})
    assert run.flush(timeout=60) is True
    assert daemon.status()["ingest"]["rows"] == 1
    run.log({"loss": 0.25})
    run.finish(timeout=60)
    daemon.flush()
    assert [row["loss"] for row in metric_rows(daemon, "pace")] == [0.5, 0.25]


def test_finish_without_daemon_never_waits_for_the_idle_period(
    daemon: Daemon, dirs: dict[str, Path], no_idle_pack: None
) -> None:
    """Offline, close() must wake the thread to spool the rows; a later daemon gets them all."""
    run = trackd.init(project="pace", name="offline")
    for step in range(300):
        run.log({"i": step})
    run.finish(timeout=0.5)
    (spool,) = (dirs["data"] / "spool").glob("*.spool")
    daemon.start()
    wait_for(lambda: not spool.exists(), timeout=60)
    daemon.flush()
    assert [row["i"] for row in metric_rows(daemon, "pace")] == list(range(300))


def test_a_burst_arrives_whole_and_in_order_across_several_messages(daemon: Daemon) -> None:
    """More rows than one message holds, framed a pass at a time and joined into messages."""
    daemon.start()
    run = trackd.init(project="pace", name="burst")
    assert run.flush(timeout=60) is True
    before = daemon.status()["ingest"]["messages"]
    total = 2 * transport.MAX_ROWS_PER_MESSAGE + transport.PASS_ITEMS // 2 + 7
    for step in range(total):
        run.log({"i": step, "half": step / 2, "flag": step % 3 == 0})
    assert run.flush(timeout=120) is True
    ingest = daemon.status()["ingest"]
    assert ingest["rows"] == total
    assert ingest["messages"] - before >= 3  # MAX_ROWS_PER_MESSAGE still bounds a message
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [row["step"] for row in rows] == list(range(total))
    assert all(row["half"] == row["i"] / 2 and row["flag"] == (row["i"] % 3 == 0) for row in rows)


def test_rows_packed_late_and_messages_among_packed_rows_keep_their_order(
    daemon: Daemon, no_idle_pack: None
) -> None:
    """A row with a CUDA value is packed by the delivery thread, not by `log()`
    (`PendingRow`; made here of plain numbers, as this machine has no GPU), and config,
    alerts and flushes are messages: the thread frames the mix in queue order, with the
    packed rows around them joined into messages as they come."""
    from trackd.client.values import PendingRow

    daemon.start()
    run = trackd.init(project="pace", name="mixed")
    queue_row = run._transport.queue_row  # type: ignore[union-attr]
    steps = []
    for step in range(3 * transport.PASS_ITEMS + 5):
        if step % 1000 == 7:
            queue_row(step, float(step), PendingRow({"i": step, "late": 1.0}))
        else:
            run.log({"i": step}, step=step)
        if step % 1500 == 3:
            run.log_config({f"at{step}": step})
        steps.append(step)
    assert run.flush(timeout=60) is True
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [row["step"] for row in rows] == steps
    assert [row["i"] for row in rows] == steps
    assert [row["step"] for row in rows if "late" in row] == [7, 1007, 2007, 3007, 4007, 5007, 6007]
    (config,) = (daemon.data_dir / "runs" / "pace").glob("*/config.json")
    assert json.loads(config.read_text()) == {f"at{s}": s for s in steps if s % 1500 == 3}


class _FailedKernelEvent:
    """Stands in for the CUDA event behind a value whose kernel failed (this machine has no
    GPU): waiting on it raises, as torch does for an illegal memory access."""

    def synchronize(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_cuda_row_that_cannot_be_read_loses_only_itself(
    daemon: Daemon, no_idle_pack: None
) -> None:
    """A row whose CUDA value fails when the delivery thread reads it is counted and dropped;
    the rows queued around it, in the same pass, keep their steps and values."""
    from trackd.client.values import Pending, PendingRow

    failed = Pending.__new__(Pending)
    failed._event = _FailedKernelEvent()
    failed._host = None
    failed._what = "log(): 'late'"
    daemon.start()
    run = trackd.init(project="pace", name="unreadable")
    sender = run._transport
    assert sender is not None
    for step in range(20):
        if step == 7:
            sender.queue_row(step, float(step), PendingRow({"i": step, "late": failed}))
        else:
            run.log({"i": step}, step=step)
    assert run.flush(timeout=60) is True
    assert sender.errors == {
        "a row at step 7 was dropped: CUDA error: an illegal memory access was encountered": 1
    }
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [(row["step"], row["i"]) for row in rows] == [(s, s) for s in range(20) if s != 7]


class _Unexpected(Exception):
    """An error the delivery thread does not expect (it logs it and goes on to the spool)."""


def test_a_pass_takes_whole_rows_and_a_failed_one_loses_only_its_own(tmp_path: Path) -> None:
    """A row waits as two items, its (step, time) and its dict: a pass whose item limit
    falls between them takes both, so a pass that fails loses whole rows, and the rows
    queued after it keep their own steps."""
    sender = transport.Transport(
        run_id="f" * 32,
        session="s",
        endpoint=None,
        spool_dir=str(tmp_path),
    )
    sender.close(timeout=0)  # its thread is gone: this test frames by hand
    framed: list[list[Any]] = []
    calls = iter(range(100))

    def add_rows(data: bytes, rows: int) -> None:
        if next(calls) == 3:
            raise _Unexpected
        framed.append(msgpack.unpackb(data))

    sender._add_rows = add_rows  # type: ignore[method-assign]
    for step in range(8):
        sender.queue_row(step, float(step), {"i": step})
    assert sender._pack_queue(limit=3) == (2, 4)  # the 3rd item is row 1's stamp: its dict too
    with pytest.raises(_Unexpected):
        sender._pack_queue(limit=3)  # rows 2 and 3; framing row 3 fails
    assert sender._pack_queue() == (4, 8)
    assert [(step, values["i"]) for step, _, values in framed] == [
        (step, step) for step in range(8) if step != 3
    ]


def test_a_dict_the_caller_reuses_is_delivered_as_it_was_at_each_log(
    daemon: Daemon, no_idle_pack: None
) -> None:
    """`log()` keeps no reference to the caller's dict, whether it queues a copy (the
    delivery thread keeping up) or packs it (a flood): a training loop that updates one
    dict in place and logs it each step gets each step's values."""
    daemon.start()
    run = trackd.init(project="pace", name="reuse")
    values = {"i": -1, "x": 0.0}
    total = 3 * transport.CALLER_PACKS_AT + 1000
    for step in range(total):
        values["i"] = step
        values["x"] = step / 4
        run.log(values, step=step)
    values["i"] = -2
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [(row["i"], row["x"]) for row in rows] == [(s, s / 4) for s in range(total)]


def test_a_flush_after_a_flood_covers_the_rows_still_in_the_callers_open_batch(
    daemon: Daemon, no_idle_pack: None
) -> None:
    """A flooding `log()` joins its rows `CHUNK_ROWS` at a time, behind the queue: a flush,
    anything else queued (here a row with a CUDA value) or the thread's next wake-up closes
    the open batch first, so nothing overtakes a row logged before it and a flush that
    returns covers every one; a wake-up that meets a trickle ends the flood, and the caller
    queues dicts again, behind the flood's last rows."""
    from trackd.client.values import PendingRow

    daemon.start()
    run = trackd.init(project="pace", name="batch")
    assert run.flush(timeout=60) is True
    sender = run._transport
    assert sender is not None
    flood = transport.CALLER_PACKS_AT + 10 * transport.CHUNK_ROWS + 5  # the last 5: batched
    for step in range(flood):
        run.log({"i": step})
    assert sender._flooding
    assert len(sender._batch) == 5
    sender.queue_row(flood, 0.0, PendingRow({"i": flood, "late": 1.0}))
    assert run.flush(timeout=60) is True
    assert daemon.status()["ingest"]["rows"] == flood + 1
    run.log({"i": flood + 1}, step=flood + 1)
    assert run.flush(timeout=60) is True  # this wake-up framed one row: the flood is over
    assert not sender._flooding
    run.log({"i": flood + 2})
    assert sender.queue
    assert type(sender.queue[-1]) is dict
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [row["i"] for row in rows] == list(range(flood + 3))
    assert [row["step"] for row in rows] == list(range(flood + 3))


def test_a_flood_of_rows_too_large_to_share_a_frame_is_framed_row_by_row(
    daemon: Daemon, no_idle_pack: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is joined by row count alone; rows that together outgrow a frame are split
    apart again by the thread, and a row over the cap alone is counted and dropped, alone."""
    monkeypatch.setattr(transport, "MAX_FRAME_BYTES", 64 * 1024)  # the client's cap only
    daemon.start()
    run = trackd.init(project="pace", name="large")
    assert run.flush(timeout=60) is True
    wide = {f"metric_{k:04d}": float(k) for k in range(200)}  # ~3.6 KB packed
    total = transport.CALLER_PACKS_AT + 2 * transport.CHUNK_ROWS
    too_wide = transport.CALLER_PACKS_AT + transport.CHUNK_ROWS + 3
    for step in range(total):
        if step == too_wide:
            run.log({f"w{k}": 1.0 for k in range(10_000)})  # ~140 KB: over the cap alone
        else:
            run.log({**wide, "i": step})
    assert run.flush(timeout=60) is True
    sender = run._transport
    assert sender is not None
    assert sender.errors == {f"a row at step {too_wide} is over the 65536-byte frame cap": 1}
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [row["i"] for row in rows] == [s for s in range(total) if s != too_wide]
    assert all(row["metric_0199"] == 199.0 for row in rows)


def test_rows_waiting_for_the_delivery_thread_give_the_garbage_collector_nothing_to_track(
    daemon: Daemon, no_idle_pack: None
) -> None:
    """A collection finds nothing to keep among the queued rows (a dict of numbers is never
    tracked, a (step, time) stamp is untracked by the first collection): in a log() flood,
    tracked rows were promoted to the oldest generation by the ten thousand and brought full
    collections, stalls of every thread."""
    daemon.start()
    run = trackd.init(project="pace", name="untracked")
    assert run.flush(timeout=60) is True
    total = 5000
    gc.collect()
    tracked_before = len(gc.get_objects())
    for step in range(total):
        run.log({"loss": 1 / (step + 1), "epoch": step // 100, "best": step % 7 == 0})
    sender = run._transport
    assert sender is not None
    assert sender.queue  # rows wait (the thread packs them at a flush or its next wake-up)
    gc.collect(0)  # the young collection a training loop's allocations bring
    assert len(gc.get_objects()) - tracked_before < total // 50
    run.finish(timeout=60)
    daemon.flush()
    rows = metric_rows(daemon, "pace")
    assert [row["step"] for row in rows] == list(range(total))
    assert all(
        row["loss"] == 1 / (row["step"] + 1)
        and row["epoch"] == row["step"] // 100
        and row["best"] == (row["step"] % 7 == 0)
        and set(row) == {"step", "ts", "loss", "epoch", "best"}
        for row in rows
    )


@pytest.mark.parametrize(
    ("elapsed", "delivered", "due"),
    [
        (0.4, 10_000, False),  # a stream, but within checkpoint_seconds
        (0.5, fanout.TRICKLE_RECORDS, True),  # a stream: every checkpoint_seconds
        (0.5, fanout.TRICKLE_RECORDS - 1, False),  # a trickle waits ...
        (fanout.TRICKLE_SAVE_SECONDS - 0.1, 1, False),
        (fanout.TRICKLE_SAVE_SECONDS, 1, True),  # ... TRICKLE_SAVE_SECONDS
        (fanout.TRICKLE_SAVE_SECONDS, 0, True),  # the first save after a start
    ],
)
def test_a_sink_saves_its_cursor_often_in_a_stream_and_seldom_in_a_trickle(
    elapsed: float, delivered: int, due: bool
) -> None:
    """The daemon's own fan-out: a save fsyncs the sink's files, so a daemon sampling a few
    runs a second would spend most of its sampling cost on saves every half second."""
    assert fanout.save_due(elapsed, delivered, checkpoint_seconds=0.5) is due


def test_a_checkpoint_interval_longer_than_the_trickles_is_kept() -> None:
    assert not fanout.save_due(fanout.TRICKLE_SAVE_SECONDS, 1, checkpoint_seconds=30.0)
    assert fanout.save_due(30.0, 1, checkpoint_seconds=30.0)
