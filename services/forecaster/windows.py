"""Per-model windows of concurrency built from gateways' per-second demand samples."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from shared.messages import DemandSample
from shared.policy.forecast import WindowObservation


@dataclass
class _Open:
    area: float = 0.0  # integral of concurrency over time, summed over gateways
    arrivals: int = 0
    peak_by_second: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    seen: set[tuple[str, int]] = field(default_factory=set)  # (gateway, start in ms) of the samples counted


class WindowBook:
    """Accumulates samples into aligned windows and closes them into observations.

    Every window of a model that has been seen is closed in order, idle ones as zero, so a model
    that goes quiet is forecast down instead of keeping its last busy value. Samples that arrive
    for an already closed window are counted in ``late`` and dropped, and a sample counted already (a
    gateway's retry after an outage, a redelivery) in ``duplicates``.
    """

    def __init__(self, window_s: float, keep: int = 7 * 288):
        self.window_s = window_s
        self.keep = keep  # an outage longer than this many windows is filled with this many zeros
        self.open: dict[tuple[str, float], _Open] = {}
        self.next_start: dict[str, float] = {}  # model -> first window not closed yet
        self.late = 0
        self.duplicates = 0

    def resume(self, model: str, next_start_s: float) -> None:
        """Windows before ``next_start_s`` are already closed (and stored): samples for them are late."""
        self.next_start[model] = max(self.next_start.get(model, float("-inf")), next_start_s)

    def forget(self, model: str) -> None:
        self.next_start.pop(model, None)
        for key in [k for k in self.open if k[0] == model]:
            del self.open[key]

    def window_of(self, t_s: float) -> float:
        return (t_s // self.window_s) * self.window_s

    def add(self, s: DemandSample) -> None:
        start = self.window_of(s.start_s)
        if start < self.next_start.get(s.model, float("-inf")):
            self.late += 1
            return
        w = self.open.setdefault((s.model, start), _Open())
        key = (s.gateway_id, round(s.start_s * 1000))
        if key in w.seen:
            self.duplicates += 1
            return
        w.seen.add(key)
        w.area += s.concurrency_avg * s.interval_s
        w.arrivals += s.arrivals
        w.peak_by_second[int(s.start_s)] += s.concurrency_peak  # gateways' peaks add up within a second

    def close(self, now_s: float, grace_s: float = 2.0) -> list[tuple[str, WindowObservation]]:
        """Close every window that ended more than ``grace_s`` ago (late samples get that long)."""
        complete_before = self.window_of(now_s - grace_s)  # windows starting before this have ended
        closed = []
        for model in sorted(set(self.next_start) | {m for m, _ in self.open}):
            t = self.next_start.get(model)
            if t is None:
                t = min(start for m, start in self.open if m == model)
            t = max(t, complete_before - self.keep * self.window_s)  # older gaps would fall out anyway
            while t < complete_before:
                w = self.open.pop((model, t), None)
                obs = WindowObservation(start_s=t, avg=w.area / self.window_s if w else 0.0,
                                        peak=max(w.peak_by_second.values(), default=0.0) if w else 0.0,
                                        arrivals=w.arrivals if w else 0)
                closed.append((model, obs))
                t += self.window_s
            self.next_start[model] = t
        for key in [k for k in self.open if k[1] < self.next_start.get(k[0], float("-inf"))]:
            del self.open[key]  # left behind by the bound on gaps
        return closed
