"""Shipped traces, their loaders, arrival synthesis and concurrency windows."""

import hashlib

import numpy as np
import pytest

from shared.policy.concurrency import ConcurrencyTracker, concurrency_windows
from tooling.workload import traces
from tooling.workload.backtest import backtest, table
from shared.policy.history import align_before, place_before
from tooling.workload.series import SeriesSpec, build_series
from tooling.workload.synth import gamma_arrivals
from shared.policy.forecast import ForecastConfig, WindowObservation


def test_shipped_traces_match_their_checksums():
    lines = (traces.TRACES_DIR / "SHA256SUMS").read_text().split("\n")
    checked = 0
    for line in filter(None, lines):
        digest, name = line.split(maxsplit=1)
        path = traces.TRACES_DIR / name
        assert path.exists(), f"{name} listed in SHA256SUMS but not shipped"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        checked += 1
    assert checked > 100 and (traces.TRACES_DIR / "README.md").read_text().count("License") >= 1


def test_loaders_read_the_shipped_traces():
    rates = traces.read_rates(traces.SERVEGEN_RATES)
    assert set(rates) == {"deepseek-r1", "mm-image"} and rates["mm-image"].window_s == 600.0
    assert len(rates["mm-image"].t_start_s) == 144 and rates["mm-image"].rate_rps[0] == pytest.approx(5.5583)
    clients = traces.read_servegen_clients("deepseek-r1")
    assert len(clients) > 10 and all(c.duration_s == 86400 for c in clients)
    code = traces.read_requests(traces.AZURE["azure-code"])
    assert len(code.arrival_s) == 8819 and code.arrival_s[0] == 0 and np.all(np.diff(code.arrival_s) >= 0)
    hist = traces.read_token_histograms()[("mm-image", "input_tokens")]  # ServeGen's text_tokens
    assert 100 < hist.mean < 2000


def test_bad_trace_files_fail_with_the_file_and_line(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("model,t_start_s,rate_rps\nm,0,1.0\nm,600,fast\n")
    with pytest.raises(traces.TraceFormatError, match=r"r.csv:3"):
        traces.read_rates(bad)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(traces.TraceFormatError, match="missing columns"):
        traces.read_rates(other)
    with pytest.raises(traces.TraceFormatError, match="not an Azure request trace"):
        traces.read_requests(other)
    with pytest.raises(traces.TraceFormatError, match="cannot read"):
        traces.read_requests(tmp_path / "missing.csv")


def test_gamma_arrivals_have_the_windows_rate_and_cv_and_a_seed_reproduces_them():
    series = traces.RateSeries("m", np.array([0.0, 600.0]), np.array([5.0, 0.0]), np.array([3.0, 1.0]), 600.0)
    a = gamma_arrivals(series, np.random.default_rng(7))
    assert np.array_equal(a, gamma_arrivals(series, np.random.default_rng(7)))
    assert len(a) == pytest.approx(3000, rel=0.2) and a.max() < 600  # nothing in the idle window
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.25)


def test_concurrency_windows_agree_with_the_live_tracker():
    rng = np.random.default_rng(3)
    arrivals = np.sort(rng.uniform(0, 100, 300))
    durations = rng.exponential(4.0, 300)
    avg, peak = concurrency_windows(arrivals, durations, 0.0, 10.0, 10)
    events = sorted([(t, 1) for t in arrivals] + [(t + d, -1) for t, d in zip(arrivals, durations)],
                    key=lambda e: (e[0], e[1]))
    tracker = ConcurrencyTracker(0.0)
    i = 0
    for w in range(10):
        end = (w + 1) * 10.0
        while i < len(events) and events[i][0] < end:
            (tracker.arrive if events[i][1] > 0 else tracker.complete)(events[i][0])
            i += 1
        stats = tracker.roll(end)
        assert avg[w] == pytest.approx(stats.concurrency_avg)
        assert peak[w] == stats.concurrency_peak


def test_servegen_series_and_backtest_on_a_slice():
    series = build_series(SeriesSpec("servegen", window_s=600.0, seed=1))
    assert set(series) == {"deepseek-r1", "mm-image"} and len(series["mm-image"]) == 144
    assert series == build_series(SeriesSpec("servegen", window_s=600.0, seed=1))  # deterministic
    sliced = {"mm-image": series["mm-image"][:60]}
    result = backtest(sliced, ForecastConfig.for_window(600.0, methods=("naive", "autoets")))
    rows = result["models"]["mm-image"]["peak"]["rows"]
    assert rows["naive"]["windows"] == 48 and 0 < rows["warmserve"]["mape"] < 1
    assert rows["warmserve-upper"]["under_20pct"] <= rows["warmserve"]["under_20pct"]
    assert "naive (last window)" in table(result)


