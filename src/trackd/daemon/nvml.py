"""NVIDIA GPUs through NVML (`nvidia-ml-py`), read by the system sampler's thread.

`nvidia-ml-py` is imported here only, when the sampler first reads GPUs, never at
daemon import. A node without the library, the driver or a GPU gets `open_gpus`
returning the reason instead of a reader; a field the driver refuses (no
permission, not supported on this board) is left out of the sample, never raised.

Every value is in trackd's own units (bytes, watts, percent, degrees Celsius, MHz),
under `gpu.I.NAME`; each sink renames them to its backend's names.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

NVML_MODULE = "pynvml"  # the module nvidia-ml-py installs


class Gpus:
    """The node's GPUs, read with an initialised NVML module."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        self.count = int(nvml.nvmlDeviceGetCount())
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.count)]
        self.names = [_text(self._read(nvml.nvmlDeviceGetName, h)) for h in self._handles]

    def read(self) -> tuple[dict[str, float], dict[int, dict[int, int]]]:
        """The GPUs' readings, and per GPU index the memory each process holds on it."""
        nvml, values = self._nvml, {}
        held: dict[int, dict[int, int]] = {}
        for index, handle in enumerate(self._handles):
            prefix = f"gpu.{index}."
            utilization = self._read(nvml.nvmlDeviceGetUtilizationRates, handle)
            if utilization is not None:
                values[prefix + "util"] = float(utilization.gpu)
            memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None and memory.total:
                values[prefix + "memory.used"] = float(memory.used)
                values[prefix + "memory.total"] = float(memory.total)
                values[prefix + "memory.percent"] = 100.0 * memory.used / memory.total
            temperature = self._read(
                nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            )
            if temperature is not None:
                values[prefix + "temp"] = float(temperature)
            power = self._read(nvml.nvmlDeviceGetPowerUsage, handle)  # milliwatts
            if power is not None:
                values[prefix + "power"] = power / 1000.0
                limit = self._read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
                if limit:
                    values[prefix + "power.percent"] = 100.0 * power / limit
            clock = self._read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
            if clock is not None:
                values[prefix + "clock.sm"] = float(clock)
            held[index] = {
                **self._processes(nvml.nvmlDeviceGetGraphicsRunningProcesses, handle),
                **self._processes(nvml.nvmlDeviceGetComputeRunningProcesses, handle),
            }
        return values, held

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):  # a driver gone: nothing to release
            self._nvml.nvmlShutdown()

    def _processes(self, function: Callable[..., Any], handle: Any) -> dict[int, int]:
        """pid -> bytes held; NVML gives None where it may not tell (no permission, MIG)."""
        processes: Iterable[Any] = self._read(function, handle) or ()
        return {
            int(process.pid): int(process.usedGpuMemory)
            for process in processes
            if getattr(process, "usedGpuMemory", None) is not None
        }

    def _read(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except self._nvml.NVMLError:  # not supported, no permission, GPU lost: leave it out
            return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def open_gpus(module: str = NVML_MODULE) -> Gpus | str:
    """The GPUs, or one line saying why there are none (shown once by `trackd status`)."""
    try:
        nvml = importlib.import_module(module)
    except ImportError:
        return "none (NVML: nvidia-ml-py is not installed)"
    try:
        nvml.nvmlInit()
        gpus = Gpus(nvml)
    except nvml.NVMLError as exc:
        reason = "driver not found" if "Not Found" in str(exc) else str(exc)
        return f"none (NVML: {reason})"
    if not gpus.count:
        return "none (NVML: no GPU on this node)"
    return gpus
