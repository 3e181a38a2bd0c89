"""Multi-day request traces built from the shipped real traces, for forecasting work that needs days.

No public trace we ship is both request-level and longer than a day: the Azure traces are one real hour
each (their arrival bursts and token lengths are real), the ServeGen day is a real daily curve of a
production model's load. A week is made from both (docs/forecasting.md, "Multi-day series"):

- every hour of the week replays the Azure hour, rotated by a random offset so hours differ, which keeps
  its real burst structure (the code trace's silent minutes and spikes stay) and its real lengths;
- each request is kept with a probability that follows the ServeGen daily curve (its peak keeps every
  request), times a per-day level drawn lognormal, so days differ the way days of a real service do.

Thinning keeps bursts bursty; nothing is smoothed. The seed, the curve's model and the day spread are
recorded with every result (``WeekSpec``), so a week is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tooling.workload import traces

WEEKS = {"azure-conv-week": "azure-conv", "azure-code-week": "azure-code"}
DAY_S = 86400.0
HOUR_S = 3600.0


@dataclass(frozen=True)
class WeekSpec:
    hour_trace: str  # azure-conv | azure-code
    days: int = 7
    daily_curve: str = "deepseek-r1"  # the ServeGen model whose day shapes every day
    day_sigma: float = 0.1  # spread of the per-day level (lognormal)


def daily_curve(model: str) -> tuple[np.ndarray, np.ndarray]:
    """(window centres in seconds of the day, rate relative to the day's peak) of a ServeGen model."""
    rates = traces.read_rates(traces.SERVEGEN_RATES)
    if model not in rates:
        raise ValueError(f"no ServeGen daily curve for {model!r}; known: {', '.join(sorted(rates))}")
    s = rates[model]
    return s.t_start_s + s.window_s / 2, s.rate_rps / s.rate_rps.max()


def week_requests(spec: WeekSpec, rng: np.random.Generator) -> traces.Requests:
    hour = traces.read_requests(traces.AZURE[spec.hour_trace])
    centres, curve = daily_curve(spec.daily_curve)
    levels = np.exp(rng.normal(0.0, spec.day_sigma, size=spec.days))
    levels /= levels.max()
    arrivals, inputs, outputs = [], [], []
    for h in range(spec.days * 24):
        rotated = (hour.arrival_s + rng.uniform(0.0, HOUR_S)) % HOUR_S
        t = h * HOUR_S + rotated
        keep_p = levels[h // 24] * np.interp(t % DAY_S, centres, curve, period=DAY_S)
        keep = rng.random(len(t)) < keep_p
        arrivals.append(t[keep])
        inputs.append(hour.input_tokens[keep])
        outputs.append(hour.output_tokens[keep])
    a = np.concatenate(arrivals)
    order = np.argsort(a, kind="stable")
    return traces.Requests(a[order], np.concatenate(inputs)[order], np.concatenate(outputs)[order])
