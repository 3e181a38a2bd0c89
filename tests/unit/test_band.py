"""The upper band (shared/policy/band.py) and its score (shared/policy/forecast.py, band_score) on series
whose answer is known."""

import numpy as np
import pytest

from shared.policy.band import BandConfig, SeriesBand
from shared.policy.forecast import band_score

DAY = 48
CFG = BandConfig(season_length=DAY, window=7 * DAY, min_residuals=24)


def daily(days: int, seed: int = 0) -> np.ndarray:
    """Counts with a daily shape (10x between night and peak) and Poisson noise, relatively larger at night:
    as noisy as the Azure conversation week's average concurrency (about 10)."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * DAY)
    rate = 50 * (0.55 + 0.45 * np.sin(2 * np.pi * t / DAY))
    return rng.poisson(rate).astype(float)


def run(band: SeriesBand, y: np.ndarray, start: int, h: int = 3) -> np.ndarray:
    """Step the band through ``y`` from ``start``: uppers[t, k] is what it said of window t + k."""
    out = np.full((len(y), h), np.nan)
    for t in range(start, len(y)):
        for k, u in enumerate(band.upper(y[:t], h)):
            if u is not None and t + k < len(y):
                out[t + k, k] = u
        band.observe(y[t])
    return out


def test_on_a_noisy_daily_shape_the_band_holds_far_less_headroom_than_the_matched_margin():
    y = daily(7)
    band = SeriesBand(CFG)
    for v in y[:DAY]:
        band.observe(v)  # no forecasts were made for these: nothing scored
    assert not band.residuals
    uppers = run(band, y, DAY)
    for lead in (1, 3):
        last = np.full(len(y), np.nan)
        last[lead:] = y[:-lead]
        score = band_score(y[2 * DAY:], uppers[2 * DAY:, lead - 1], last[2 * DAY:])
        assert score.miss <= 0.02
        assert score.ratio is not None and score.ratio < 0.6, (lead, score)


def test_the_seasonal_base_follows_the_ramp_the_last_value_lags():
    y = daily(4)
    band = SeriesBand(CFG)
    run(band, y, 1)
    spread = {name: np.quantile(band.residuals[(name, 1)], 0.97) - np.quantile(band.residuals[(name, 1)], 0.03)
              for name in ("seasonal", "last", "level")}
    assert spread["seasonal"] < spread["last"] and spread["seasonal"] < spread["level"]


def test_on_a_random_walk_the_band_stays_on_the_last_value():
    rng = np.random.default_rng(3)
    y = 500 + np.cumsum(rng.normal(0, 10, 5 * DAY))
    band = SeriesBand(CFG)
    run(band, y, 1)
    upper = band.upper(y, 1)[0]
    q = np.quantile(np.array(band.residuals[("last", 1)]), CFG.quantile)
    assert upper == pytest.approx(y[-1] * np.exp(q))


def test_replaying_history_scores_the_bases_exactly_as_stepping_through_it():
    y = daily(3, seed=5)
    stepped = SeriesBand(CFG)
    run(stepped, y, 1)
    replayed = SeriesBand(CFG)
    replayed.replay(y, 3, len(y))
    assert set(replayed.residuals) == set(stepped.residuals)
    for key, ratios in stepped.residuals.items():
        assert np.allclose(replayed.residuals[key], ratios), key
    assert replayed.upper(y, 3) == pytest.approx(stepped.upper(y, 3))


def test_no_band_before_enough_windows_are_scored_and_an_idle_model_stays_at_zero():
    band = SeriesBand(CFG)
    y = np.zeros(3 * DAY)
    y[DAY + 10] = 4.0  # one busy window yesterday at this time of day
    assert band.upper(y[:5], 3) == [None, None, None]
    run(band, y[:2 * DAY + 5], 5)
    assert band.upper(y[:2 * DAY + 5], 1) == [pytest.approx(0.0)]  # idle now and at this time yesterday
    at = 2 * DAY + 8  # yesterday's busy window is within the profile's neighbours of the next window
    run(band, y[:at], 2 * DAY + 5)
    assert band.upper(y[:at], 1)[0] > 0


def test_band_score_matches_the_margin_to_the_bands_coverage_on_the_same_windows():
    observed = np.array([10.0, 10.0, 10.0, 10.0, 0.0])
    last = np.array([10.0, 10.0, 5.0, 10.0, 7.0])
    upper = np.array([11.0, 12.0, 8.0, 10.0, 3.0])  # 8 x 1.2 < 10: one of four windows with load missed
    s = band_score(observed, upper, last)
    assert s.windows == 4 and s.miss == pytest.approx(0.25)
    assert s.over == pytest.approx((0.1 + 0.2 + 0 + 0) / 4)
    # the margin may miss one window too: the 5 -> 10 jump; the others need 10 <= 1.2 x 10 x (1 + m)
    assert s.margin == pytest.approx(10 / 12 - 1)
    assert s.margin_miss == pytest.approx(0.25)
    assert s.margin_over == pytest.approx(0.0)
    assert s.ratio is None  # the margin held no headroom at all
    cannot = band_score([10.0, 10.0], [10.0, 10.0], [0.0, 10.0])  # no factor raises a zero last value
    assert cannot.miss == 0 and cannot.margin is None and cannot.ratio is None
