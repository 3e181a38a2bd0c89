"""Calibrate the simulator against real vLLM on one NVIDIA GPU (the CUDA build of vLLM): engine start,
host-to-device copy bandwidth, sleep-mode wake-up, and prefill/decode step times of the Llama-2 7B and 13B
shapes, fitted to the step-level roofline; writes docs/benchmarks/calibration_gpu.json.

The models are config-only folders: vLLM's dummy load format gives them random weights on the GPU and
``skip_tokenizer_init`` needs no tokenizer, so nothing is downloaded or written but a config.json. Engines
start as the project's CUDA worker starts them (CUDA graphs, sleep mode on). The fit keeps the published
peaks of the base device (A100 or H100 by the GPU's name) and stores measured shares of them (mfu, mbu),
the per-step overhead and the measured host link; the costs section gets engine_start_s, pinned and
pageable bytes/s, and activate_s (waking a sleeping engine's KV cache, the prewarm hit's memory work).
Any CUDA test in tests/ (marked ``cuda``, or exercising sleep mode) is run too and its result recorded.

    .venv/bin/python -m loadtest.calibrate_gpu            # sized to finish within 8 minutes on an H100
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from loadtest.calibration_fit import (compare, device_overrides, fit_device, measure_steps, print_table, shutdown,
                                      summary, write_markdown)
from loadtest.report import header, save
from simulator.hardware import A100_80G, H100_80G, LLAMA2_7B, LLAMA2_13B, DeviceSpec, ModelShape

GPU_CALIBRATION = Path("docs/benchmarks/calibration_gpu.json")
SHAPES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B}
MAX_MODEL_LEN = 2048
GIB = 1024**3


def say(line: str) -> None:
    print(line, flush=True)


def base_for(gpu_name: str) -> tuple[DeviceSpec, dict]:
    """The published device the fit is relative to, and the datasheet figures of this GPU that differ from
    it (an H200 is an H100 with 4.8 TB/s HBM3e)."""
    name = gpu_name.upper()
    if "A100" in name:
        return A100_80G, {}
    return H100_80G, ({"mem_bw": 4.8e12} if "H200" in name else {})


def write_config(folder: Path, shape: ModelShape) -> Path:
    """A Hugging Face Llama config of ``shape`` (as tooling/modelgen writes one), and nothing else."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def start_engine(folder: Path, eager: bool):
    from vllm import LLM

    return LLM(model=str(folder), skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16", seed=0,
               max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.85, enable_sleep_mode=True,
               enforce_eager=eager, enable_prefix_caching=False, disable_log_stats=False)


def host_copy(gib: float, reps: int) -> dict:
    """Bytes/s of one host-to-device copy of ``gib`` GiB, from pinned and from pageable host memory."""
    import torch

    n = int(gib * GIB)
    device = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"bytes": n}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)  # ones: every page touched before timing
        times = []
        for rep in range(reps + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            device.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            if rep:  # the first copy is a warm-up
                times.append(time.perf_counter() - t)
        out[f"{kind}_bytes_per_s"] = n / statistics.median(times)
        say(f"host -> device, {kind}: {out[f'{kind}_bytes_per_s'] / 1e9:.1f} GB/s ({gib:g} GiB, {reps} copies)")
        del host
    del device
    torch.cuda.empty_cache()
    return out


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def _resume(llm) -> None:
    """Resume scheduling after a partial wake-up (vLLM versions without the "scheduling" tag need none)."""
    with suppress(Exception):  # older vLLM: no "scheduling" tag, nothing to resume
        llm.wake_up(tags=["scheduling"])


def sleep_wake(llm, reps: int) -> dict:
    """Sleep-mode timings of a started engine: level 1 (weights to host) and back, weights and KV cache
    woken separately; and the worker's own prewarm path (level 0, KV released, KV woken) where this vLLM
    has it. Medians; a step that fails is recorded, not fatal."""
    out: dict = {}
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(reps):
            runs.setdefault("sleep_level1_s", []).append(_timed(llm.sleep, level=1))
            runs.setdefault("wake_weights_s", []).append(_timed(llm.wake_up, tags=["weights"]))
            runs.setdefault("wake_kv_cache_s", []).append(_timed(llm.wake_up, tags=["kv_cache"]))
            _resume(llm)
            llm.sleep(level=1)
            runs.setdefault("wake_all_s", []).append(_timed(llm.wake_up))
        if hasattr(llm, "release_kv_cache_memory"):
            for _ in range(reps):
                llm.sleep(level=0)
                llm.release_kv_cache_memory()
                runs.setdefault("activate_kv_s", []).append(_timed(llm.wake_up, tags=["kv_cache", "scheduling"]))
    except Exception as exc:  # noqa: BLE001 - record what this vLLM cannot do and go on
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        with suppress(Exception):  # best effort: leave the engine awake for the step measurements
            llm.wake_up()
    out |= {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}
    say("sleep mode: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in out.items() if k.endswith("_s")))
    return out


def cuda_tests(timeout_s: float) -> dict:
    """The project's CUDA tests (a ``cuda`` marker, or sleep mode / wake-up in a test module), run by pytest."""
    pattern = re.compile(r"mark\.cuda\b|enable_sleep_mode|wake_up\(")
    found = sorted(str(p) for p in Path("tests").rglob("test_*.py") if pattern.search(p.read_text(errors="replace")))
    if not found:
        say("CUDA tests: none in tests/")
        return {"found": [], "status": "none"}
    say(f"CUDA tests: running {' '.join(found)}")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *found], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"found": found, "status": "timeout", "timeout_s": timeout_s}
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    status = "passed" if r.returncode == 0 else ("skipped" if r.returncode == 5 else "failed")
    say(f"CUDA tests: {status} ({tail[-1] if tail else 'no output'})")
    return {"found": found, "status": status, "returncode": r.returncode, "tail": tail}


