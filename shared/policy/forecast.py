"""Per-series load forecasting with per-series method selection by rolling backtest (docs/design.md, "Forecasting").

A ``SeriesForecaster`` holds one series (a model's average or peak concurrency per window). Each time a
window closes it is told the observed value (``observe``): every method's pending one-step prediction is
scored against it, so the rolling backtest comes for free in steady state. ``forecast`` runs every
available method, picks the one with the lowest mean absolute error over the last ``score_windows``
windows, and puts an upper quantile on top from that method's own recent errors (an empirical,
conformal-style band: prewarming for the upper quantile is cheap insurance). With too little history it
falls back to the recent level and says so in ``note``.

The forecaster service, the backtest command and the simulator all drive this one class.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.policy.forecast_methods import Method, RecentLevel, build_methods

ALL_METHODS = ("naive", "seasonal-naive", "paper", "autoets", "mstl", "ensemble")
ENSEMBLE_OF = ("naive", "paper", "autoets", "mstl")  # the mean of those available: forecast combination


@dataclass(frozen=True)
class WindowObservation:
    start_s: float
    avg: float
    peak: float
    arrivals: int = 0


@dataclass(frozen=True)
class ForecastConfig:
    season_length: int = 288  # windows per day (288 x 300 s)
    horizon: int = 3  # windows forecast at each boundary
    upper_quantile: float = 0.9  # of one-step errors, added to the point forecast
    min_history: int = 12  # windows before any model is fitted; fewer -> recent level
    score_windows: int = 48  # rolling-backtest length used to select a method and size the band
    min_scored: int = 6  # scored windows a method needs before it can be selected
    refit_every: int = 12  # fitted models are refitted this often, applied with forward() between
    fit_windows: int = 7 * 288  # history kept per series (the paper's method averages up to 7 days)
    mstl_fit_windows: int = 4 * 288  # MSTL decomposes the last four days (cost is linear in length)
    ets_fit_windows: int = 2 * 288  # AutoETS's model search on the last two days only (cost)
    fallback_margin: float = 0.25  # upper = point x (1 + margin) until errors have been scored
    methods: tuple[str, ...] = ALL_METHODS

    @classmethod
    def for_window(cls, window_s: float, **overrides) -> ForecastConfig:
        """Season and day-based lengths expressed in windows of ``window_s`` seconds."""
        per_day = max(1, round(86400 / window_s))
        base = dict(season_length=per_day, fit_windows=7 * per_day, mstl_fit_windows=4 * per_day,
                    ets_fit_windows=2 * per_day)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class SeriesForecast:
    point: tuple[float, ...]
    upper: tuple[float, ...]
    method: str
    note: str
    history_windows: int
    errors: dict[str, float] = field(default_factory=dict)  # rolling MAE per scored method


class SeriesForecaster:
    """Forecasting state of one series: history, each method's fitted model, pending predictions, errors."""

    def __init__(self, config: ForecastConfig, history: Iterable[float] = ()):
        self.config = config
        self.history: deque[float] = deque((float(v) for v in history), maxlen=config.fit_windows)
        self.methods: list[Method] = build_methods(
            config.season_length, config.min_history, config.mstl_fit_windows, config.ets_fit_windows,
            config.refit_every, config.methods)
        self.residuals: dict[str, deque[float]] = {
            name: deque(maxlen=config.score_windows) for name in [m.name for m in self.methods] + ["ensemble"]}
        self.pending: dict[str, float] = {}  # method -> its prediction for the next observation
        self.failures: dict[str, str] = {}  # method -> why it failed on the last forecast

    @classmethod
    def replay(cls, config: ForecastConfig, history: Sequence[float], backtest_windows: int | None = None):
        """Start from stored history and score every method on its last ``backtest_windows`` windows, so
        the first forecast after a restart is already selected by backtest."""
        k = min(len(history), config.score_windows if backtest_windows is None else backtest_windows)
        fc = cls(config, history[:len(history) - k])
        for value in history[len(history) - k:]:
            if len(fc.history) >= config.min_history:
                fc.predict_all(1)
            fc.observe(value)
        return fc

    def observe(self, value: float) -> None:
        """A window closed with ``value``: score what each method predicted for it."""
        for name, predicted in self.pending.items():
            self.residuals[name].append(value - predicted)
        self.pending = {}
        self.history.append(float(value))

    def predict_all(self, h: int) -> dict[str, np.ndarray]:
        """Every method that has enough history; a method that fails is left out (and noted)."""
        y = np.fromiter(self.history, dtype=float, count=len(self.history))
        out, self.failures = {}, {}
        for method in self.methods:
            if len(y) < method.min_history():
                continue
            try:
                p = np.maximum(np.asarray(method.predict(y, h), dtype=float), 0.0)
            except Exception as exc:  # a numerical failure of one model must not stop the round
                self.failures[method.name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if np.all(np.isfinite(p)):
                out[method.name] = p
        members = [p for name, p in out.items() if name in ENSEMBLE_OF]
        if "ensemble" in self.config.methods and len(members) >= 2:
            out["ensemble"] = np.mean(members, axis=0)
        self.pending = {name: float(p[0]) for name, p in out.items()}
        return out

    def errors(self) -> dict[str, float]:
        return {name: float(np.mean(np.abs(r))) for name, r in self.residuals.items()
                if len(r) >= self.config.min_scored}

    def forecast(self) -> SeriesForecast:
        cfg, n = self.config, len(self.history)
        h = cfg.horizon
        if n < cfg.min_history:
            point = RecentLevel().predict(np.array(self.history), h)
            recent_max = max(list(self.history)[-3:], default=0.0)
            upper = np.maximum(point * (1 + cfg.fallback_margin), recent_max)
            return SeriesForecast(_round(point), _round(upper), "recent-level",
                                  f"fallback: {n} of {cfg.min_history} windows of history, forecasting the recent level",
                                  n)
        predictions = self.predict_all(h)
        if not predictions:  # every model failed: say so and keep serving a level
            point = RecentLevel().predict(np.array(self.history), h)
            return SeriesForecast(_round(point), _round(point * (1 + cfg.fallback_margin)), "recent-level",
                                  f"fallback: every method failed ({self.failures})", n)
        errors = self.errors()
        scored = {m: e for m, e in errors.items() if m in predictions}
        if scored:
            method = min(scored, key=lambda m: (scored[m], list(predictions).index(m)))
            note = f"selected by rolling backtest over {len(self.residuals[method])} windows"
        else:
            method = _preferred(predictions)
            note = f"no method scored on {cfg.min_scored} windows yet; using {method}"
        point = predictions[method]
        residuals = self.residuals[method]
        if len(residuals) >= cfg.min_scored:
            q = max(0.0, float(np.quantile(np.array(residuals), cfg.upper_quantile)))
            upper = point + q * np.sqrt(np.arange(1, h + 1))  # errors grow with the lead, roughly as a random walk
        else:
            upper = point * (1 + cfg.fallback_margin)
        return SeriesForecast(_round(point), _round(np.maximum(upper, point)), method, note, n, errors)


class ModelForecaster:
    """A model's two series: average and peak concurrency per window."""

    def __init__(self, avg: SeriesForecaster, peak: SeriesForecaster):
        self.avg, self.peak = avg, peak

    @classmethod
    def empty(cls, config: ForecastConfig) -> ModelForecaster:
        return cls(SeriesForecaster(config), SeriesForecaster(config))

    @classmethod
    def replay(cls, config: ForecastConfig, history: Sequence[WindowObservation],
               backtest_windows: int | None = None) -> ModelForecaster:
        return cls(SeriesForecaster.replay(config, [o.avg for o in history], backtest_windows),
                   SeriesForecaster.replay(config, [o.peak for o in history], backtest_windows))

    def observe(self, obs: WindowObservation) -> None:
        self.avg.observe(obs.avg)
        self.peak.observe(obs.peak)

    def forecast(self) -> tuple[SeriesForecast, SeriesForecast]:
        return self.avg.forecast(), self.peak.forecast()


def _preferred(predictions: dict[str, np.ndarray]) -> str:
    for name in ("mstl", "autoets", "paper", "naive", "seasonal-naive"):
        if name in predictions:
            return name
    return next(iter(predictions))


def _round(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


# ---- accuracy ------------------------------------------------------------------------------------

UNDER_THRESHOLD = 0.2


def accuracy(observed: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """MAPE over windows with load, the share of those windows under-predicted by more than 20%, and the
    mean over-prediction (what headroom costs).

    Windows with zero observed load have no percentage error; ``windows`` says how many counted.
    """
    o, p = np.asarray(observed, dtype=float), np.asarray(predicted, dtype=float)
    mask = (o > 0) & np.isfinite(p)
    if not mask.any():
        return {"mape": math.nan, "under_20pct": math.nan, "over": math.nan, "windows": 0}
    o, p = o[mask], p[mask]
    return {"mape": float(np.mean(np.abs(p - o) / o)),
            "under_20pct": float(np.mean(p < (1 - UNDER_THRESHOLD) * o)),
            "over": float(np.mean(np.maximum(p - o, 0) / o)),  # the price of headroom: capacity held idle
            "windows": int(mask.sum())}
