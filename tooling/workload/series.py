"""Per-model concurrency series (average and peak per window) from the traces' formats.

A rate trace gives arrivals (Gamma per window, seeded); request lengths come from the model's real token
histograms (ServeGen) or from real (input, output) pairs of the Azure conversation trace; a service-time
model turns lengths into how long each request holds a slot; ``concurrency_windows`` does the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.policy.concurrency import concurrency_windows
from shared.policy.forecast import WindowObservation
from tooling.workload import traces, weeks
from tooling.workload.synth import ServiceModel, gamma_arrivals, sampled_requests

SOURCES = ("servegen", "azure-conv", "azure-code", *weeks.WEEKS)


@dataclass(frozen=True)
class SeriesSpec:
    """Everything that determines a series, recorded next to every result."""

    source: str  # servegen | azure-conv | azure-code | azure-{conv,code}-week | rates:<path> | requests:<path>
    window_s: float = 300.0
    seed: int = 0
    rate_scale: float = 1.0
    prefill_s_per_token: float = ServiceModel.prefill_s_per_token
    decode_s_per_token: float = ServiceModel.decode_s_per_token

    def as_dict(self) -> dict:
        return asdict(self)


def build_series(spec: SeriesSpec) -> dict[str, list[WindowObservation]]:
    """``model -> windows`` (window starts are seconds from the trace's t=0)."""
    rng = np.random.default_rng(spec.seed)
    service = ServiceModel(spec.prefill_s_per_token, spec.decode_s_per_token)
    if spec.source == "servegen":
        hists = traces.read_token_histograms()
        out = {}
        for model in traces.servegen_models():
            clients = traces.read_servegen_clients(model)
            arrivals = np.sort(np.concatenate([gamma_arrivals(c, rng, spec.rate_scale) for c in clients]))
            reqs = sampled_requests(arrivals, hists[(model, "input_tokens")], hists[(model, "output_tokens")], rng)
            out[model] = request_windows(reqs, service, spec.window_s, max(c.duration_s for c in clients))
        return out
    if spec.source in weeks.WEEKS:
        week = weeks.WeekSpec(weeks.WEEKS[spec.source])
        reqs = weeks.week_requests(week, rng)
        return {spec.source: request_windows(reqs, service, spec.window_s, week.days * weeks.DAY_S)}
    if spec.source in traces.AZURE or spec.source.startswith("requests:"):
        path = traces.AZURE.get(spec.source) or Path(spec.source.split(":", 1)[1])
        reqs = traces.read_requests(path)
        duration = float(reqs.arrival_s[-1]) + 1e-6
        name = spec.source if spec.source in traces.AZURE else Path(path).stem
        return {name: request_windows(reqs, service, spec.window_s, duration)}
    if spec.source.startswith("rates:"):
        series = traces.read_rates(Path(spec.source.split(":", 1)[1]))
        hists = traces.read_token_histograms()
        pairs = traces.read_requests(traces.AZURE["azure-conv"])
        out = {}
        for model, rates in series.items():
            arrivals = gamma_arrivals(rates, rng, spec.rate_scale)
            if (model, "output_tokens") in hists:
                reqs = sampled_requests(arrivals, hists[(model, "input_tokens")], hists[(model, "output_tokens")], rng)
            else:  # real (input, output) pairs of a conversation service
                idx = rng.integers(0, len(pairs.arrival_s), size=len(arrivals))
                reqs = traces.Requests(arrivals, pairs.input_tokens[idx], pairs.output_tokens[idx])
            out[model] = request_windows(reqs, service, spec.window_s, rates.duration_s)
        return out
    raise ValueError(f"unknown series source {spec.source!r}: use one of {', '.join(SOURCES)}, "
                     "rates:<file> (ServeGen rate format) or requests:<file> (Azure request format)")


def request_windows(reqs: traces.Requests, service: ServiceModel, window_s: float, duration_s: float) -> list[WindowObservation]:
    """Average and peak concurrency and arrivals per window of a request trace."""
    n = max(1, math.ceil(duration_s / window_s - 1e-9))
    durations = service.durations(reqs.input_tokens, reqs.output_tokens)
    avg, peak = concurrency_windows(reqs.arrival_s, durations, 0.0, window_s, n)
    counts = np.histogram(reqs.arrival_s, bins=n, range=(0.0, n * window_s))[0]
    return [WindowObservation(i * window_s, float(a), float(p), int(c)) for i, (a, p, c) in enumerate(zip(avg, peak, counts))]


