"""The forecaster's decisions, free of I/O: the service (``main.py``) and the simulator both drive it.

It keeps the per-model windows of demand (``WindowBook``) and one forecaster pair (average and peak
concurrency) per model, and decides *when* a round runs: once the current window has closed plus a grace for
late samples. ``wake_at`` says when the shell should look again (the next boundary, or sooner for retries
of pending writes); ``due`` whether a round is owed. The next boundary is kept across those wake-ups, so a
window no longer than the retry interval cannot be stepped over. A round closes every finished window
(idle ones as zero), feeds them to the forecasters, forgets models that left the catalog and returns the
closed windows and the new forecasts as data, for the shell to store and publish. Time is passed in.

While the shell is cut off from NATS, gateways keep their samples and publish them once it is back
(``services/gateway/demand.py``); so no round runs from the start of such an outage until
``outage_grace_s`` after its end (the shell passes the intervals it could not see the bus as ``blind``), and
the windows of the outage are closed with those samples in them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.forecaster.windows import WindowBook
from shared.messages import DemandSample, Forecast, ForecastPoint
from shared.policy.forecast import ForecastConfig, ModelForecaster, SeriesForecast, WindowObservation


@dataclass(frozen=True)
class ForecastRoundConfig:
    forecast: ForecastConfig
    window_s: float
    close_grace_s: float = 2.0  # samples for a window are accepted this long after it ends
    retry_interval_s: float = 10.0  # the shell wakes at least this often between rounds
    startup_backtest_windows: int = 12  # windows replayed at (re)build so method selection survives a restart
    outage_grace_s: float = 10.0  # rounds wait this long after an outage of the bus, for buffered samples


@dataclass(frozen=True)
class RoundResult:
    closed: list[tuple[str, WindowObservation]]  # (model, window) closed this round, for history
    forecasts: list[Forecast]


def to_message(model: str, window_start_s: float, window_s: float, avg: SeriesForecast, peak: SeriesForecast,
               made_at_s: float) -> Forecast:
    points = [ForecastPoint(window_start_s=window_start_s + i * window_s, avg=a, avg_upper=au, peak=p, peak_upper=pu)
              for i, (a, au, p, pu) in enumerate(zip(avg.point, avg.upper, peak.point, peak.upper))]
    first = points[0]
    return Forecast(model=model, window_start_s=window_start_s, window_s=window_s, predicted_avg=first.avg,
                    predicted_avg_upper=first.avg_upper, predicted_peak=first.peak,
                    predicted_peak_upper=first.peak_upper, method=peak.method, method_avg=avg.method,
                    note=peak.note if peak.note == avg.note else f"peak: {peak.note}; avg: {avg.note}",
                    history_windows=peak.history_windows, made_at_s=made_at_s, points=points)


def fill_gaps(rows: Sequence[WindowObservation], window_s: float) -> list[WindowObservation]:
    """Consecutive windows from stored rows; a missing window is read as no load."""
    out = [rows[0]]
    for row in rows[1:]:
        t = out[-1].start_s + window_s
        while row.start_s - t > window_s / 2:
            out.append(WindowObservation(t, 0.0, 0.0, 0))
            t += window_s
        out.append(row)
    return out


class ForecastCore:
    def __init__(self, config: ForecastRoundConfig):
        self.config = config
        self.book = WindowBook(config.window_s, keep=config.forecast.fit_windows)
        self.series: dict[str, ModelForecaster] = {}
        self.latest: dict[str, Forecast] = {}
        self.next_round_s: float | None = None  # None: a round is owed now (the first one)

    # ---- inputs ---------------------------------------------------------------------------------------

    def add(self, sample: DemandSample) -> None:
        self.book.add(sample)

    def rebuild(self, history: Mapping[str, Sequence[WindowObservation]]) -> None:
        """Forecasters for every model with history (gaps read as zero load), then a short backtest; windows
        before the end of that history are closed (their samples are late)."""
        w = self.config.window_s
        rebuilt = {}
        for model, rows in history.items():
            if not rows:
                continue
            filled = fill_gaps(rows, w)
            rebuilt[model] = ModelForecaster.replay(self.config.forecast, filled, self.config.startup_backtest_windows)
            self.book.resume(model, filled[-1].start_s + w)
        self.series.update(rebuilt)

    # ---- when --------------------------------------------------------------------------------------------

    def held_until(self, now_s: float, blind: Iterable[tuple[float, float]] = ()) -> float | None:
        """Until when rounds wait after the shell's outages of the bus (``blind``: (start, end) intervals, an
        ongoing one ending now): ``outage_grace_s`` after the latest end. None: no round waits."""
        ends = [end + self.config.outage_grace_s for _, end in blind if end + self.config.outage_grace_s > now_s]
        return max(ends, default=None)

    def due(self, now_s: float, blind: Iterable[tuple[float, float]] = ()) -> bool:
        owed = self.next_round_s is None or now_s >= self.next_round_s
        return owed and self.held_until(now_s, blind) is None

    def wake_at(self, now_s: float, blind: Iterable[tuple[float, float]] = ()) -> float:
        """When the shell should look again: the next boundary (or the end of a hold after an outage, if a
        round is owed by then), or a retry interval from now if sooner."""
        at = now_s if self.next_round_s is None else self.next_round_s
        held = self.held_until(now_s, blind)
        if held is not None:
            at = max(at, held)
        return min(at, now_s + self.config.retry_interval_s)

    # ---- what ---------------------------------------------------------------------------------------------

    def round(self, now_s: float, catalog: Collection[str]) -> RoundResult:
        """Close finished windows, observe them, forecast every catalog model."""
        closed = self.close_windows(now_s, catalog)
        return RoundResult(closed, self.forecast(sorted(catalog), now_s))

    def close_windows(self, now_s: float, catalog: Collection[str]) -> list[tuple[str, WindowObservation]]:
        """The cheap half of a round (the shell runs the forecasts in a thread): close finished windows and
        observe them. The next round is due when the window ``now_s`` falls in has closed (plus grace)."""
        closed = [(m, obs) for m, obs in self.book.close(now_s, self.config.close_grace_s) if m in catalog]
        for model, obs in closed:
            self.series.setdefault(model, ModelForecaster.empty(self.config.forecast)).observe(obs)
        for model in [m for m in self.book.next_start if m not in catalog]:
            self.book.forget(model)  # removed from the catalog
            self.series.pop(model, None)
        self.next_round_s = self.book.window_of(now_s) + self.config.window_s + self.config.close_grace_s
        return closed

    def new_models(self, catalog: Collection[str]) -> list[str]:
        """Catalog models without a forecast yet: they get one (the recent level, i.e. none) without waiting."""
        return sorted(set(catalog) - set(self.latest))

    def forecast(self, models: Sequence[str], now_s: float) -> list[Forecast]:
        out = []
        start = self.book.window_of(now_s)
        for model in models:
            pair = self.series.get(model) or self.series.setdefault(model, ModelForecaster.empty(self.config.forecast))
            avg, peak = pair.forecast()
            fc = to_message(model, start, self.config.window_s, avg, peak, now_s)
            self.latest[model] = fc
            out.append(fc)
        return out
