"""GPU state from NVML where a GPU exists; ``None`` on a CPU machine (not an error)."""

from __future__ import annotations

import logging

from shared.messages import GpuStats

log = logging.getLogger(__name__)


class Gpu:
    def __init__(self, device: str):
        self.index: int | None = None
        if not device.startswith("cuda:"):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.index = int(device.split(":", 1)[1])
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # NVMLError_LibraryNotFound on machines without a driver
            log.info("no GPU reported by NVML for %s (%s)", device, exc)
            self.index = None

    @property
    def present(self) -> bool:
        return self.index is not None

    def total_bytes(self) -> int | None:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total) if self.present else None

    def stats(self) -> GpuStats | None:
        if not self.present:
            return None
        try:
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            return GpuStats(index=self.index, name=name if isinstance(name, str) else name.decode(),
                            memory_total_bytes=int(mem.total), memory_used_bytes=int(mem.used),
                            utilization_pct=int(util.gpu))
        except Exception as exc:
            log.warning("NVML query failed: %s", exc)
            return None
