"""Prometheus metrics of the forecaster (on ``WARMSERVE_METRICS_PORT``): the forecast for the next window, what
came, and how the upper band did on each closed window (a miss: the load above the upper by more than 20%, as
``band_score`` counts it in the backtest)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import Forecast
from shared.metrics import REGISTRY
from shared.policy.forecast import UNDER_THRESHOLD, WindowObservation

SERIES = ("avg", "peak")

ROUND_SECONDS = Histogram("warmserve:forecast_round_seconds", "Time of a forecast round (close the windows, "
                          "forecast every model, publish)", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                                                     60, 120), registry=REGISTRY)
FORECAST = Gauge("warmserve:forecast_load", "The next window's forecast load (requests in flight; avg or peak "
                 "series), the point and the upper band placement provisions for", ["model", "series", "bound"],
                 registry=REGISTRY)
OBSERVED = Gauge("warmserve:observed_load", "The load of the last closed window (requests in flight; avg or peak)",
                 ["model", "series"], registry=REGISTRY)
WINDOWS = Counter("warmserve:forecast_windows", "Closed windows scored against the upper made for them",
                  ["model", "series"], registry=REGISTRY)
MISSES = Counter("warmserve:forecast_misses", "Closed windows whose load exceeded the upper by more than 20% "
                 "(coverage = 1 - misses / windows)", ["model", "series"], registry=REGISTRY)
HEADROOM = Gauge("warmserve:forecast_headroom_ratio", "The last scored window's over-provisioning: (upper - load) "
                 "/ load, 0 when the load reached the upper", ["model", "series"], registry=REGISTRY)


class BandMeter:
    """Remembers the forecast made for each model's next window and scores it when that window closes."""

    def __init__(self) -> None:
        self.pending: dict[str, Forecast] = {}

    def forecast(self, fc: Forecast) -> None:
        self.pending[fc.model] = fc
        for series, point, upper in (("avg", fc.predicted_avg, fc.predicted_avg_upper),
                                     ("peak", fc.predicted_peak, fc.predicted_peak_upper)):
            FORECAST.labels(fc.model, series, "point").set(point)
            FORECAST.labels(fc.model, series, "upper").set(upper)

    def observed(self, model: str, obs: WindowObservation) -> None:
        OBSERVED.labels(model, "avg").set(obs.avg)
        OBSERVED.labels(model, "peak").set(obs.peak)
        fc = self.pending.get(model)
        if fc is None or abs(fc.window_start_s - obs.start_s) > 1e-6:
            return  # no forecast was made for this window (a new model, or the forecaster started since)
        for series, load, upper in (("avg", obs.avg, fc.predicted_avg_upper), ("peak", obs.peak, fc.predicted_peak_upper)):
            if load <= 0:
                continue  # an idle window: neither a miss nor a ratio
            WINDOWS.labels(model, series).inc()
            if load > (1 + UNDER_THRESHOLD) * upper:
                MISSES.labels(model, series).inc()
            HEADROOM.labels(model, series).set(max(upper - load, 0.0) / load)
