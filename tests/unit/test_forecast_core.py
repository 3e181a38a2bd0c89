"""The forecaster core: when rounds run (the window-boundary regression), what a round closes and forecasts,
and rebuilding from stored history; all with the clock passed in."""

import pytest

from services.forecaster.core import ForecastCore, ForecastRoundConfig, fill_gaps
from shared.policy.forecast import ForecastConfig, WindowObservation
from tests.factories import sample


def core(window_s=10.0, grace_s=2.0, retry_s=10.0) -> ForecastCore:
    fc = ForecastConfig.for_window(window_s, methods=("naive",))
    return ForecastCore(ForecastRoundConfig(forecast=fc, window_s=window_s, close_grace_s=grace_s,
                                            retry_interval_s=retry_s, startup_backtest_windows=0))


def drive(c: ForecastCore, start_s: float, until_s: float, catalog=("a",)) -> list[float]:
    """The shell's loop: a round when due, otherwise sleep until ``wake_at``; returns when rounds ran."""
    rounds, now = [], start_s
    while now < until_s:
        if c.due(now):
            c.round(now, catalog)
            rounds.append(now)
        now = c.wake_at(now)
    return rounds


@pytest.mark.parametrize("retry_s", [10.0, 30.0, 3.0])
def test_a_round_runs_at_every_window_boundary_even_when_windows_are_no_longer_than_the_retry_interval(retry_s):
    """Regression: the loop used to recompute the boundary at every retry wake-up and, with a window no longer
    than the retry interval, stepped over every boundary and never ran a round again."""
    c = core(window_s=10.0, grace_s=2.0, retry_s=retry_s)
    rounds = drive(c, start_s=1000.5, until_s=1100.0)
    assert rounds[0] == 1000.5  # the first round at once
    assert rounds[1:] == [1012.0 + 10 * k for k in range(9)]  # then each boundary plus grace, none skipped


def test_a_round_closes_finished_windows_idle_ones_as_zero_and_forecasts_every_catalog_model():
    c = core(window_s=10.0, grace_s=2.0)
    c.book.resume("a", 100.0)
    for t in range(100, 110):
        c.add(sample("a", float(t), concurrency=2.0, arrivals=1))
    c.add(sample("gone", 100.0))
    result = c.round(132.5, catalog=["a", "b"])
    closed = [(m, o.start_s, o.avg, o.arrivals) for m, o in result.closed]
    assert closed == [("a", 100.0, 2.0, 10), ("a", 110.0, 0.0, 0), ("a", 120.0, 0.0, 0)]
    assert {f.model for f in result.forecasts} == {"a", "b"}
    assert "gone" not in c.book.next_start  # left the catalog: forgotten
    assert c.next_round_s == 130.0 + 10.0 + 2.0 and not c.due(141.9) and c.due(142.0)
    assert c.new_models(["a", "b", "c"]) == ["c"]


def test_late_samples_for_closed_windows_are_dropped_and_counted():
    c = core()
    c.book.resume("a", 100.0)
    c.round(112.5, catalog=["a"])  # closes [100, 110)
    c.add(sample("a", 105.0))
    assert c.book.late == 1


def test_rebuild_replays_stored_history_with_gaps_as_zero_and_resumes_after_it():
    rows = [WindowObservation(0.0, 1.0, 2.0, 5), WindowObservation(30.0, 3.0, 4.0, 7)]
    assert [(o.start_s, o.avg) for o in fill_gaps(rows, 10.0)] == [(0.0, 1.0), (10.0, 0.0), (20.0, 0.0), (30.0, 3.0)]
    c = core()
    c.rebuild({"a": rows, "empty": []})
    assert c.book.next_start == {"a": 40.0} and len(c.series["a"].peak.history) == 4
    [fc] = c.forecast(["a"], now_s=41.0)
    assert fc.window_start_s == 40.0 and fc.history_windows == 4 and fc.predicted_peak > 0


def test_windows_of_a_bus_outage_wait_for_the_samples_gateways_kept_and_count_them():
    """The forecaster cut off from NATS 108-125 s (so was every gateway): the round owed at 112 waits until
    the outage grace after the end has passed, and the samples the gateway publishes on reconnect, with their
    own timestamps, are counted in their windows instead of being late."""
    c = core(window_s=10.0, grace_s=2.0)
    c.book.resume("a", 100.0)
    c.round(100.5, catalog=["a"])
    c.add(sample("a", 105.0, arrivals=1))
    outage = (108.0, 125.0)
    for now in (112.0, 118.0):  # under way: it ends "now"
        assert not c.due(now, [(outage[0], now)]) and c.wake_at(now, [(outage[0], now)]) == now + 10.0
    after = [outage]
    assert not c.due(126.0, after) and c.wake_at(126.0, after) == 135.0  # the grace after the outage
    for t in range(108, 126):  # the gateway's buffer, published on reconnect
        c.add(sample("a", float(t), arrivals=2))
    assert c.due(135.0, after)
    closed = {o.start_s: o.arrivals for _, o in c.round(135.0, ["a"]).closed}
    assert closed == {100.0: 1 + 2 * 2, 110.0: 2 * 10, 120.0: 2 * 6}
    assert c.book.late == 0
    assert c.due(142.0, after)  # an outage long past holds nothing


def test_a_sample_counted_once_however_often_it_arrives():
    """A gateway's retry after an outage, or a redelivery, brings a sample the window has already counted."""
    c = core()
    c.book.resume("a", 100.0)
    for _ in range(3):
        c.add(sample("a", 101.0, arrivals=4))
    c.add(sample("a", 101.0, arrivals=1, gateway="gw-2"))  # another gateway's, the same second
    [(_, obs)] = c.round(112.5, ["a"]).closed
    assert obs.arrivals == 5 and c.book.duplicates == 2
