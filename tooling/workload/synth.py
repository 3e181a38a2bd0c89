"""Request arrivals and service times synthesised from rate traces (the recipe in tooling/traces/README.md).

Arrivals in each window are a renewal process with Gamma inter-arrival times of the window's mean rate
and CV (CV 1 = Poisson). Everything random comes from the ``numpy.random.Generator`` passed in, so a
seed reproduces a workload exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tooling.workload.traces import RateSeries, Requests, TokenHistogram


def gamma_arrivals(series: RateSeries, rng: np.random.Generator, rate_scale: float = 1.0) -> np.ndarray:
    """Arrival times (seconds from the trace's t=0) for one rate series."""
    out = []
    for start, rate, cv in zip(series.t_start_s, series.rate_rps * rate_scale, series.cv):
        if rate <= 0:
            continue
        shape = 1.0 / (cv * cv)
        scale = 1.0 / (rate * shape)
        expected = rate * series.window_s
        n = int(expected + 6 * np.sqrt(expected * max(cv * cv, 1.0)) + 10)
        gaps = rng.gamma(shape, scale, size=n)
        # start the renewal process at a random phase so windows do not all begin with an arrival
        times = start + rng.random() * gaps[0] + np.cumsum(gaps[1:])
        out.append(times[times < start + series.window_s])
    return np.sort(np.concatenate(out)) if out else np.empty(0)


@dataclass(frozen=True)
class ServiceModel:
    """How long a request holds a slot: prefill per input token plus decode per output token.

    Defaults are a mid-size model on a modern GPU under batching (about 10k prefill tokens/s and
    25 ms per output token); concurrency scales linearly with them, forecast errors do not.
    """

    prefill_s_per_token: float = 1e-4
    decode_s_per_token: float = 0.025

    def durations(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        return self.prefill_s_per_token * input_tokens + self.decode_s_per_token * output_tokens


def sampled_requests(arrivals: np.ndarray, inputs: TokenHistogram, outputs: TokenHistogram,
                     rng: np.random.Generator) -> Requests:
    """Give each arrival (input, output) lengths drawn from a model's real token histograms."""
    n = len(arrivals)
    return Requests(arrivals, inputs.sample(rng, n), outputs.sample(rng, n))
