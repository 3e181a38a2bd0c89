"""Multi-model workloads from the shipped traces (the recipe in tooling/traces/README.md).

Model i gets a share of the total rate proportional to (i+1)^-alpha and its own phase-shifted copy of a
real daily curve (ServeGen's per-model rates, normalised to mean 1). The day is compressed by
``time_scale`` (a 20-minute replay at scale 18 covers six trace hours). Arrivals per window are a Gamma
process with the window's rate and ``cv``; (input, output) lengths are real pairs from the Azure
conversation trace. Everything random comes from ``seed``; every factor is recorded with the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared.perfmodel import GPU_A100_PCIE as perf
from simulator.hardware import LLAMA2_13B, LLAMA2_70B, LLAMA2_7B, ModelShape
from shared.policy.concurrency import concurrency_windows
from shared.policy.forecast import WindowObservation
from tooling.workload import traces
from tooling.workload.synth import gamma_arrivals

LLAMA2_SHAPES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "70b": LLAMA2_70B}
LLAMA2_TP = {"7b": 1, "13b": 2, "70b": 4}  # the paper's tensor parallelism per size


@dataclass(frozen=True)
class SimModel:
    name: str
    shape: ModelShape
    tp: int

    @property
    def weight_bytes(self) -> int:
        return self.shape.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token

    @classmethod
    def llama2(cls, name: str, size: str, tp: int | None = None) -> "SimModel":
        return cls(name, LLAMA2_SHAPES[size], tp or LLAMA2_TP[size])


@dataclass(frozen=True)
class Request:
    rid: int
    model: str
    arrival_s: float
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    models: tuple[str, ...] = ("7b",) * 8 + ("13b",) * 3 + ("70b",)  # sizes, in popularity order once shuffled
    alpha: float = 1.0
    total_rps: float = 8.0  # mean over the replay, all models
    duration_s: float = 1200.0  # the replay: 20 minutes
    time_scale: float = 18.0  # trace seconds per replay second
    start_trace_s: float = 8 * 3600.0  # where in the trace day the replay starts
    cv: float = 2.0  # inter-arrival CV within a window (1 = Poisson)
    history_days: int = 2  # compressed days of history before the replay, for the forecasters
    window_s: float = 60.0  # forecast window in replay seconds
    warmup_s: float = 300.0  # replayed before t=0 so every system starts in its steady state (not measured)
    seed: int = 0
    rates_file: str | None = None  # a ServeGen-format rate file instead of the shipped curves
    max_input_tokens: int | None = None  # clip the real lengths (small models on a CPU cannot serve 8k prompts)
    max_output_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Workload:
    spec: WorkloadSpec
    models: list[SimModel]
    requests: list[Request]
    history: dict[str, list[WindowObservation]] = field(default_factory=dict)  # per model, before the warm-up
    shares: dict[str, float] = field(default_factory=dict)


def _curves(spec: WorkloadSpec) -> list[traces.RateSeries]:
    if spec.rates_file:
        return list(traces.read_rates(spec.rates_file).values())
    return list(traces.read_rates(traces.SERVEGEN_RATES).values())


def build(spec: WorkloadSpec) -> Workload:
    rng = np.random.default_rng(spec.seed)
    sizes = list(spec.models)
    rng.shuffle(sizes)
    models = [SimModel.llama2(f"m{i:02d}-{size}", size) for i, size in enumerate(sizes)]
    weights = np.array([(i + 1.0) ** -spec.alpha for i in range(len(models))])
    shares = weights / weights.sum()
    curves = _curves(spec)
    pairs = traces.read_requests(traces.AZURE["azure-conv"])
    day_s = 86400.0 / spec.time_scale  # one compressed day in replay seconds
    history_s = spec.history_days * day_s
    requests: list[Request] = []
    history: dict[str, list[WindowObservation]] = {}
    for i, (model, share) in enumerate(zip(models, shares)):
        base = curves[i % len(curves)]
        norm = base.rate_rps / max(base.rate_rps.mean(), 1e-9)
        phase = rng.uniform(0, 86400.0)
        # the model's curve, in replay seconds, from the start of its history to the end of the replay
        t0 = -history_s
        n = int(np.ceil((history_s + spec.duration_s) / spec.window_s))
        starts = t0 + spec.window_s * np.arange(n)
        trace_t = (spec.start_trace_s + phase + starts * spec.time_scale) % 86400.0
        idx = np.minimum((trace_t // base.window_s).astype(int), len(norm) - 1)
        rates = spec.total_rps * share * norm[idx]
        series = traces.RateSeries(model.name, starts - t0, rates, np.full(n, spec.cv), spec.window_s)
        arrivals = gamma_arrivals(series, rng) + t0
        pick = rng.integers(0, len(pairs.arrival_s), size=len(arrivals))
        ins, outs = pairs.input_tokens[pick], pairs.output_tokens[pick]
        if spec.max_input_tokens:
            ins = np.clip(ins, 1, spec.max_input_tokens)
        if spec.max_output_tokens:
            outs = np.clip(outs, 1, spec.max_output_tokens)
        past = arrivals < -spec.warmup_s
        # history: what the forecaster would have observed (service time: a warm instance's, by the
        # request-level A100 model the worker's sim engine uses; the forecasts need only its shape)
        svc = np.array([perf.prefill_s(model.weight_bytes, int(a), model.tp) +
                        b * perf.decode_s(model.weight_bytes, 8, model.tp) for a, b in zip(ins[past], outs[past])])
        hw = int(round((history_s - spec.warmup_s) / spec.window_s))
        avg, peak = concurrency_windows(arrivals[past], svc, t0, spec.window_s, hw)
        counts = np.histogram(arrivals[past], bins=hw, range=(t0, t0 + hw * spec.window_s))[0]
        history[model.name] = [WindowObservation(t0 + k * spec.window_s, float(a), float(p), int(c))
                               for k, (a, p, c) in enumerate(zip(avg, peak, counts))]
        requests += [Request(0, model.name, float(t), int(a), int(b))
                     for t, a, b in zip(arrivals[~past], ins[~past], outs[~past]) if t < spec.duration_s]
    requests.sort(key=lambda r: (r.arrival_s, r.model))
    requests = [Request(k, r.model, r.arrival_s, r.input_tokens, r.output_tokens) for k, r in enumerate(requests)]
    return Workload(spec, models, requests, history, {m.name: float(s) for m, s in zip(models, shares)})
