"""Per-series load forecasting with per-series method selection by rolling backtest (docs/design.md, "Forecasting").

A ``SeriesForecaster`` holds one series (a model's average or peak concurrency per window). Each time a
window closes it is told the observed value (``observe``): every method's pending one-step prediction is
scored against it, so the rolling backtest comes for free in steady state. ``forecast`` runs every
available method, picks the one with the lowest mean absolute percentage error over the last ``score_windows``
windows. The upper is a quantile of each window's load from ``SeriesBand`` (``band.py``: split-conformal
around a time-of-day base, per lead), or, until the band has been scored, the selected method's point plus
a quantile of its own recent errors. With too little history it falls back to the recent level and says
so in ``note``.

The forecaster service, the backtest command and the simulator all drive this one class.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.policy.band import BandConfig, SeriesBand
from shared.policy.forecast_methods import Method, RecentLevel, build_methods

ALL_METHODS = ("naive", "seasonal-naive", "paper", "autoets", "mstl", "ensemble")
ENSEMBLE_OF = ("naive", "paper", "autoets", "mstl")  # the mean of those available: forecast combination
BAND_BASES = ("mstl",)  # methods whose point forecast the band also tries as a base


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
    upper_quantile: float = 0.97  # of the window's load: the upper band (before the band is scored: of errors)
    min_history: int = 12  # windows before any model is fitted; fewer -> recent level
    score_windows: int = 48  # rolling-backtest length used to select a method and size the band
    min_scored: int = 6  # scored windows a method needs before it can be selected
    refit_every: int = 12  # fitted models are refitted this often, applied with forward() between
    fit_windows: int = 7 * 288  # history kept per series (the paper's method averages up to 7 days)
    mstl_fit_windows: int = 4 * 288  # MSTL decomposes the last four days (cost is linear in length)
    ets_fit_windows: int = 2 * 288  # AutoETS's model search on the last two days only (cost)
    fallback_margin: float = 0.25  # upper = point x (1 + margin) until errors have been scored
    switch_margin: float = 0.2  # another method replaces the last value only with a rolling error this much lower
    methods: tuple[str, ...] = ALL_METHODS

    def band(self) -> BandConfig:
        return BandConfig(season_length=self.season_length, quantile=self.upper_quantile, window=self.fit_windows)

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
    errors: dict[str, float] = field(default_factory=dict)  # rolling error per scored method (MAPE, else MAE)


class SeriesForecaster:
    """Forecasting state of one series: history, each method's fitted model, pending predictions, errors."""

    def __init__(self, config: ForecastConfig, history: Iterable[float] = ()):
        self.config = config
        self.history: deque[float] = deque((float(v) for v in history), maxlen=config.fit_windows)
        self.methods: list[Method] = build_methods(
            config.season_length, config.min_history, config.mstl_fit_windows, config.ets_fit_windows,
            config.refit_every, config.methods)
        names = [m.name for m in self.methods] + ["ensemble"]
        self.residuals: dict[str, deque[float]] = {name: deque(maxlen=config.score_windows) for name in names}
        # |error| / observed per window (NaN for a window without load): what selection compares
        self.relative: dict[str, deque[float]] = {name: deque(maxlen=config.score_windows) for name in names}
        self.pending: dict[str, float] = {}  # method -> its prediction for the next observation
        self.failures: dict[str, str] = {}  # method -> why it failed on the last forecast
        self.band = SeriesBand(config.band())
        if self.history:
            self.band.replay(self._y(), config.horizon, len(self.history))

    @classmethod
    def replay(cls, config: ForecastConfig, history: Sequence[float], backtest_windows: int | None = None):
        """Start from stored history and score every method on its last ``backtest_windows`` windows, so
        the first forecast after a restart is already selected by backtest."""
        k = min(len(history), config.score_windows if backtest_windows is None else backtest_windows)
        fc = cls(config, history[:len(history) - k])
        for value in history[len(history) - k:]:
            if len(fc.history) >= config.min_history:
                fc.predict_all(1)
            fc.band.upper(fc._y(), config.horizon)
            fc.observe(value)
        return fc

    def observe(self, value: float) -> None:
        """A window closed with ``value``: score what each method predicted for it."""
        for name, predicted in self.pending.items():
            self.residuals[name].append(value - predicted)
            self.relative[name].append(abs(value - predicted) / value if value > 0 else math.nan)
        self.pending = {}
        self.history.append(float(value))
        self.band.observe(float(value))

    def _y(self) -> np.ndarray:
        return np.fromiter(self.history, dtype=float, count=len(self.history))

    def predict_all(self, h: int) -> dict[str, np.ndarray]:
        """Every method that has enough history; a method that fails is left out (and noted)."""
        y = self._y()
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
        """Each scored method's rolling mean absolute percentage error over windows with load, the measure
        selection compares. Loads span an order of magnitude over a day: an absolute error would let the
        busiest hours alone pick the method. Where the windows with load are too few to say, the mean
        absolute error over every window."""
        enough = self.config.min_scored
        relative = {name: r for name, r in self.relative.items() if np.count_nonzero(~np.isnan(r)) >= enough}
        scored = {name: r for name, r in self.residuals.items() if len(r) >= enough}
        if scored and set(scored) <= set(relative):
            return {name: float(np.nanmean(np.array(relative[name]))) for name in scored}
        return {name: float(np.mean(np.abs(r))) for name, r in scored.items()}

    def forecast(self) -> SeriesForecast:
        cfg, n = self.config, len(self.history)
        h = cfg.horizon
        if n < cfg.min_history:
            band = self.band.upper(self._y(), h)
            point = RecentLevel().predict(np.array(self.history), h)
            recent_max = max(list(self.history)[-3:], default=0.0)
            upper = _banded(band, np.maximum(point * (1 + cfg.fallback_margin), recent_max))
            return SeriesForecast(_round(point), _round(np.maximum(upper, point)), "recent-level",
                                  f"fallback: {n} of {cfg.min_history} windows of history, forecasting the recent level",
                                  n)
        predictions = self.predict_all(h)
        band = self.band.upper(self._y(), h, {m: predictions[m] for m in BAND_BASES if m in predictions})
        if not predictions:  # every model failed: say so and keep serving a level
            point = RecentLevel().predict(np.array(self.history), h)
            upper = _banded(band, point * (1 + cfg.fallback_margin))
            return SeriesForecast(_round(point), _round(np.maximum(upper, point)), "recent-level",
                                  f"fallback: every method failed ({self.failures})", n)
        errors = self.errors()
        scored = {m: e for m, e in errors.items() if m in predictions}
        if scored:
            # parsimony: near a random walk the methods take turns looking best on a rolling window, and
            # following that noise costs more than it gains; the last value yields only to a clear winner
            def cost(m: str) -> tuple[float, int]:
                return scored[m] * (1.0 if m == "naive" else 1.0 + cfg.switch_margin), list(predictions).index(m)
            method = min(scored, key=cost)
            note = f"selected by rolling backtest over {len(self.residuals[method])} windows"
        else:
            method = _preferred(predictions)
            note = f"no method scored on {cfg.min_scored} windows yet; using {method}"
        point = predictions[method]
        residuals = self.residuals[method]
        if len(residuals) >= cfg.min_scored:
            q = max(0.0, float(np.quantile(np.array(residuals), cfg.upper_quantile)))
            unbanded = point + q * np.sqrt(np.arange(1, h + 1))  # errors grow with the lead, roughly as a random walk
        else:
            unbanded = point * (1 + cfg.fallback_margin)
        upper = _banded(band, unbanded)
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


