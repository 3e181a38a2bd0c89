"""Load forecasting from per-window concurrency observations.

This first version predicts the next window from the last one (the naive method), with the
largest recent peak as the upper bound; statsforecast models chosen by backtest replace it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowObservation:
    start_s: float
    avg: float
    peak: float


@dataclass(frozen=True)
class Prediction:
    avg: float
    peak: float
    peak_upper: float
    method: str


def naive_forecast(history: Sequence[WindowObservation], upper_lookback: int = 3) -> Prediction:
    """Next window = last complete window; upper = the highest peak of the last few windows."""
    if not history:
        return Prediction(0.0, 0.0, 0.0, "naive-empty")
    last = history[-1]
    upper = max(w.peak for w in history[-upper_lookback:])
    return Prediction(last.avg, last.peak, max(upper, last.peak), "naive")
