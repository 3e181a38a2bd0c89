"""Placing a trace's windows as a model's history, right before a given window boundary (``warmserve forecast
import``, and the replays that seed the forecaster)."""

from __future__ import annotations

from shared.policy.forecast import WindowObservation


def place_before(series: list[WindowObservation], window_s: float, end_s: float) -> list[WindowObservation]:
    """Place windows in order so the last one ends at ``end_s``: history that leads straight into what
    comes next (a replay that continues the same synthetic workload), whatever its time of day."""
    n = len(series)
    return [WindowObservation(end_s - (n - i) * window_s, o.avg, o.peak, o.arrivals) for i, o in enumerate(series)]


def align_before(series: list[WindowObservation], window_s: float, end_s: float) -> list[WindowObservation]:
    """Place a trace's windows so they end at ``end_s`` (a window boundary), keeping time of day.

    A trace's t=0 is a midnight. Target window T takes the trace window at ``(T - midnight) mod length``,
    i.e. the trace is rotated rather than shifted, so history is contiguous up to ``end_s`` and a window's
    time of day is the one it had in the trace (exact when the trace length is whole days).
    """
    n = len(series)
    length = n * window_s
    midnight = (end_s // 86400) * 86400
    out = []
    for i in range(n):
        t = end_s - (n - i) * window_s
        src = int(round(((t - midnight) % length) / window_s)) % n
        o = series[src]
        out.append(WindowObservation(t, o.avg, o.peak, o.arrivals))
    return out
