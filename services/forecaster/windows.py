"""Per-model windows of concurrency built from gateways' per-second demand samples."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from shared.messages import DemandSample
from shared.policy.forecast import WindowObservation


@dataclass
class _Open:
    area: float = 0.0  # integral of concurrency over time, summed over gateways
    arrivals: int = 0
    peak_by_second: dict[int, float] = field(default_factory=lambda: defaultdict(float))


class WindowBook:
    """Accumulates samples into aligned windows and closes them into observations."""

    def __init__(self, window_s: float, keep: int = 7 * 288):
        self.window_s = window_s
        self.open: dict[tuple[str, float], _Open] = {}
        self.history: dict[str, deque[WindowObservation]] = defaultdict(lambda: deque(maxlen=keep))

    def window_of(self, t_s: float) -> float:
        return (t_s // self.window_s) * self.window_s

    def add(self, s: DemandSample) -> None:
        w = self.open.setdefault((s.model, self.window_of(s.start_s)), _Open())
        w.area += s.concurrency_avg * s.interval_s
        w.arrivals += s.arrivals
        w.peak_by_second[int(s.start_s)] += s.concurrency_peak  # gateways' peaks add up within a second

    def close(self, now_s: float, grace_s: float = 2.0) -> list[tuple[str, WindowObservation]]:
        """Close every window that ended more than ``grace_s`` ago (late samples get that long)."""
        closed = []
        for (model, start), w in sorted(self.open.items()):
            if start + self.window_s + grace_s <= now_s:
                obs = WindowObservation(start_s=start, avg=w.area / self.window_s,
                                        peak=max(w.peak_by_second.values(), default=0.0))
                self._append(model, obs)
                closed.append((model, obs))
                del self.open[(model, start)]
        return closed

    def _append(self, model: str, obs: WindowObservation) -> None:
        hist = self.history[model]
        if hist:  # windows without traffic are observations of zero
            t = hist[-1].start_s + self.window_s
            while t < obs.start_s and len(hist) < (hist.maxlen or 0):
                hist.append(WindowObservation(t, 0.0, 0.0))
                t += self.window_s
        hist.append(obs)
