"""Forecasting cost for many models: startup rebuild, first round, steady rounds (docs/design.md, "Benchmarks").

Series: each model gets 7 days of 5-minute windows made from the real ServeGen day (mm-image's peak and
average concurrency), phase-shifted per model and scaled by Gamma noise, so every series is different.
Run:  python -m loadtest.forecast_speed [--models 256] [--days 7] [--rounds 12] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from loadtest.report import header, save
from shared.policy.forecast import ForecastConfig, ModelForecaster, WindowObservation
from tooling.workload.series import SeriesSpec, build_series

OUT = Path("docs/benchmarks/forecast_speed.json")


def make_series(models: int, days: int, seed: int) -> list[list[WindowObservation]]:
    day = build_series(SeriesSpec("servegen", window_s=300.0, seed=seed))["mm-image"]
    avg = np.array([o.avg for o in day])
    peak = np.array([o.peak for o in day])
    rng = np.random.default_rng(seed)
    out = []
    for m in range(models):
        shift = rng.integers(0, len(day))
        scale = rng.uniform(0.05, 3.0)
        n = days * len(day)
        idx = (np.arange(n) + shift) % len(day)
        noise = rng.gamma(20, 1 / 20, n)
        out.append([WindowObservation(i * 300.0, float(avg[j] * scale * e), float(peak[j] * scale * e))
                    for i, (j, e) in enumerate(zip(idx, noise))])
    return out


def run_shard(args) -> dict:
    series, rounds, backtest_windows = args
    config = ForecastConfig.for_window(300.0)
    held_out = rounds
    t0 = time.perf_counter()
    forecasters = [ModelForecaster.replay(config, s[:-held_out], backtest_windows) for s in series]
    rebuild = time.perf_counter() - t0
    t0 = time.perf_counter()
    methods = [f.forecast()[1].method for f in forecasters]
    first = time.perf_counter() - t0
    steady = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for f, s in zip(forecasters, series):
            f.observe(s[len(s) - held_out + r])
            f.forecast()
        steady.append(time.perf_counter() - t0)
    return {"rebuild_s": rebuild, "first_round_s": first, "steady_s": steady, "methods": methods}


def measure(series, processes: int, rounds: int, backtest_windows: int) -> dict:
    shards = [series[i::processes] for i in range(processes)]
    t0 = time.perf_counter()
    if processes == 1:
        results = [run_shard((shards[0], rounds, backtest_windows))]
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            results = pool.map(run_shard, [(s, rounds, backtest_windows) for s in shards])
    wall = time.perf_counter() - t0
    # shards run side by side: a phase takes as long as its slowest shard
    steady = [max(r["steady_s"][i] for r in results) for i in range(rounds)]
    methods = [m for r in results for m in r["methods"]]
    return {"processes": processes, "rebuild_s": round(max(r["rebuild_s"] for r in results), 2),
            "first_round_s": round(max(r["first_round_s"] for r in results), 2),
            "steady_round_mean_s": round(float(np.mean(steady)), 2), "steady_round_max_s": round(max(steady), 2),
            "wall_s": round(wall, 1), "methods_chosen": {m: methods.count(m) for m in sorted(set(methods))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=256)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--rounds", type=int, default=12, help="steady rounds (12 = one refit cycle)")
    p.add_argument("--backtest-windows", type=int, default=12, help="startup rolling backtest per series")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    series = make_series(a.models, a.days, a.seed)
    report = header("forecast_speed", vars(a))
    report["series"] = {"models": a.models, "windows_each": len(series[0]), "window_s": 300.0,
                        "targets_per_model": 2, "window_budget_s": 300.0}
    report["results"] = []
    print(f"{a.models} models x 2 series x {len(series[0])} windows of 300 s")
    print(f"{'processes':>9s} {'rebuild':>9s} {'first round':>12s} {'steady mean':>12s} {'steady max':>11s}")
    for n in a.processes:
        r = measure(series, n, a.rounds, a.backtest_windows)
        report["results"].append(r)
        print(f"{n:9d} {r['rebuild_s']:8.1f}s {r['first_round_s']:11.1f}s {r['steady_round_mean_s']:11.2f}s "
              f"{r['steady_round_max_s']:10.2f}s   chosen: {r['methods_chosen']}")
    save(report, a.out)


if __name__ == "__main__":
    main()
