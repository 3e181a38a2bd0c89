"""Rolling backtest of the forecaster: the service's own per-series forecaster replayed window by window.

At every window the forecaster forecasts (selecting a method by its rolling error, as the service does),
each method's one-step prediction is recorded, then the window's observed value is revealed. Accuracy
is scored from ``eval_start`` on, per model, series (avg, peak) and row: the selected forecast, its upper
quantile, and every method alone, the naive baselines (last window, same time yesterday) included.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np

from shared.policy.forecast import ForecastConfig, SeriesForecaster, WindowObservation, accuracy

SELECTED, UPPER = "warmserve", "warmserve-upper"
HEADROOM = "naive+20%"
BASELINES = {"naive": "last window", "seasonal-naive": "same time yesterday", HEADROOM: "fixed headroom"}


def run_series(y: list[float], config: ForecastConfig) -> dict[str, np.ndarray]:
    """One-step predictions per row (NaN where a row had nothing to say), plus the method chosen."""
    fc = SeriesForecaster(config)
    rows = {name: np.full(len(y), np.nan) for name in (SELECTED, UPPER, *config.methods)}
    chosen = []
    for t, value in enumerate(y):
        f = fc.forecast()
        rows[SELECTED][t], rows[UPPER][t] = f.point[0], f.upper[0]
        for name, p in fc.pending.items():
            rows[name][t] = p
        chosen.append(f.method)
        fc.observe(value)
    rows["chosen"] = np.array(chosen)
    rows[HEADROOM] = rows["naive"] * 1.2  # what an operator does without a forecaster: last value plus margin
    return rows


def backtest(series: dict[str, list[WindowObservation]], config: ForecastConfig, eval_start: int | None = None) -> dict:
    start = config.min_history if eval_start is None else eval_start
    report, traces = {}, {}
    for model, obs in series.items():
        report[model], traces[model] = {}, {}
        for target in ("avg", "peak"):
            y = [getattr(o, target) for o in obs]
            t0 = time.perf_counter()
            rows = run_series(y, config)
            elapsed = time.perf_counter() - t0
            observed = np.array(y)[start:]
            scores = {name: accuracy(observed, pred[start:]) for name, pred in rows.items() if name != "chosen"}
            chosen, counts = np.unique(rows["chosen"][start:], return_counts=True)
            report[model][target] = {"rows": scores, "windows": len(y), "seconds": round(elapsed, 2),
                                     "chosen": {str(c): int(n) for c, n in zip(chosen, counts)}}
            traces[model][target] = {"observed": y, SELECTED: rows[SELECTED].tolist(), UPPER: rows[UPPER].tolist()}
    return {"config": asdict(config), "eval_start_window": start, "models": report, "traces": traces}


def table(result: dict) -> str:
    """Per model and row: MAPE of avg and peak, and the share of windows with the peak under-predicted
    by more than 20% (the metric that costs cold starts)."""
    lines = [f"{'model':12s} {'method':36s} {'MAPE avg':>9s} {'MAPE peak':>10s} {'peak under>20%':>15s} "
             f"{'peak over':>10s} {'windows':>8s}"]
    for model, targets in result["models"].items():
        avg_rows, peak_rows = targets["avg"]["rows"], targets["peak"]["rows"]
        for name in peak_rows:
            a, p = avg_rows[name], peak_rows[name]
            label = name + (f" ({BASELINES[name]})" if name in BASELINES else "")
            if p["windows"] == 0:
                lines.append(f"{model:12s} {label:36s} {'n/a':>9s} {'n/a':>10s} {'n/a':>15s} {'n/a':>10s} {0:8d}"
                             "  (needs more history)")
                continue
            lines.append(f"{model:12s} {label:36s} {_pct(a['mape']):>9s} {_pct(p['mape']):>10s} "
                         f"{_pct(p['under_20pct']):>15s} {_pct(p['over']):>10s} {p['windows']:8d}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def plot(result: dict, path) -> None:
    """Observed vs forecast (point and upper) per model and series, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["traces"])
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 3.2 * len(models)), squeeze=False)
    window_h = result["window_s"] / 3600 if "window_s" in result else 1.0
    for row, model in enumerate(models):
        for col, target in enumerate(("avg", "peak")):
            tr = result["traces"][model][target]
            x = np.arange(len(tr["observed"])) * window_h
            ax = axes[row][col]
            ax.plot(x, tr["observed"], color="black", lw=1.2, label="observed")
            ax.plot(x, tr[SELECTED], color="tab:blue", lw=1, label="forecast")
            ax.plot(x, tr[UPPER], color="tab:orange", lw=0.8, ls="--", label="upper quantile")
            ax.set_title(f"{model}: {target} concurrency per window")
            ax.set_xlabel("hours from trace start")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
