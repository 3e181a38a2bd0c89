"""The upper band: a quantile of each coming window's load, sized for the lead it is asked at.

At five-minute windows a model's load moves close to a random walk, so the point forecast barely beats the
last value; what pays is an upper band that holds less idle headroom for the same coverage
(docs/forecasting.md, "The upper band"). The band here is split-conformal over rolling residuals, per lead:

- a **base**, what the window's load is about: the *seasonal* base is the same time of day over up to seven
  previous days (the mean of log load over a few neighbouring windows), shifted by how far the last few
  windows ran above or below their own time of day; the *level* base is an exponential moving average of
  recent windows; the *last* base is the last window; the caller may add more (the forecaster adds MSTL's
  point forecast, a fitted daily decomposition);
- for each base and each lead L, the log ratios log(observed / base) of the base's past L-step predictions;
- each base's upper for lead L is the base times exp(the ``quantile`` of those ratios), and the band is the
  base whose upper would have held the least headroom (mean upper / observed) over the windows all
  candidates were scored on. Every candidate is calibrated to the same quantile, so the narrowest wins.

The seasonal base follows ramps and quiet nights, so on a series with a daily shape its ratios are narrow;
a smoothed base also removes the last window's own noise, which a "last value plus margin" band has to
cover twice; on a random walk the last window is the best base and is chosen. A base takes part once it has
``min_residuals`` scored windows at a lead; before any has, the upper is ``None`` (the caller's fallback).

Pure and stateful: the forecaster service, the backtest and the simulator drive it through
``SeriesForecaster``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BandConfig:
    season_length: int = 288  # windows per day
    quantile: float = 0.97  # of the window's load: the upper is exceeded in about 3% of windows
    window: int = 7 * 288  # residuals kept per base and lead (a week)
    min_residuals: int = 24  # scored windows a base needs at a lead before its band is used
    days: int = 7  # previous days averaged into the time-of-day profile
    neighbours: int = 2  # windows either side of the same time of day averaged with it
    recent: int = 6  # windows whose deviation from their profile shifts the seasonal base
    level_alpha: float = 0.5  # weight of the newest window in the level base
    floor: float = 0.5  # load (concurrency) below which ratios are taken against this instead


class SeriesBand:
    """Bases predicted for windows not yet observed, and each (base, lead)'s residuals."""

    def __init__(self, config: BandConfig):
        self.config = config
        self.observed = 0  # index of the next observation
        self.pending: dict[int, dict[tuple[str, int], float]] = {}  # observation index -> (base, lead) -> base
        self.residuals: dict[tuple[str, int], deque[float]] = {}

    def observe(self, value: float) -> None:
        """A window closed: score every base predicted for it, at the lead it was predicted."""
        floor = self.config.floor
        for key, base in self.pending.pop(self.observed, {}).items():
            ratios = self.residuals.setdefault(key, deque(maxlen=self.config.window))
            ratios.append(math.log(max(value, floor) / max(base, floor)))
        self.observed += 1

    def upper(self, history: np.ndarray, h: int, extra: dict[str, np.ndarray] | None = None) -> list[float | None]:
        """The upper for each of the next ``h`` windows (``None`` where no base has been scored enough),
        recording the bases so that the windows score them when they close. ``extra``: more bases, such as a
        fitted model's point forecast, scored and chosen the same way."""
        y = np.asarray(history, dtype=float)
        bases = {"seasonal": self.seasonal_bases(y, h), "level": self.level_bases(y, h),
                 "last": np.full(h, float(y[-1])) if len(y) else None, **(extra or {})}
        out: list[float | None] = []
        for k in range(h):
            lead = k + 1
            slot = self.pending.setdefault(self.observed + k, {})
            candidates = []
            for name, base in bases.items():
                if base is None:
                    continue
                slot[(name, lead)] = float(base[k])
                ratios = self.residuals.get((name, lead), ())
                if len(ratios) >= self.config.min_residuals:
                    candidates.append((float(base[k]), np.fromiter(ratios, dtype=float)))
            out.append(self._narrowest(candidates))
        return out

    def _narrowest(self, candidates: list[tuple[float, np.ndarray]]) -> float | None:
        """The upper of the candidate base whose band held the least headroom on recent windows."""
        if not candidates:
            return None
        common = min(len(r) for _, r in candidates)
        best = None
        for base, ratios in candidates:
            q = float(np.quantile(ratios, self.config.quantile))
            headroom = float(np.mean(np.exp(q - ratios[-common:])))
            if best is None or headroom < best[0]:
                best = (headroom, base, q)
        _, base, q = best
        if base <= 0.0:  # nothing in any window the base looked at: an idle model stays unplanned
            return 0.0
        return max(base, self.config.floor) * math.exp(q)

    def replay(self, history: np.ndarray, h: int, windows: int) -> None:
        """Score both bases on the last ``windows`` windows of ``history`` as if the band had run through
        them (a restart keeps its band). Vectorised: a week of history for 256 models takes seconds."""
        y = np.asarray(history, dtype=float)
        n, cfg = len(y), self.config
        first = max(n - windows, 1)
        level = ewma(y, cfg.level_alpha)  # level[t]: the level base made after observing y[:t+1]
        seasonal = seasonal_history(y, cfg, h)  # seasonal[k][t]: the base made after y[:t] for window t + k
        floor = cfg.floor
        logs_obs = np.log(np.maximum(y, floor))
        for k in range(h):
            lead = k + 1
            targets = np.arange(first + k, n)  # windows observed that were predicted k windows ahead
            if len(targets) == 0:
                continue
            made = targets - k  # the forecast for them was made with y[:made]
            for name, base in (("level", level[made - 1]), ("last", y[made - 1])):
                self._extend((name, lead), logs_obs[targets] - np.log(np.maximum(base, floor)))
            if k < len(seasonal):
                sv = seasonal[k][made]
                ok = np.isfinite(sv)
                self._extend(("seasonal", lead), logs_obs[targets][ok] - np.log(np.maximum(sv[ok], floor)))
        self.observed = n

    def _extend(self, key: tuple[str, int], ratios: np.ndarray) -> None:
        self.residuals.setdefault(key, deque(maxlen=self.config.window)).extend(float(r) for r in ratios)

    def level_bases(self, y: np.ndarray, h: int) -> np.ndarray | None:
        if len(y) == 0:
            return None
        return np.full(h, ewma(y[-30:], self.config.level_alpha)[-1])  # (1 - alpha)^30 is negligible

    def seasonal_bases(self, y: np.ndarray, h: int) -> np.ndarray | None:
        cfg = self.config
        n = len(y)
        if n < cfg.season_length + cfg.recent + cfg.neighbours:
            return None
        logs = np.log(np.maximum(y, cfg.floor))
        profile, busy = _profile(y, logs, cfg, np.arange(n - cfg.recent, n + h))
        shift = float(np.mean(logs[n - cfg.recent:] - profile[:cfg.recent]))
        busy_recently = bool(np.any(y[n - cfg.recent:] > 0))
        level = profile[cfg.recent:]
        return np.where(busy[cfg.recent:] | busy_recently, np.exp(level + shift), 0.0)