def test_a_week_replays_the_real_hour_under_the_real_daily_curve():
    from tooling.workload import weeks

    spec = weeks.WeekSpec("azure-code", days=3)
    reqs = weeks.week_requests(spec, np.random.default_rng(4))
    again = weeks.week_requests(spec, np.random.default_rng(4))
    assert np.array_equal(reqs.arrival_s, again.arrival_s)  # a seed reproduces the week
    assert np.all(np.diff(reqs.arrival_s) >= 0) and reqs.arrival_s[-1] < 3 * weeks.DAY_S
    hour = traces.read_requests(traces.AZURE["azure-code"])
    # every request is one of the hour's, with its real lengths
    assert set(zip(reqs.input_tokens[:500], reqs.output_tokens[:500])) <= set(zip(hour.input_tokens, hour.output_tokens))
    # hourly counts follow the ServeGen curve (10x between its quietest and busiest hours)
    centres, curve = weeks.daily_curve(spec.daily_curve)
    counts = np.histogram(reqs.arrival_s, bins=72, range=(0, 3 * weeks.DAY_S))[0]
    expected = np.interp((np.arange(72) % 24 + 0.5) * 3600, centres, curve, period=weeks.DAY_S)
    assert np.corrcoef(counts, expected)[0, 1] > 0.8
    # the code trace's bursts survive thinning: at the busiest hours some minutes still see no request
    busiest = np.argsort(expected)[-6:]
    per_minute = np.histogram(reqs.arrival_s, bins=72 * 60, range=(0, 3 * weeks.DAY_S))[0].reshape(72, 60)
    assert (per_minute[busiest] == 0).sum() > 10 and per_minute[busiest].max() > 5 * per_minute[busiest].mean()


def test_week_sources_build_a_week_of_windows():
    series = build_series(SeriesSpec("azure-conv-week", window_s=3600.0))
    assert list(series) == ["azure-conv-week"] and len(series["azure-conv-week"]) == 7 * 24
    assert all(o.arrivals > 0 for o in series["azure-conv-week"])


def test_align_before_rotates_a_day_keeping_time_of_day():
    day = [WindowObservation(i * 3600.0, float(i), float(i), i) for i in range(24)]
    end = 10 * 86400 + 14 * 3600  # day 10, 14:00
    aligned = align_before(day, 3600.0, end)
    assert aligned[-1].start_s == end - 3600 and aligned[0].start_s == end - 86400
    assert all(o.avg == (o.start_s % 86400) / 3600 for o in aligned)  # hour h carries the trace's hour h


def test_place_before_keeps_the_order_and_ends_at_the_boundary():
    series = [WindowObservation(i * 60.0, float(i), 2.0 * i, i) for i in range(7)]
    placed = place_before(series, 60.0, 3000.0)
    assert [o.start_s for o in placed] == [3000.0 - 60 * (7 - i) for i in range(7)]
    assert [(o.avg, o.peak, o.arrivals) for o in placed] == [(o.avg, o.peak, o.arrivals) for o in series]


def _run_cli(argv):
    from tooling.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_backtest_command_on_a_rate_file_and_a_request_file(tmp_path, capsys):
    rates = tmp_path / "rates.csv"
    rows = ["model,t_start_s,rate_rps,cv"] + [f"{m},{t * 600},{r * (1.5 + np.sin(t / 6))},1.5"
                                               for m, r in (("a", 2.0), ("b", 0.5)) for t in range(36)]
    rates.write_text("\n".join(rows) + "\n")
    assert _run_cli(["forecast", "backtest", "--rates", str(rates), "--window-s", "600",
                     "--out", str(tmp_path), "--name", "bt"]) == 0
    out = capsys.readouterr().out
    assert "naive (last window)" in out and "warmserve-upper" in out
    assert "band over" in out and "margin over" in out  # the coverage-versus-headroom table
    result = __import__("json").loads((tmp_path / "bt.json").read_text())
    band = result["models"]["a"]["peak"]["band"]
    assert set(band) == {"1", "3"} and {"miss", "over", "margin", "margin_over", "ratio", "mape", "mape_last"} <= set(band["1"])
    assert set(result["models"]) == {"a", "b"} and (tmp_path / "bt.png").stat().st_size > 10_000
    assert result["series_spec"]["source"] == f"rates:{rates}" and result["command"].startswith("warmserve forecast")

    reqs = tmp_path / "reqs.csv"
    reqs.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{m:02d}:{s:02d}.1234567,100,{20 + s}\n" for m in range(30) for s in range(0, 60, 3)))
    assert _run_cli(["forecast", "backtest", "--requests", str(reqs), "--window-s", "60",
                     "--out", str(tmp_path), "--name", "bt2"]) == 0
    assert "reqs" in (tmp_path / "bt2.json").read_text()


def test_backtest_command_reports_a_bad_file_clearly(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,t_start_s\nm,0\n")
    code = _run_cli(["forecast", "backtest", "--rates", str(bad), "--out", str(tmp_path)])
    assert code.startswith("error: ") and "missing columns ['rate_rps']" in code  # one line, no traceback