def main(a) -> tuple[dict, list[dict]]:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # this process touches CUDA first
    import torch
    import vllm

    if not torch.cuda.is_available():
        sys.exit("calibrate_gpu needs an NVIDIA GPU and the CUDA build of vLLM")
    began = time.perf_counter()
    gpu = torch.cuda.get_device_name(0)
    base, datasheet = base_for(gpu)
    say(f"{gpu}: fitting against {base.name}{' with ' + str(datasheet) if datasheet else ''}")
    measured: dict = {"gpu": gpu, "copy": host_copy(a.copy_gib, a.reps)}
    root = Path(tempfile.mkdtemp(prefix="warmserve-calibrate-gpu-"))
    points, starts = [], {}
    for size in a.shapes:
        shape = SHAPES[size]
        folder = write_config(root / shape.name, shape)
        say(f"{shape.name}: starting vLLM (dummy weights, {'eager' if a.eager else 'CUDA graphs'}, sleep mode)")
        t = time.perf_counter()
        llm = start_engine(folder, a.eager)
        starts[shape.name] = time.perf_counter() - t
        say(f"{shape.name}: engine up in {starts[shape.name]:.1f} s; measuring")
        try:
            points += measure_steps(llm, shape.name, a.reps, say=say)
            if size == a.shapes[0]:
                measured["sleep_mode"] = sleep_wake(llm, a.reps) | {"model": shape.name,
                                                                  "weight_bytes": shape.weight_bytes}
        finally:
            shutdown(llm)
    if a.restart:  # compile caches are warm now: what a node that has started this model before pays
        shape = SHAPES[a.shapes[0]]
        t = time.perf_counter()
        llm = start_engine(root / shape.name, a.eager)
        starts[shape.name + " (restart)"] = time.perf_counter() - t
        say(f"{shape.name}: restarted in {starts[shape.name + ' (restart)']:.1f} s")
        shutdown(llm)
    measured["engine_start_s"] = starts
    measured["cuda_tests"] = cuda_tests(a.test_timeout) if a.tests else {"status": "not run (--no-tests)"}

    reference = base.scaled(**datasheet)
    fitted = fit_device(points, reference)
    rows = compare(points, fitted)
    print_table(rows)
    s = summary(rows)
    copy, sleep = measured["copy"], measured.get("sleep_mode", {})
    first = SHAPES[a.shapes[0]].name
    costs = {"engine_start_s": starts.get(first + " (restart)", starts[first]),
             "pinned_bytes_per_s": copy["pinned_bytes_per_s"], "pageable_bytes_per_s": copy["pageable_bytes_per_s"]}
    activate = sleep.get("activate_kv_s", sleep.get("wake_kv_cache_s"))
    if activate is not None:
        costs["activate_s"] = activate
    device = (device_overrides(reference, fitted, keep_peaks=True) | datasheet
              | {"host_link_bw": copy["pinned_bytes_per_s"],
                 "memory_bytes": torch.cuda.get_device_properties(0).total_memory})
    measured |= {"summary": s, "points": rows, "run_s": time.perf_counter() - began}
    report = header("calibration_gpu", vars(a)) | {
        "source": f"loadtest/calibrate_gpu.py on {gpu}: vLLM {vllm.__version__}, dummy-weight Llama-2 shapes",
        "device": device, "costs": costs, "measured": measured}
    report["machine"] |= {"gpu": gpu, "vllm": vllm.__version__, "torch": torch.__version__,
                          "cuda": torch.version.cuda}
    say(f"\nfitted vs {base.name}: mfu {device['mfu']:.2f}, mbu {device['mbu']:.2f}, "
        f"{fitted.step_overhead_s * 1e3:.2f} ms per step; costs {costs}; run took {measured['run_s']:.0f} s")
    return report, rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shapes", nargs="+", default=["7b", "13b"], choices=sorted(SHAPES),
                   help="model shapes to time; the first also gets the sleep-mode and restart measurements")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement, after one warm-up")
    p.add_argument("--copy-gib", type=float, default=4.0, help="size of the host-to-device copies")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs or torch.compile (the worker uses them)")
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="skip the second start of the first shape (with warm compile caches)")
    p.add_argument("--no-tests", dest="tests", action="store_false", help="skip the project's CUDA tests")
    p.add_argument("--test-timeout", type=float, default=120.0, help="seconds for the CUDA tests")
    p.add_argument("--out", type=Path, default=GPU_CALIBRATION)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    result, table_rows = main(args)
    save(result, args.out)
    write_markdown(args.out.with_suffix(".md"), f"GPU calibration of the step-level roofline ({result['machine']['gpu']})",
                   f"`{result['command']}`, vLLM {result['machine']['vllm']}. Step times are medians of vLLM's "
                   "engine-core timestamps; predictions are `simulator.hardware.step_time` with the fitted constants "
                   f"(mfu {result['device']['mfu']:.2f}, mbu {result['device']['mbu']:.2f} of "
                   f"{result['device']['base']}, {result['device']['step_overhead_s'] * 1e3:.2f} ms per step).",
                   table_rows)
