"""Time-weighted concurrency of a model (the quantity that sizes instances, docs/design.md, "Forecasting").

The caller passes every timestamp in, so the same tracker works live and in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class IntervalStats:
    start_s: float
    interval_s: float
    arrivals: int
    completions: int
    concurrency_avg: float
    concurrency_peak: int


class ConcurrencyTracker:
    """Counts arrivals and completions and integrates in-flight requests over time."""

    def __init__(self, start_s: float):
        self.in_flight = 0
        self._start = start_s
        self._last = start_s
        self._area = 0.0
        self._peak = 0
        self._arrivals = 0
        self._completions = 0

    def _advance(self, now_s: float) -> None:
        if now_s > self._last:
            self._area += self.in_flight * (now_s - self._last)
            self._last = now_s

    def arrive(self, now_s: float) -> None:
        self._advance(now_s)
        self.in_flight += 1
        self._arrivals += 1
        self._peak = max(self._peak, self.in_flight)

    def complete(self, now_s: float) -> None:
        self._advance(now_s)
        self.in_flight = max(self.in_flight - 1, 0)
        self._completions += 1

    def roll(self, now_s: float) -> IntervalStats:
        """Close the current interval at ``now_s`` and start the next one."""
        self._advance(now_s)
        span = max(now_s - self._start, 1e-9)
        stats = IntervalStats(self._start, span, self._arrivals, self._completions,
                              self._area / span, self._peak)
        self._start = self._last = now_s
        self._area = 0.0
        self._peak = self.in_flight
        self._arrivals = self._completions = 0
        return stats

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self._arrivals == 0 and self._completions == 0


def concurrency_windows(arrival_s: np.ndarray, duration_s: np.ndarray, start_s: float, window_s: float,
                        n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted average and peak in-flight requests per window, from arrivals and service times.

    This is what the forecaster observes live (from gateways' arrivals and completions); offline, a
    trace's arrivals and modelled service times give the same series. Windows are
    ``[start_s + i * window_s, start_s + (i + 1) * window_s)``. At equal times a completion is counted
    before an arrival, so back-to-back requests do not inflate the peak.
    """
    arrival_s = np.asarray(arrival_s, dtype=float)
    ends = arrival_s + np.asarray(duration_s, dtype=float)
    times = np.concatenate([ends, arrival_s])
    steps = np.concatenate([-np.ones(len(ends)), np.ones(len(arrival_s))])
    order = np.lexsort((steps, times))  # by time, completions (-1) first
    times, level = times[order], np.cumsum(steps[order])
    # area under the level curve up to each event
    area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))]) if len(times) else np.zeros(0)
    edges = start_s + window_s * np.arange(n_windows + 1)

    def area_at(t: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(times, t, side="right") - 1
        safe = np.clip(idx, 0, None)
        return np.where(idx >= 0, area[safe] + level[safe] * (t - times[safe]), 0.0) if len(times) else np.zeros(len(t))

    avg = np.diff(area_at(edges)) / window_s
    # level in force at each window's start (after events at that instant), then the highest level
    # reached by events strictly inside the window
    first = np.searchsorted(times, edges[:-1], side="right")
    last = np.searchsorted(times, edges[1:], side="left")
    before = first - 1
    peak = np.where(before >= 0, level[np.clip(before, 0, None)] if len(level) else 0.0, 0.0)
    for i in np.nonzero(last > first)[0]:
        peak[i] = max(peak[i], level[first[i]:last[i]].max())
    return np.maximum(avg, 0.0), np.maximum(peak, 0.0)
