"""Time-weighted concurrency of a model (the quantity that sizes instances, DESIGN 2.2).

The caller passes every timestamp in, so the same tracker works live and in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass


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
