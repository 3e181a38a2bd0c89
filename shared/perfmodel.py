"""The performance model of an LLM engine, shared by the worker's ``sim`` engine and the cluster simulator.

    load_s     = engine_start_s + weight bytes / tp / h2d_bytes_per_s
    prefill_s  = prompt tokens x prefill_s_per_token_per_gb x weight GB / tp        (at least min_step_s)
    decode_s   = decode_s_per_token_per_gb x weight GB / tp x (1 + batch_slowdown x (batch - 1))
                 per generated token, for a batch of ``batch`` concurrent requests  (at least min_step_s)
    KV memory  = kv bytes per token (2 x layers x kv heads x head dim x 2 bytes) in blocks of block_tokens

Defaults are a small fast model on a PCIe Gen4 link (the worker's tests and demos); ``GPU_A100_PCIE`` holds
constants for 7B-70B fp16 models on an 80 GB GPU (the simulator's paper setup).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class PerfModel:
    engine_start_s: float = 0.2
    h2d_bytes_per_s: float = 25e9
    prefill_s_per_token_per_gb: float = 2e-5
    decode_s_per_token_per_gb: float = 1.5e-3
    min_step_s: float = 0.002
    block_tokens: int = 16
    batch_slowdown: float = 0.0  # decode step growth per extra request in the batch (memory-bound: small)
    activate_s: float = 0.0  # mapping the KV cache of a prewarmed copy (a prewarm hit's whole cost)

    def load_s(self, weight_bytes: float, tp: int = 1) -> float:
        return self.engine_start_s + weight_bytes / max(tp, 1) / self.h2d_bytes_per_s

    def prefill_s(self, weight_bytes: float, tokens: int, tp: int = 1) -> float:
        return max(tokens * self.prefill_s_per_token_per_gb * weight_bytes / GB / max(tp, 1), self.min_step_s)

    def decode_s(self, weight_bytes: float, batch: int = 1, tp: int = 1) -> float:
        base = self.decode_s_per_token_per_gb * weight_bytes / GB / max(tp, 1)
        return max(base * (1 + self.batch_slowdown * (max(batch, 1) - 1)), self.min_step_s)


# 7B fp16 (13.5 GB) on one A100/H100-class GPU: a 1k-token prefill about 60 ms, a decode step about 20 ms
# at batch 1 and 1.6x that at batch 32; engine start (process, CUDA context, allocator) 5 s, PCIe 32 GB/s.
GPU_A100_PCIE = PerfModel(engine_start_s=5.0, h2d_bytes_per_s=32e9, prefill_s_per_token_per_gb=4.4e-6,
                          decode_s_per_token_per_gb=1.5e-3, min_step_s=0.001, batch_slowdown=0.02,
                          activate_s=0.05)
