"""A roofline model of one engine step: how long a batch takes on a device, from the model's shape.

A step processes some prefill chunks and some decodes together (vLLM's continuous batching with chunked
prefill). Its time is

    max(FLOPs / (peak FLOP/s x MFU x compute share), bytes read / (bandwidth x MBU x bandwidth share))
    + tensor-parallel all-reduces + a fixed per-step overhead (scheduling, kernel launches, sampling)

FLOPs are 2 x parameters per token through the linear layers (the LM head once per sequence), plus
attention (4 x layers x hidden x context per token). Bytes are the weights once per step plus every
sequence's KV cache that the step reads. Under tensor parallelism each device does 1/TP of both and two
all-reduces per layer move each token's hidden state over the device link (ring: 2 (TP-1)/TP of it).

Device constants are the vendors' published peaks (dense fp16/bf16 tensor FLOP/s, HBM bandwidth, NVLink and
PCIe) with achievable shares that are typical of serving kernels; ``calibration.py`` replaces them with
measured values when a calibration file exists. See docs/simulator.md, "Step-level engine".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tooling.modelgen import SIZES, TinyLlamaShape


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama layout: gated MLP, grouped-query attention), 2-byte weights."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden  # embedding + LM head

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


LLAMA2_7B = ModelShape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000)
LLAMA2_13B = ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000)
LLAMA2_70B = ModelShape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000)


def from_modelgen(name: str, shape: TinyLlamaShape) -> ModelShape:
    return ModelShape(name, shape.num_hidden_layers, shape.hidden_size, shape.num_attention_heads,
                      shape.num_key_value_heads, shape.intermediate_size, shape.vocab_size)


# the project's own random-weight models, for the CPU calibration
TINY_5M = from_modelgen("tiny-5m", SIZES["5m"])
TINY_300M = from_modelgen("tiny-300m", SIZES["300m"])
SHAPES = {s.name: s for s in (LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, TINY_5M, TINY_300M)}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: int
    peak_flops: float  # dense fp16/bf16 tensor FLOP/s
    mem_bw: float  # device memory bytes/s
    mfu: float  # share of peak FLOP/s a prefill reaches
    mbu: float  # share of bandwidth a decode reaches
    link_bw: float  # device-to-device bytes/s per direction (NVLink), for TP all-reduces
    link_latency_s: float  # per all-reduce
    step_overhead_s: float  # per engine step: scheduler, launches, sampling, detokenisation
    host_link_bw: float  # host-to-device bytes/s (PCIe), for weight loads from pinned host memory

    def scaled(self, **changes) -> "DeviceSpec":
        return replace(self, **changes)


# Published peaks (NVIDIA A100 and H100 datasheets: A100 80GB SXM 312 TFLOP/s dense bf16, 2,039 GB/s HBM2e,
# NVLink 600 GB/s total, PCIe Gen4 x16; H100 SXM 989 TFLOP/s dense bf16, 3,350 GB/s HBM3, NVLink 900 GB/s,
# PCIe Gen5 x16). PCIe: achievable ~80% of the 32 / 64 GB/s link.
A100_80G = DeviceSpec("a100-80g-sxm", 80 * 10**9, 312e12, 2.039e12, mfu=0.55, mbu=0.80, link_bw=300e9,
                      link_latency_s=8e-6, step_overhead_s=0.003, host_link_bw=25e9)
H100_80G = DeviceSpec("h100-80g-sxm", 80 * 10**9, 989e12, 3.35e12, mfu=0.50, mbu=0.80, link_bw=450e9,
                      link_latency_s=6e-6, step_overhead_s=0.002, host_link_bw=50e9)
DEVICES = {d.name: d for d in (A100_80G, H100_80G)}


@dataclass(frozen=True)
class Batch:
    """One step's work: prefill chunks as (tokens in the chunk, tokens already in the KV cache before it),
    and the context length (KV tokens read) of every decoding sequence."""

    prefills: tuple[tuple[int, int], ...] = ()
    decodes: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(c for c, _ in self.prefills) + len(self.decodes)

    @property
    def sequences(self) -> int:
        return len(self.prefills) + len(self.decodes)


@dataclass(frozen=True)
class StepCost:
    """A step's parts, for one device of the TP group: compute and memory seconds at full share,
    fixed seconds (all-reduces + overhead) that no share changes."""

    compute_s: float
    memory_s: float
    fixed_s: float

    def time(self, compute_share: float = 1.0, bandwidth_share: float = 1.0) -> float:
        return max(self.compute_s / compute_share, self.memory_s / bandwidth_share) + self.fixed_s


def step_cost(shape: ModelShape, device: DeviceSpec, batch: Batch, tp: int = 1) -> StepCost:
    """The roofline parts of one step of ``batch`` on ``tp`` devices of ``device``."""
    n = batch.tokens
    if n == 0:
        return StepCost(0.0, 0.0, 0.0)
    lm_head = shape.vocab * shape.hidden  # LM head parameters, applied once per sequence
    attn_per_ctx = 4 * shape.layers * shape.hidden  # QK^T and AV, per (query token, key token)
    flops = 2 * shape.layers * shape.layer_params * n + 2 * lm_head * batch.sequences
    kv_read = 0
    for chunk, before in batch.prefills:
        flops += attn_per_ctx * chunk * (before + (chunk + 1) / 2)
        kv_read += before
    for ctx in batch.decodes:
        flops += attn_per_ctx * ctx
        kv_read += ctx
    read = shape.weight_bytes + kv_read * shape.kv_bytes_per_token
    compute_s = flops / tp / (device.peak_flops * device.mfu)
    memory_s = read / tp / (device.mem_bw * device.mbu)
    comm = 0.0
    if tp > 1:
        per_reduce = 2 * (tp - 1) / tp * n * shape.hidden * shape.dtype_bytes / device.link_bw + device.link_latency_s
        comm = 2 * shape.layers * per_reduce
    return StepCost(compute_s, memory_s, comm + device.step_overhead_s)


def step_time(shape: ModelShape, device: DeviceSpec, batch: Batch, tp: int = 1, compute_share: float = 1.0,
              bandwidth_share: float = 1.0) -> float:
    return step_cost(shape, device, batch, tp).time(compute_share, bandwidth_share)


def decode_run_time(first: StepCost, growth: StepCost, steps: int, compute_share: float = 1.0,
                    bandwidth_share: float = 1.0) -> float:
    """Total time of ``steps`` decode steps whose cost grows by ``growth`` each step (every sequence's
    context grows by one token per step): sum over k < steps of max(C0 + k dC, M0 + k dM) + F, in closed form,
    so a batch that does not change is skipped over in one event."""
    if steps <= 0:
        return 0.0
    c0, dc = first.compute_s / compute_share, growth.compute_s / compute_share
    m0, dm = first.memory_s / bandwidth_share, growth.memory_s / bandwidth_share

    def linear_sum(a: float, d: float, lo: int, hi: int) -> float:  # sum of a + k d for k in [lo, hi)
        count = hi - lo
        return a * count + d * (lo + hi - 1) * count / 2 if count > 0 else 0.0

    # the two lines cross at most once: compute is the larger for k on one side of -f0/df
    f0, df = c0 - m0, dc - dm
    compute_first = f0 >= 0
    if df == 0 or (compute_first and df > 0) or (not compute_first and df < 0):
        cross = steps
    else:
        cross = min(steps, max(math.ceil(-f0 / df), 0))
    if compute_first:
        total = linear_sum(c0, dc, 0, cross) + linear_sum(m0, dm, cross, steps)
    else:
        total = linear_sum(m0, dm, 0, cross) + linear_sum(c0, dc, cross, steps)
    return total + first.fixed_s * steps


def decode_steps_within(first: StepCost, growth: StepCost, elapsed_s: float, limit: int,
                        compute_share: float = 1.0, bandwidth_share: float = 1.0) -> int:
    """How many whole steps of such a decode run finish within ``elapsed_s`` (at most ``limit``)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_run_time(first, growth, mid, compute_share, bandwidth_share) <= elapsed_s + 1e-12:
            lo = mid
        else:
            hi = mid - 1
    return lo


def growth_per_step(shape: ModelShape, device: DeviceSpec, decodes: int, tp: int = 1) -> StepCost:
    """How much a step of ``decodes`` sequences costs more than the one before (each read one more KV token)."""
    flops = 4 * shape.layers * shape.hidden * decodes
    read = decodes * shape.kv_bytes_per_token
    return StepCost(flops / tp / (device.peak_flops * device.mfu), read / tp / (device.mem_bw * device.mbu), 0.0)
