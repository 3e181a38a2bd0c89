"""Forecasting methods behind one small interface: the next ``h`` windows of a series from its past.

statsforecast provides MSTL, AutoETS, SeasonalNaive and Naive; the WarmServe paper's method is ours
(it is a few lines). Fitted models are refitted every ``refit_every`` calls and otherwise applied to the
new data with ``forward`` (same parameters, new observations), which is what keeps a 256-model round
cheap (docs/forecasting.md has the measured costs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np


class Method:
    """A forecasting method: ``predict(y, h)`` returns ``h`` values after the end of ``y``."""

    name: str = ""

    def min_history(self) -> int:
        return 1

    def predict(self, y: np.ndarray, h: int) -> np.ndarray:
        raise NotImplementedError


class RecentLevel(Method):
    """The fallback with little history: the mean of the last few windows."""

    name = "recent-level"

    def __init__(self, lookback: int = 3):
        self.lookback = lookback

    def predict(self, y: np.ndarray, h: int) -> np.ndarray:
        return np.full(h, float(np.mean(y[-self.lookback:])) if len(y) else 0.0)


class StatsMethod(Method):
    """A statsforecast model, fitted on the last ``fit_windows`` values and refitted every ``refit_every``
    calls (1 = fit every time: right for the trivial models, whose fit is the forecast)."""

    def __init__(self, name: str, factory: Callable[[], object], min_history: int, fit_windows: int,
                 refit_every: int = 1):
        self.name = name
        self._factory = factory
        self._min_history = min_history
        self.fit_windows = fit_windows
        self.refit_every = refit_every
        self._model = None
        self._calls_since_fit = 0

    def min_history(self) -> int:
        return self._min_history

    def predict(self, y: np.ndarray, h: int) -> np.ndarray:
        tail = np.asarray(y[-self.fit_windows:], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter from the optimisers
            if self.refit_every <= 1:
                return self._factory().forecast(y=tail, h=h)["mean"]
            if self._model is None or self._calls_since_fit >= self.refit_every:
                model = self._factory()
                model.fit(tail)
                self._model, self._calls_since_fit = model, 1
                return model.predict(h=h)["mean"]
            self._calls_since_fit += 1
            return self._model.forward(y=tail, h=h)["mean"]


class PaperMethod(Method):
    """WarmServe paper: the same time-of-day slot averaged over previous days, plus the weighted mean of
    the last ``points`` windows' errors against that profile, weights 2^-delta (newest weighs most)."""

    name = "paper"

    def __init__(self, season_length: int, max_days: int = 7, points: int = 10):
        self.season = season_length
        self.max_days = max_days
        self.points = points

    def min_history(self) -> int:
        return self.season + 1

    def _profile(self, y: np.ndarray, t: int) -> float | None:
        """Mean of y at t - d*season for the previous days that exist (t may be past the end of y)."""
        idx = [t - d * self.season for d in range(1, self.max_days + 1) if 0 <= t - d * self.season < len(y)]
        return float(np.mean(y[idx])) if idx else None

    def predict(self, y: np.ndarray, h: int) -> np.ndarray:
        n = len(y)
        num = den = 0.0
        for delta in range(self.points):
            t = n - 1 - delta
            base = self._profile(y, t) if t >= 0 else None
            if base is None:
                break
            w = 2.0 ** -delta
            num += w * (y[t] - base)
            den += w
        correction = num / den if den else 0.0
        return np.array([(self._profile(y, n + k) or 0.0) + correction for k in range(h)])


def stl_jumps(season_length: int, seasonal_window: int = 11) -> dict[str, int]:
    """R's stl() defaults (every smoother evaluated at a tenth of its span, the rest interpolated):
    about 20x faster than statsmodels' default of every point, with the same decomposition to 0.1%."""
    trend = math.ceil(1.5 * season_length / (1 - 1.5 / seasonal_window))
    trend += 1 - trend % 2
    low_pass = season_length + 1 - season_length % 2
    return {"seasonal_jump": math.ceil(seasonal_window / 10), "trend_jump": math.ceil(trend / 10),
            "low_pass_jump": math.ceil(low_pass / 10)}


def build_methods(season_length: int, min_history: int, mstl_fit_windows: int, ets_fit_windows: int,
                  refit_every: int, names: tuple[str, ...]) -> list[Method]:
    """The candidate methods (statsforecast is imported here: 1.5 s that only the forecaster pays)."""
    from statsforecast.models import MSTL, AutoETS, Naive, SeasonalNaive

    s = season_length
    jumps = stl_jumps(s)
    every = {
        "autoets": lambda: StatsMethod("autoets", lambda: AutoETS(model="ZZN"), min_history, ets_fit_windows,
                                       refit_every),
        # the deseasonalised remainder of a load series is a level: simple exponential smoothing (ANN)
        # fits it for a tenth of the cost of AutoETS's model search
        "mstl": lambda: StatsMethod("mstl", lambda: MSTL(s, trend_forecaster=AutoETS(model="ANN"), stl_kwargs=jumps),
                                    2 * s, mstl_fit_windows, refit_every),
        "paper": lambda: PaperMethod(s),
        "seasonal-naive": lambda: StatsMethod("seasonal-naive", lambda: SeasonalNaive(s), s, s),
        "naive": lambda: StatsMethod("naive", lambda: Naive(), 1, 1),
    }
    unknown = set(names) - set(every) - {"ensemble"}  # the ensemble is built from the others' forecasts
    if unknown:
        raise ValueError(f"unknown forecasting methods {sorted(unknown)}; known: {', '.join(every)}")
    return [every[n]() for n in every if n in names]
