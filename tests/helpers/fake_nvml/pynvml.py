"""Stand-in NVML returning fixed readings: a fake `pynvml` for machines without an NVIDIA
GPU. Put this directory first on PYTHONPATH (or sys.path) and `import pynvml` finds it
instead of nvidia-ml-py.

Two GPUs. GPU 0 reads utilization 37 %, 4 GiB used of 16 GiB, 61 °C, 150 W of a 300 W
limit, SM clock 1410 MHz. GPU 1 reads utilization 5 %, 1 GiB used of 16 GiB, and refuses
its temperature (no permission) and power (not supported), as real boards do.

Per-process GPU memory comes from the JSON file named by `FAKE_NVML_PROCESSES`
({"GPU INDEX": {"PID": BYTES}}), read at every call, so a test can name processes it
started after the daemon; without it, no process holds GPU memory.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

GIB = 1024**3
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1


class NVMLError(Exception):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


_READINGS = [
    {"util": 37, "used": 4 * GIB, "temp": 61, "power": 150_000, "limit": 300_000, "sm": 1410},
    {"util": 5, "used": 1 * GIB, "temp": None, "power": None, "limit": None, "sm": 210},
]
_initialised = False


def nvmlInit() -> None:
    global _initialised
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _initialised = False


def _gpu(handle: int) -> dict[str, int | None]:
    if not _initialised:
        raise NVMLError("Uninitialized")
    return _READINGS[handle]


def nvmlDeviceGetCount() -> int:
    return len(_READINGS)


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return f"Stand-in GPU {handle}"


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=_gpu(handle)["util"], memory=0)


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    used = _gpu(handle)["used"]
    return SimpleNamespace(total=16 * GIB, used=used, free=16 * GIB - (used or 0))


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    value = _gpu(handle)["temp"]
    if value is None or sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError_NoPermission("Insufficient Permissions")
    return value


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    value = _gpu(handle)["power"]
    if value is None:
        raise NVMLError_NotSupported("Not Supported")
    return value


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    value = _gpu(handle)["limit"]
    if value is None:
        raise NVMLError_NotSupported("Not Supported")
    return value


def nvmlDeviceGetClockInfo(handle: int, clock: int) -> int:
    value = _gpu(handle)["sm"]
    assert clock == NVML_CLOCK_SM
    assert value is not None
    return value


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    _gpu(handle)
    path = os.environ.get("FAKE_NVML_PROCESSES")
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle_file:
        held = json.load(handle_file).get(str(handle), {})
    return [SimpleNamespace(pid=int(pid), usedGpuMemory=size) for pid, size in held.items()]


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[SimpleNamespace]:
    _gpu(handle)
    return [SimpleNamespace(pid=1, usedGpuMemory=None)]  # a process NVML may not tell about
