"""What starting a model costs, per system, as separate parameters that benchmarks sweep.

- ``engine_start_s``: a fresh vLLM engine (process, CUDA context, memory profiling, CUDA graph capture);
  10-30 s on real hardware for 7B-70B models. ServerlessLLM starts one per instance; WarmServe pre-spawns
  its engines, so neither its hits nor its misses pay it.
- weight load by tier: local SSD (read-bound), host DRAM in pinned chunks (PCIe-bound: ServerlessLLM's
  checkpoint store and WarmServe's host copies), pageable host DRAM.
- ``activate_s``: a WarmServe prewarm hit, mapping KV for the prewarmed weights and waking the engine
  (vLLM sleep mode's wake-up).

Defaults are published figures (an NVMe Gen4 drive reads about 6 GB/s; PCIe Gen4 x16 moves about 25 GB/s
from pinned memory) until a calibration file replaces them (``calibration.py``; docs/simulator.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Costs:
    engine_start_s: float = 15.0
    ssd_bytes_per_s: float = 6e9
    pinned_bytes_per_s: float = 25e9  # pinned host memory -> device (PCIe Gen4 x16; Gen5 about 50e9)
    pageable_bytes_per_s: float = 12e9
    activate_s: float = 0.3

    def load_s(self, weight_bytes: float, tp: int, tier: str = "pinned") -> float:
        """Weights onto ``tp`` devices, each its shard over its own PCIe link, from ``tier``; a node's SSD is
        one drive, so it reads the whole model."""
        tp = max(tp, 1)
        if tier == "ssd":
            return max(weight_bytes / self.ssd_bytes_per_s, weight_bytes / tp / self.pinned_bytes_per_s)
        bw = {"pinned": self.pinned_bytes_per_s, "pageable": self.pageable_bytes_per_s}[tier]
        return weight_bytes / tp / bw

    def with_(self, **changes) -> "Costs":
        return replace(self, **changes)


PCIE_GEN4 = Costs()
PCIE_GEN5 = Costs(pinned_bytes_per_s=50e9, pageable_bytes_per_s=20e9, ssd_bytes_per_s=12e9)
