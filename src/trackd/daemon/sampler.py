"""Reading the node, its GPUs and each run's processes: the system sampler's blocking half.

Everything here runs in the sampler's own thread (see `system.py`), never on the
event loop: psutil reads /proc and NVML talks to the driver, either of which can
take milliseconds. The thread owns this object outright; the event loop only
hands it the pids to measure and takes back plain dicts.

Values use trackd's names and units (bytes, percent, watts), flat, as they appear
in the jsonl sink's `system.jsonl`:

* node: `cpu` (% of all cores), `cpu.count`, `memory.used|available|percent`,
  `swap.used|percent`, `disk.used|free|percent` (of the data directory's disk),
  `disk.read_bytes|write_bytes` and `network.sent|recv` (counters since boot);
* GPUs (`nvml.py`): `gpu.I.util|memory.used|memory.total|memory.percent|temp|power|
  power.percent|clock.sm`;
* a run's own processes (its pids, the other ranks of its job on this node, and their
  children): `proc.cpu` (% of one core,
  summed), `proc.rss`, `proc.memory.percent`, `proc.threads`, `proc.count`, and
  `gpu.I.proc.memory`, the
  GPU memory they hold on GPU I.

A value that cannot be read (no permission, a process gone between two samples)
is left out; nothing here raises for the state of the node.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil

from trackd.daemon.nvml import NVML_MODULE, Gpus, open_gpus

log = logging.getLogger("trackd.system")
CHILDREN_RESCAN_SECONDS = 10.0  # how long a new child (a DataLoader worker) may go unmeasured
_MEMORY_TOTAL = psutil.virtual_memory().total
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


class ProcessTree:
    """Who is whose child on the node, read once for every run measured in a round.

    psutil's `Process.children()` walks the whole process table on each call (2-4 ms on
    a node with a hundred processes), so asking it once per run and rank made finding
    children most of the sampler's cost. One pass over `/proc/PID/stat` serves them all.
    """

    def __init__(self) -> None:
        self._children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read()
            except OSError:  # gone since the listing
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            parent = int(fields[fields.rfind(b")") + 2 :].split(maxsplit=2)[1])
            self._children.setdefault(parent, []).append(int(entry.name))

    def children(self, pid: int) -> list[int]:
        return self._children.get(pid, [])

    def descendants(self, pid: int) -> list[int]:
        found, pending = [], list(self.children(pid))
        while pending:
            child = pending.pop()
            found.append(child)
            pending.extend(self.children(child))
        return found


class _RunProcesses:
    """A run's processes, kept between samples: psutil's CPU % is measured since the last call."""

    def __init__(self) -> None:
        self.processes: dict[int, psutil.Process] = {}
        self.primed: set[int] = set()  # measured once: psutil's first CPU % of a process is 0.0

    def refresh(self, roots: Iterable[int], tree: ProcessTree) -> None:
        found: dict[int, psutil.Process] = {}
        for pid in roots:
            try:
                root = self.processes.get(pid) or psutil.Process(pid)
                ranks = [root, *_job_siblings(root, tree)]
            except _GONE:
                continue
            for rank in ranks:
                for member in (rank.pid, *tree.descendants(rank.pid)):
                    known = self.processes.get(member) or found.get(member)
                    try:
                        found[member] = known or psutil.Process(member)
                    except _GONE:
                        continue
        self.processes = found
        self.primed &= set(found)

    def read(self) -> dict[str, float]:
        cpu, rss, threads, alive = 0.0, 0, 0, 0
        measured_cpu = False
        for pid, process in list(self.processes.items()):
            try:
                with process.oneshot():
                    percent = process.cpu_percent()
                    rss += process.memory_info().rss
                    threads += process.num_threads()
            except _GONE:
                del self.processes[pid]
                self.primed.discard(pid)
                continue
            alive += 1
            if pid in self.primed:
                cpu += percent
                measured_cpu = True
            self.primed.add(pid)
        if not alive:
            return {}
        values = {"proc.rss": float(rss), "proc.threads": float(threads)}
        values["proc.count"] = float(alive)
        values["proc.memory.percent"] = 100.0 * rss / _MEMORY_TOTAL
        if measured_cpu:
            values["proc.cpu"] = cpu
        return values


def _job_siblings(root: psutil.Process, tree: ProcessTree) -> list[psutil.Process]:
    """The other ranks of `root`'s distributed job on this node.

    With `ranks="zero"` (the client's default) only rank 0 talks to the daemon, so the
    run's other processes are found here: the processes its launcher (torchrun,
    accelerate) started beside it with the same job identity as the client takes it
    (TORCHELASTIC_RUN_ID, else MASTER_ADDR:MASTER_PORT) and a RANK of their own.
    """
    try:
        environment = root.environ()
        parent = root.parent()
    except _GONE:  # another user's process, or gone: its own readings say so
        return []
    if "RANK" not in environment or parent is None:
        return []
    job = _job(environment)
    siblings = []
    for pid in tree.children(parent.pid):
        if pid == root.pid:
            continue
        try:
            process = psutil.Process(pid)
            other = process.environ()
        except _GONE:
            continue
        if "RANK" in other and _job(other) == job:
            siblings.append(process)
    return siblings


def _job(environment: dict[str, str]) -> str:
    explicit = environment.get("TORCHELASTIC_RUN_ID")
    if explicit and explicit != "none":
        return explicit
    return f"{environment.get('MASTER_ADDR', '')}:{environment.get('MASTER_PORT', '')}"


class NodeSampler:
    """One node's readings per call; owned by a single thread."""

    def __init__(self, data_dir: Path, nvml_module: str = NVML_MODULE) -> None:
        self._data_dir = str(data_dir)
        self._nvml_module = nvml_module
        self._gpus: Gpus | str | None = None
        self._runs: dict[str, _RunProcesses] = {}
        self._scanned = -CHILDREN_RESCAN_SECONDS  # when the process tree was last read
        self.found = ""

    def open(self) -> None:
        """Find what there is to read: said once, in `found`, for `trackd status`."""
        psutil.cpu_percent()  # the first call only starts the measurement
        self._gpus = open_gpus(self._nvml_module)
        gpus = (
            f"{self._gpus.count} ({', '.join(self._gpus.names)})"
            if isinstance(self._gpus, Gpus)
            else self._gpus
        )
        self.found = f"cpus: {psutil.cpu_count()}; gpus: {gpus}"
        log.info("system sampler: %s", self.found)

    def sample(
        self, runs: Mapping[str, list[int]]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The node's values, and per run with a live process its own values (run id -> values)."""
        node = _node(self._data_dir)
        held: dict[int, dict[int, int]] = {}
        if isinstance(self._gpus, Gpus):
            gpu_values, held = self._gpus.read()
            node.update(gpu_values)
        for gone in set(self._runs) - set(runs):
            del self._runs[gone]
        now = time.monotonic()
        if now - self._scanned >= CHILDREN_RESCAN_SECONDS or set(runs) - set(self._runs):
            # A new run, or time to look for new children: every run is looked at in the same
            # round, so that the process table is read once for all of them.
            self._scanned, tree = now, ProcessTree()
            for run_id, pids in runs.items():
                self._runs.setdefault(run_id, _RunProcesses()).refresh(pids, tree)
        per_run: dict[str, dict[str, float]] = {}
        for run_id in runs:
            processes = self._runs[run_id]
            values = processes.read()
            if not values:
                continue  # every process gone: nothing of this run runs here any more
            for index, by_pid in held.items():
                used = [by_pid[pid] for pid in processes.processes if pid in by_pid]
                if used:
                    values[f"gpu.{index}.proc.memory"] = float(sum(used))
            per_run[run_id] = values
        return node, per_run

    def close(self) -> None:
        if isinstance(self._gpus, Gpus):
            self._gpus.close()


def _node(data_dir: str) -> dict[str, float]:
    values: dict[str, float] = {}
    _read(values, lambda: {"cpu": psutil.cpu_percent(), "cpu.count": psutil.cpu_count() or 0})
    _read(values, lambda: _fields("memory", psutil.virtual_memory(), "used available percent"))
    _read(values, lambda: _fields("swap", psutil.swap_memory(), "used percent"))
    _read(values, lambda: _fields("disk", psutil.disk_usage(data_dir), "used free percent"))
    _read(values, lambda: _fields("disk", psutil.disk_io_counters(), "read_bytes write_bytes"))
    _read(values, lambda: _fields("network", psutil.net_io_counters(), "bytes_sent bytes_recv"))
    return values


def _fields(prefix: str, reading: Any, names: str) -> dict[str, float]:
    if reading is None:  # no disks psutil can see (some containers)
        return {}
    return {
        f"{prefix}.{name.removeprefix('bytes_')}": float(getattr(reading, name))
        for name in names.split()
    }


def _read(values: dict[str, float], reader: Callable[[], dict[str, Any]]) -> None:
    try:
        values.update({key: float(value) for key, value in reader().items()})
    except (OSError, RuntimeError) as exc:  # e.g. the data directory's disk gone
        log.debug("system sampler: %s", exc)
