"""Gateway overhead: time to first token through the HTTP gateway vs. straight to the worker over NATS,
and requests per second through each at a fixed concurrency.

Runs against a live cluster (default: the one `warmserve up` is running; use `--engine sim` so the
engine is not the bottleneck). Latency: both paths hit the same worker and instance with the same
request, one at a time, alternating, so the difference is what the gateway adds (HTTP, key check,
validation, routing, SSE framing, one extra NATS hop per chunk). Throughput: `--concurrency` clients
for `--seconds` per path.

    .venv/bin/python -m loadtest.gateway_overhead --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from loadtest.report import header, save
from shared import bus
from tooling.cli.client import _admin, _gateway_url, _nats_url
from shared.messages import ChatMessage, InferChunk, InferRequest, SamplingParams
from shared.subjects import INFER


def percentiles(xs: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_ms": qs[49] * 1e3, "p90_ms": qs[89] * 1e3, "p99_ms": qs[98] * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


async def direct(nc, worker: str, model: str, max_tokens: int) -> tuple[float, float]:
    req = InferRequest(model=model, messages=[ChatMessage(role="user", content="Hello there!")],
                       sampling=SamplingParams(max_tokens=max_tokens, seed=1))
    t0 = time.perf_counter()
    first = None
    async for chunk in bus.request_stream(nc, INFER.format(worker=worker), req, InferChunk, first_timeout=30,
                                          idle_timeout=30, is_last=lambda c: c.last):
        first = first or time.perf_counter()
        if chunk.error:
            raise RuntimeError(chunk.error.message)
    return first - t0, time.perf_counter() - t0


async def throughput(call, concurrency: int, seconds: float) -> dict:
    """Completed requests per second with ``concurrency`` clients calling back to back."""
    done, errors = 0, 0
    stop_at = time.perf_counter() + seconds

    async def client():
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            try:
                await call()
                done += 1
            except Exception:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"requests_per_s": done / (time.perf_counter() - started), "completed": done, "errors": errors,
            "concurrency": concurrency}


async def via_gateway(http: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float, float]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": max_tokens,
            "seed": 1, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter()
    return first - t0, time.perf_counter() - t0


class RawHttp:
    """Streamed chat requests over kept-alive HTTP/1.1 connections, parsed no further than needed: the
    gateway path's counterpart of the direct path's bare NATS client. httpx spent about 2 ms of CPU per
    streamed request here, 4 ms of the TTFT "overhead" this benchmark reported before; this client 0.3 ms."""

    def __init__(self, url: str, key: str):
        self.host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.port, self.key = int(port or 80), key
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def chat(self, model: str, max_tokens: int) -> tuple[float, float]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello there!"}],
                           "max_tokens": max_tokens, "seed": 1, "stream": True}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        t0 = time.perf_counter()
        first, buf = None, b""
        writer.write(head + body)
        while not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("the gateway closed the connection")
            buf += data
            if first is None and b"\ndata: " in buf:
                first = time.perf_counter()
        if not buf.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in buf:
            raise RuntimeError(buf[:200].decode(errors="replace"))
        self.idle.append((reader, writer))
        return first - t0, time.perf_counter() - t0

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def main(a) -> dict:
    workers = await _admin("worker-list", {})
    target = next(((w["worker_id"], c["model"]) for w in workers for c in w["copies"]
                   if c["state"] == "active" and c["model"] == a.model), None)
    if target is None:
        sys.exit(f"no active instance of {a.model}; is the cluster up?")
    worker, model = target
    nc = await bus.connect(_nats_url(), "bench")
    results = {"direct": ([], []), "gateway": ([], [])}
    # a key of its own, so the per-key rate limit of the cluster's default key does not cap the run
    bench_key = (await _admin("key-create", {"name": f"bench-{int(time.time())}", "rate_limit_rps": 1e6}))["key"]
    headers = {"Authorization": f"Bearer {bench_key}"}
    limits = httpx.Limits(max_connections=a.concurrency * 2, max_keepalive_connections=a.concurrency * 2)
    raw = RawHttp(_gateway_url(), bench_key)
    async with httpx.AsyncClient(base_url=_gateway_url(), timeout=30, headers=headers, limits=limits) as http:
        gateway = ((lambda: raw.chat(model, a.max_tokens)) if a.http_client == "raw"
                   else (lambda: via_gateway(http, model, a.max_tokens)))
        for i in range(a.warmup + a.requests):
            for name in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                ttft, total = await (direct(nc, worker, model, a.max_tokens) if name == "direct" else gateway())
                if i >= a.warmup:
                    results[name][0].append(ttft)
                    results[name][1].append(total)
        rates = {
            "direct": await throughput(lambda: direct(nc, worker, model, a.max_tokens), a.concurrency, a.seconds),
            "gateway": await throughput(gateway, a.concurrency, a.seconds),
        }
    raw.close()
    await nc.close()
    rows = {name: {"ttft": percentiles(t), "total": percentiles(tot), "n": len(t)} for name, (t, tot) in results.items()}
    overhead = {k: rows["gateway"]["ttft"][k] - rows["direct"]["ttft"][k] for k in ("p50_ms", "p90_ms", "p99_ms")}
    print(f"\nGateway overhead, {a.requests} sequential requests per path, max_tokens={a.max_tokens}, worker {worker}, "
          f"HTTP client {a.http_client}")
    print(f"{'path':<10}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'total p50':>11}{'p99':>9}  (ms)")
    for name, r in rows.items():
        print(f"{name:<10}{r['ttft']['p50_ms']:>10.2f}{r['ttft']['p90_ms']:>9.2f}{r['ttft']['p99_ms']:>9.2f}"
              f"{r['total']['p50_ms']:>11.2f}{r['total']['p99_ms']:>9.2f}")
    print(f"{'overhead':<10}{overhead['p50_ms']:>10.2f}{overhead['p90_ms']:>9.2f}{overhead['p99_ms']:>9.2f}")
    print(f"\nThroughput, {a.concurrency} concurrent clients for {a.seconds:.0f} s per path")
    for name, r in rates.items():
        print(f"{name:<10}{r['requests_per_s']:>8.1f} requests/s  ({r['completed']} done, {r['errors']} errors)")
    engine = next(w["engine"] for w in workers if w["worker_id"] == worker)
    return header("gateway_overhead", vars(a) | {"engine": engine, "worker": worker}) | {
        "results": rows, "ttft_overhead_ms": overhead, "throughput": rates}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--http-client", choices=("httpx", "raw"), default="httpx",
                   help="the gateway path's client: httpx, or raw HTTP/1.1 (RawHttp: the direct path's equal)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/gateway_overhead.json"))
    args = p.parse_args()
    save(asyncio.run(main(args)), args.out)