def _profile(y: np.ndarray, logs: np.ndarray, cfg: BandConfig, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each index in ``at``: the mean log load at its time of day over the previous ``days`` days
    (``neighbours`` windows either side), and whether any of those windows had load. Only observed
    windows (indices below ``len(y)``) count; NaN where none exists."""
    n, s, kk = len(y), cfg.season_length, cfg.neighbours
    total = np.zeros(len(at))
    count = np.zeros(len(at))
    busy = np.zeros(len(at), dtype=bool)
    for d in range(1, cfg.days + 1):
        for off in range(-kk, kk + 1):
            x = at - d * s + off
            ok = (x >= 0) & (x < n)
            xs = x[ok]
            total[ok] += logs[xs]
            count[ok] += 1
            busy[ok] |= y[xs] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, busy


def seasonal_history(y: np.ndarray, cfg: BandConfig, h: int) -> list[np.ndarray]:
    """``out[k][t]``: the seasonal base a forecast made after observing ``y[:t]`` gave window ``t + k``
    (NaN where it had too little history). Causal for ``k + neighbours < season_length``: a window's
    profile then only reads windows observed before the forecast was made; later leads are left out."""
    n, r = len(y), cfg.recent
    logs = np.log(np.maximum(y, cfg.floor))
    idx = np.arange(n + h)
    profile, busy = _profile(y, logs, cfg, idx)
    dev = logs - profile[:n]
    out = []
    made = np.arange(n)
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(dev))])
    pos = np.concatenate([[0], np.cumsum(y > 0)])
    for k in range(min(h, cfg.season_length - cfg.neighbours)):
        base = np.full(n, np.nan)
        ok = made >= cfg.season_length + r + cfg.neighbours
        m = made[ok]
        shift = (csum[m] - csum[m - r]) / r
        busy_recently = (pos[m] - pos[m - r]) > 0
        target = m + k
        base[ok] = np.where(busy[target] | busy_recently, np.exp(profile[target] + shift), 0.0)
        out.append(base)
    return out


def ewma(y: np.ndarray, alpha: float) -> np.ndarray:
    """``out[i]``: the exponential moving average after observing ``y[:i + 1]``."""
    out = np.empty(len(y))
    s = float(y[0]) if len(y) else 0.0
    for i, v in enumerate(y):
        s = alpha * float(v) + (1 - alpha) * s
        out[i] = s
    return out
