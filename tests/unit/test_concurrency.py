import pytest

from services.forecaster.windows import WindowBook
from shared.messages import DemandSample
from shared.policy.concurrency import ConcurrencyTracker


def test_time_weighted_concurrency():
    t = ConcurrencyTracker(start_s=0.0)
    t.arrive(0.0)
    t.arrive(0.5)  # two in flight from 0.5
    t.complete(1.0)
    stats = t.roll(2.0)  # one in flight for 0-0.5, two for 0.5-1, one for 1-2
    assert stats.concurrency_avg == pytest.approx((0.5 + 1.0 + 1.0) / 2.0)
    assert (stats.arrivals, stats.completions, stats.concurrency_peak) == (2, 1, 2)
    nxt = t.roll(3.0)
    assert nxt.concurrency_avg == pytest.approx(1.0) and nxt.arrivals == 0 and nxt.concurrency_peak == 1
    assert not t.idle
    t.complete(3.5)
    t.roll(4.0)
    assert t.idle


def sample(model, start, avg, peak, gw="g1", n=1):
    return DemandSample(gateway_id=gw, model=model, start_s=start, interval_s=1.0, arrivals=n, completions=n,
                        concurrency_avg=avg, concurrency_peak=peak)


def test_window_book_aggregates_gateways_and_fills_gaps():
    book = WindowBook(window_s=10.0)
    book.add(sample("m", 1.0, 2.0, 3))
    book.add(sample("m", 1.0, 1.0, 2, gw="g2"))  # same second, another gateway
    book.add(sample("m", 5.0, 1.0, 1))
    assert book.close(now_s=11.0) == []  # grace period
    [(model, obs)] = book.close(now_s=12.5)
    assert model == "m" and obs.start_s == 0.0
    assert obs.avg == pytest.approx((2.0 + 1.0 + 1.0) / 10.0)
    assert obs.peak == 5  # peaks of one second add up across gateways
    assert obs.arrivals == 3
    book.add(sample("m", 31.0, 1.0, 1))
    closed = [o for _, o in book.close(now_s=100.0)]
    assert [o.start_s for o in closed] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]  # idle windows are zeros
    assert closed[0].avg == 0.0 and closed[2].avg == pytest.approx(0.1)
    assert book.close(now_s=100.0) == []  # nothing closes twice


def test_window_book_drops_late_samples_and_bounds_gaps():
    book = WindowBook(window_s=10.0, keep=5)
    book.add(sample("m", 1.0, 1.0, 1))
    book.close(now_s=15.0)
    book.add(sample("m", 5.0, 9.0, 9))  # for a window that is already closed
    assert book.late == 1 and not book.open
    hist = [o for _, o in book.close(now_s=10_000.0)]  # a long outage: only `keep` windows are materialised
    assert len(hist) == 5 and hist[-1].start_s == 9980.0 and all(o.avg == 0 for o in hist)


def test_window_book_resumes_after_stored_windows():
    book = WindowBook(window_s=10.0)
    book.resume("m", 20.0)  # windows before 20 s were closed and stored by a previous run
    book.add(sample("m", 15.0, 1.0, 1))  # replayed from the stream: counted already
    book.add(sample("m", 21.0, 3.0, 3))
    assert book.late == 1
    [(_, obs)] = book.close(now_s=32.5)
    assert obs.start_s == 20.0 and obs.peak == 3
