"""System metrics: every `system_interval` seconds, one `system` message per running run.

Who owns what:

* the **event loop** (this module's `SystemMetrics.run` task) picks the runs to
  measure from the run table (running runs, with the pids of their ranks on this
  node), and turns a finished reading into messages handed to ingest like any
  client's (valid as built, so not decoded again): deduplicated, appended to the WAL
  and acked once durable;
* the **sampler thread** (a one-thread executor of its own) owns the
  `NodeSampler`: psutil and NVML calls, which can take milliseconds, happen only
  there, so client acks never wait on a sample.

A message carries the node's counters since boot (`sampler.COUNTERS`) and, as
`since`, their values at the run's first sample: every sink but JSONL's
subtracts them, since wandb's and MLflow's own monitors count from the run's
start. The first sample's values are the run's for good: the ledger keeps them
from the WAL, so a daemon restarted mid-run goes on from the same start.

The messages carry a session id of their own per daemon start, with sequence
numbers from 1, so they are durable, replayable and tailable as any message is;
a daemon restart starts a new session. A sample turned away because the WAL is
full is dropped (counted), and its sequence number is used again, so that the
session has no gap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from trackd.daemon.sampler import COUNTERS, NodeSampler
from trackd.protocol import VERSION

log = logging.getLogger("trackd.system")
Receive = Callable[[dict[str, Any], Callable[[bytes], None] | None], bool]


def node_name() -> str:
    """The host name, as the client puts it in run_start: samples are keyed by it."""
    return os.uname().nodename


def local_pids(run: Mapping[str, Any], node: str) -> list[int]:
    """The run's processes on this node: its first process and every rank that joined it."""
    ranks = [[run.get("host"), run.get("pid")], *run.get("ranks", ())]
    return [pid for host, pid in ranks if isinstance(pid, int) and host in (node, None)]


class SystemMetrics:
    def __init__(
        self,
        interval: float,
        sampler: NodeSampler,
        runs: Callable[[], Mapping[str, Mapping[str, Any]]],
        receive: Receive,
    ) -> None:
        self.interval = interval
        self.node = node_name()
        self._sampler = sampler
        self._runs = runs
        self._receive = receive
        self._session = f"system-{uuid.uuid4().hex}"
        self._seq = 0
        self._ts_by_seq: dict[int, float] = {}
        self.acked = 0
        self.acked_ts: float | None = None
        self.dropped = 0
        self.errors = 0
        self.cpu_seconds = 0.0  # the sampler thread's own, summed over its samples
        self.latest: dict[str, Any] | None = None
        # each running run's counters at its first sample (the ledger's `system_base` once
        # that sample is applied; kept here too, as the next sample may come before)
        self._bases: dict[str, dict[str, float]] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        thread = ThreadPoolExecutor(1, thread_name_prefix="trackd-system")
        try:
            await loop.run_in_executor(thread, self._sampler.open)
            due = loop.time()
            while True:
                due += self.interval
                await asyncio.sleep(max(0.0, due - loop.time()))
                due = max(due, loop.time() - self.interval)  # after a stall, do not catch up
                targets = {
                    run_id: pids
                    for run_id, run in list(self._runs().items())
                    if run.get("status") == "running" and (pids := local_pids(run, self.node))
                }
                try:
                    ts = time.time()
                    node, per_run = await loop.run_in_executor(thread, self._sample, targets)
                    self.latest = {"ts": ts, "node": self.node, "values": node}
                    runs = self._runs()
                    self._bases = {
                        run_id: self._base(runs.get(run_id, {}), node, run_id) for run_id in per_run
                    }
                    for run_id, own in per_run.items():
                        self._send(run_id, ts, {**node, **own}, self._bases[run_id])
                except Exception:  # a bug must cost one sample, never the sampler
                    self.errors += 1
                    if self.errors == 1:
                        log.exception("system sampler: a sample failed")
        finally:
            thread.submit(self._sampler.close)
            thread.shutdown(wait=False)  # the close above still runs: NVML is released

    def _sample(
        self, targets: Mapping[str, list[int]]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """In the sampler thread: one reading, its CPU time counted for `trackd status`."""
        started = time.thread_time()
        try:
            return self._sampler.sample(targets)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _base(
        self, run: Mapping[str, Any], node: dict[str, float], run_id: str
    ) -> dict[str, float]:
        """The run's counters at its first sample: known, or this sample's."""
        known = self._bases.get(run_id) or run.get("system_base")
        return known or {key: node[key] for key in COUNTERS if key in node}

    def _send(
        self, run_id: str, ts: float, values: dict[str, float], since: dict[str, float]
    ) -> None:
        self._seq += 1
        message = {
            "v": VERSION,
            "s": self._session,
            "q": self._seq,
            "t": "system",
            "r": run_id,
            "b": {"ts": ts, "node": self.node, "values": values, "since": since},
        }
        if self._receive(message, self._acked):
            self._ts_by_seq[self._seq] = ts
        else:
            self._seq -= 1  # not taken (the WAL is full): the number is used again
            self.dropped += 1

    def _acked(self, reply: bytes) -> None:
        answer = msgpack.unpackb(reply)
        if answer.get("t") == "ack" and answer["q"] > self.acked:
            self.acked = answer["q"]
            for seq in [seq for seq in self._ts_by_seq if seq <= self.acked]:
                self.acked_ts = self._ts_by_seq.pop(seq)

    def status(self) -> dict[str, Any]:
        """`trackd status`: what the sampler found, how many samples are durable, the latest."""
        return {
            "interval": self.interval,
            "node": self.node,
            "found": self._sampler.found,
            "samples": self.acked,
            "acked_ts": self.acked_ts,
            "dropped": self.dropped,
            "errors": self.errors,
            "cpu_seconds": round(self.cpu_seconds, 6),
            "latest": self.latest,
        }