def _banded(band: list[float | None], fallback: np.ndarray) -> np.ndarray:
    """The band's upper where it has one, the fallback's elsewhere."""
    return np.array([f if b is None else b for b, f in zip(band, fallback)])


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


@dataclass(frozen=True)
class BandScore:
    """Coverage against headroom (docs/forecasting.md, "The score").

    ``miss``: the share of windows whose load exceeded the upper by more than ``slack`` (the coverage the
    target bounds); ``over``: the mean over-provisioning max(upper - load, 0) / load. ``margin`` is the
    fixed margin that "last value x (1 + margin)" needs to miss no more windows than the band did, on the
    same windows (chosen in hindsight: the baseline at its best), ``margin_over`` its over-provisioning,
    and ``ratio`` = over / margin_over. ``margin`` is None where no margin can match (a last value of zero
    under load cannot be raised by a factor)."""

    windows: int
    miss: float
    over: float
    margin: float | None
    margin_miss: float | None
    margin_over: float | None
    ratio: float | None


def band_score(observed: Sequence[float], upper: Sequence[float], last: Sequence[float],
               slack: float = UNDER_THRESHOLD) -> BandScore:
    """Score a band against the last value plus the fixed margin matched to its coverage."""
    o, u, lv = (np.asarray(x, dtype=float) for x in (observed, upper, last))
    mask = (o > 0) & np.isfinite(u) & np.isfinite(lv)
    o, u, lv = o[mask], u[mask], lv[mask]
    n = len(o)
    if n == 0:
        return BandScore(0, math.nan, math.nan, None, None, None, None)
    miss = float(np.mean(o > (1 + slack) * u))
    over = float(np.mean(np.maximum(u - o, 0) / o))
    # the margin misses window i when o_i > (1 + slack)(1 + m) last_i: with r_i = o_i / ((1 + slack) last_i)
    # sorted high to low, 1 + m = r_k lets exactly the k windows above r_k through, k = floor(miss n)
    with np.errstate(divide="ignore"):
        r = np.sort(np.where(lv > 0, o / ((1 + slack) * lv), np.inf))[::-1]
    k = math.floor(miss * n + 1e-9)
    factor = float(r[k]) if k < n else 0.0
    if not math.isfinite(factor):
        return BandScore(n, miss, over, None, None, None, None)
    margin_upper = lv * factor
    margin_over = float(np.mean(np.maximum(margin_upper - o, 0) / o))
    return BandScore(n, miss, over, factor - 1, float(np.mean(o > (1 + slack) * margin_upper)), margin_over,
                     over / margin_over if margin_over > 0 else None)
