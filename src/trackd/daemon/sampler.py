"""Reading the node, its GPUs and each run's processes: the system sampler's blocking half.

Everything here runs in the sampler's own thread (see `system.py`), never on the
event loop: psutil reads /proc and NVML talks to the driver, either of which can
take milliseconds. The thread owns this object outright; the event loop only
hands it the pids to measure and takes back plain dicts.

Values use trackd's names and units (bytes, percent, watts), flat, as they appear
in the jsonl sink's `system.jsonl`:

* node: `cpu` (% of all cores), `cpu.count`, `memory.used|available|percent`,
  `swap.used|percent`, `disk.used|free|percent` (of the data directory's disk),
  `disk.read_bytes|write_bytes` and `network.sent|recv` (`COUNTERS`: since boot; a
  `system` message also carries, as `since`, their values at the run's first sample);
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
# Totals since boot, which the peers' own monitors (wandb, MLflow) report from the run's
# start: a sample carries them as they are, and beside them where the run started from.
COUNTERS = ("disk.read_bytes", "disk.write_bytes", "network.sent", "network.recv")
CHILDREN_RESCAN_SECONDS = 10.0  # how long a new child (a DataLoader worker) may go unmeasured
_MEMORY_TOTAL = psutil.virtual_memory().total
_CPU_COUNT = psutil.cpu_count() or 0
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def _stat(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name, from the state on (field 3).

    One read serves everything measured of a process in a round: its parent, CPU time,
    thread count, resident pages and start time (psutil reads three files for the same).
    Raises OSError once the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read()
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return fields[fields.rfind(b")") + 2 :].split()


# Indexes into `_stat`'s fields (proc(5)'s field numbers minus 3).
_STATE, _PPID, _UTIME, _STIME, _THREADS, _STARTTIME, _RSS = 0, 1, 11, 12, 17, 19, 21
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


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
                parent = int(_stat(entry.name)[_PPID])
            except OSError:  # gone since the listing
                continue
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
    """A run's processes, kept between samples: CPU % is measured since the last sample.

    Each process is known by its pid and start time, so a pid the kernel gave to a new
    process is not taken for the old one. Read from `/proc/PID/stat` once per process a
    round (CPU ticks, threads, resident pages), as psutil computes them from the same
    fields: at a 1 s interval the per-process reads were a tenth of the daemon's cost.
    """

    def __init__(self) -> None:
        self.processes: dict[int, bytes] = {}  # pid -> start time
        self._last: dict[int, tuple[bytes, int, float]] = {}  # pid -> (start, CPU ticks, when)

    def refresh(self, roots: Iterable[int], tree: ProcessTree) -> None:
        found: dict[int, bytes] = {}
        for pid in roots:
            try:
                ranks = [pid, *_job_siblings(psutil.Process(pid), tree)]
            except _GONE:
                continue
            for rank in ranks:
                for member in (rank, *tree.descendants(rank)):
                    try:
                        found[member] = _stat(member)[_STARTTIME]
                    except OSError:
                        continue
        self.processes = found
        self._last = {pid: last for pid, last in self._last.items() if found.get(pid) == last[0]}

    def read(self) -> dict[str, float]:
        cpu, rss, threads, alive = 0.0, 0, 0, 0
        measured_cpu = False
        now = time.monotonic()
        for pid, started in list(self.processes.items()):
            try:
                fields = _stat(pid)
            except OSError:
                fields = []
            if not fields or fields[_STATE] == b"Z" or fields[_STARTTIME] != started:
                # gone (exited, if not yet reaped), or its pid given to another process
                del self.processes[pid]
                continue
            alive += 1
            rss += int(fields[_RSS]) * _PAGE
            threads += int(fields[_THREADS])
            ticks = int(fields[_UTIME]) + int(fields[_STIME])
            last = self._last.get(pid)
            if last is not None and now > last[2]:
                cpu += 100.0 * (ticks - last[1]) / _TICKS / (now - last[2])
                measured_cpu = True
            self._last[pid] = (started, ticks, now)
        if not alive:
            return {}
        values = {"proc.rss": float(rss), "proc.threads": float(threads)}
        values["proc.count"] = float(alive)
        values["proc.memory.percent"] = 100.0 * rss / _MEMORY_TOTAL
        if measured_cpu:
            values["proc.cpu"] = cpu
        return values


def _job_siblings(root: psutil.Process, tree: ProcessTree) -> list[int]:
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
            other = psutil.Process(pid).environ()
        except _GONE:
            continue
        if "RANK" in other and _job(other) == job:
            siblings.append(pid)
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
    _read(values, lambda: {"cpu": psutil.cpu_percent(), "cpu.count": _CPU_COUNT})
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
