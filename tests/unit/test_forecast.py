"""Forecasting methods and selection on synthetic series with known answers."""

import math

import numpy as np
import pytest

from shared.policy.forecast import ForecastConfig, ModelForecaster, SeriesForecaster, WindowObservation, accuracy
from shared.policy.forecast_methods import PaperMethod, build_methods

DAY = 48  # windows per day in these tests (30-minute windows keep them fast)
CFG = ForecastConfig(season_length=DAY, fit_windows=7 * DAY, mstl_fit_windows=4 * DAY, ets_fit_windows=2 * DAY,
                     horizon=3, min_history=6, score_windows=24, min_scored=6, refit_every=6)


def sine(days: float, level: float = 50.0, amp: float = 30.0) -> np.ndarray:
    t = np.arange(int(days * DAY))
    return level + amp * np.sin(2 * np.pi * t / DAY)


def roll(fc: SeriesForecaster, values) -> list:
    """Forecast then reveal, window by window (what the service does); returns the forecasts."""
    out = []
    for v in values:
        out.append(fc.forecast())
        fc.observe(v)
    return out


def test_daily_sine_is_forecast_within_a_tight_error():
    y = sine(5)
    fc = SeriesForecaster(CFG, y[: 3 * DAY])
    forecasts = roll(fc, y[3 * DAY:])
    point = np.array([f.point[0] for f in forecasts])
    assert accuracy(y[3 * DAY:], point)["mape"] < 0.01
    assert forecasts[-1].method in {"mstl", "paper", "seasonal-naive", "ensemble"}  # a seasonal method wins
    assert "rolling backtest" in forecasts[-1].note
    # the horizon continues the curve
    nxt = len(y)
    assert forecasts[-1].point[2] == pytest.approx(50 + 30 * math.sin(2 * math.pi * (nxt + 1) / DAY), abs=0.5)


@pytest.mark.parametrize("method", ["mstl", "paper", "seasonal-naive"])
def test_each_seasonal_method_alone_follows_the_sine(method):
    y = sine(4)
    cfg = ForecastConfig(**{**CFG.__dict__, "methods": (method,)})
    forecasts = roll(SeriesForecaster(cfg, y[: 2 * DAY]), y[2 * DAY:])
    assert all(f.method == method for f in forecasts)
    assert accuracy(y[2 * DAY:], [f.point[0] for f in forecasts])["mape"] < 0.02


def test_naive_cannot_follow_the_sine_so_selection_matters():
    y = sine(4)
    cfg = ForecastConfig(**{**CFG.__dict__, "methods": ("naive",)})
    forecasts = roll(SeriesForecaster(cfg, y[: 2 * DAY]), y[2 * DAY:])
    assert accuracy(y[2 * DAY:], [f.point[0] for f in forecasts])["mape"] > 0.05


def test_a_step_change_is_followed():
    y = np.concatenate([np.full(2 * DAY, 10.0), np.full(DAY, 30.0)])
    forecasts = roll(SeriesForecaster(CFG, y[: 2 * DAY]), y[2 * DAY:])
    # the forecast climbs at once, and once the rolling errors have scored the step (min_scored windows)
    # the selected method sits at the new level
    assert forecasts[1].point[0] > 12.0
    assert all(abs(f.point[0] - 30.0) < 1.5 for f in forecasts[CFG.min_scored + 2:])
    assert forecasts[-1].upper[0] >= forecasts[-1].point[0]


def test_paper_method_with_exact_known_answer():
    day = np.linspace(1, 2, DAY)
    y = np.concatenate([day, day, day[:20] + 3.0])
    p = PaperMethod(DAY).predict(y, 1)
    # profile at slot 20 = mean of the two previous days = day[20]; each of the last 10 errors is +3
    assert p[0] == pytest.approx(day[20] + 3.0)


def test_too_little_history_falls_back_to_the_recent_level_and_says_so():
    fc = SeriesForecaster(CFG, [4.0, 6.0, 8.0])
    f = fc.forecast()
    assert f.method == "recent-level" and "fallback" in f.note and f.history_windows == 3
    assert f.point == (6.0, 6.0, 6.0) and f.upper[0] >= 8.0
    empty = SeriesForecaster(CFG).forecast()
    assert empty.point == (0.0, 0.0, 0.0) and "fallback" in empty.note


def test_upper_quantile_covers_about_its_share_of_noisy_windows():
    rng = np.random.default_rng(1)
    y = 100 + rng.normal(0, 10, 6 * DAY)
    cfg = ForecastConfig(**{**CFG.__dict__, "score_windows": 48, "upper_quantile": 0.9})
    forecasts = roll(SeriesForecaster(cfg, y[:DAY]), y[DAY:])
    observed = y[DAY:]
    for lead in (1, 3):  # each lead's band is sized on that lead's own errors
        covered = np.mean([observed[t + lead - 1] <= forecasts[t].upper[lead - 1]
                           for t in range(DAY, len(forecasts) - lead + 1)])
        assert 0.8 <= covered <= 0.97, (lead, covered)
    assert all(f.upper[0] >= f.point[0] for f in forecasts)


def test_the_band_widens_with_the_lead_where_errors_grow_with_it():
    rng = np.random.default_rng(2)
    y = 200 + np.cumsum(rng.normal(0, 5, 6 * DAY))  # a random walk: a 3-step error is about sqrt(3) one-step errors
    forecasts = roll(SeriesForecaster(CFG, y[:DAY]), y[DAY:])
    last = y[DAY - 1:-1]  # the value each forecast was made after
    width = np.array([[f.upper[k] - v for k in range(3)] for f, v in zip(forecasts, last)])[DAY:]
    assert np.mean(width[:, 2]) > 1.3 * np.mean(width[:, 0])


def test_a_failing_method_is_left_out_and_noted():
    fc = SeriesForecaster(CFG, sine(1))
    broken = next(m for m in fc.methods if m.name == "autoets")
    broken.predict = lambda y, h: (_ for _ in ()).throw(RuntimeError("singular matrix"))
    f = fc.forecast()
    assert f.method != "autoets" and "autoets" in fc.failures and "singular" in fc.failures["autoets"]


def test_replay_scores_methods_before_the_first_forecast():
    y = sine(3)
    fc = SeriesForecaster.replay(CFG, list(y), backtest_windows=12)
    assert set(fc.errors()) >= {"naive", "paper", "seasonal-naive"}
    assert "rolling backtest" in fc.forecast().note
    pair = ModelForecaster.replay(CFG, [WindowObservation(i * 60.0, v, 2 * v) for i, v in enumerate(y)], 12)
    avg, peak = pair.forecast()
    assert peak.point[0] == pytest.approx(2 * avg.point[0], rel=0.05)


def test_forecasts_are_never_negative():
    y = np.concatenate([np.full(DAY, 50.0), np.linspace(50, 0, 20), np.zeros(10)])
    forecasts = roll(SeriesForecaster(CFG, y[:DAY]), y[DAY:])
    assert all(min(f.point) >= 0 and min(f.upper) >= 0 for f in forecasts)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown forecasting methods"):
        build_methods(DAY, 6, DAY, DAY, 6, ("naive", "prophet"))


def test_accuracy_metrics():
    acc = accuracy([10, 10, 0, 20], [10, 7, 5, 30])
    assert acc["windows"] == 3  # the zero window has no percentage error
    assert acc["mape"] == pytest.approx((0 + 0.3 + 0.5) / 3)
    assert acc["under_20pct"] == pytest.approx(1 / 3)  # 7 < 0.8 x 10
    assert acc["over"] == pytest.approx((0 + 0 + 0.5) / 3)
    assert math.isnan(accuracy([0, 0], [1, 1])["mape"])


def test_config_for_a_window_counts_days_in_windows():
    cfg = ForecastConfig.for_window(60.0)
    assert (cfg.season_length, cfg.fit_windows, cfg.ets_fit_windows) == (1440, 7 * 1440, 2 * 1440)
