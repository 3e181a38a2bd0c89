"""Rolling backtest of the forecaster: the service's own per-series forecaster replayed window by window.

At every window the forecaster forecasts (selecting a method by its rolling error, as the service does),
each method's one-step prediction is recorded, then the window's observed value is revealed. Accuracy
is scored from ``eval_start`` on, per model, series (avg, peak) and row: the selected forecast, its upper
quantile, and every method alone, the naive baselines (last window, same time yesterday) included.

The band is scored per lead (``LEADS``): its coverage against the headroom it costs, next to the last
value plus the fixed margin that matches its coverage (``band_score``), and the point forecast's MAPE
next to the last value's at the same lead.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np

from shared.policy.forecast import ForecastConfig, SeriesForecaster, WindowObservation, accuracy, band_score

SELECTED, UPPER = "warmserve", "warmserve-upper"
HEADROOM = "naive+20%"
BASELINES = {"naive": "last window", "seasonal-naive": "same time yesterday", HEADROOM: "fixed headroom"}
LEADS = (1, 3)  # windows ahead: the next window, and the one a copy started late in this window serves
COVERAGE_TARGET = 0.02  # at most this share of windows may exceed the upper by more than 20%
RATIO_TARGET = 0.6  # the band's over-provisioning against the matched fixed margin's


def lagged(y, lead: int) -> np.ndarray:
    """``out[t]`` = ``y[t - lead]``: the last value known when a forecast ``lead`` windows ahead of ``t`` was made."""
    y = np.asarray(y, dtype=float)
    out = np.full(len(y), np.nan)
    out[lead:] = y[:-lead]
    return out


def run_series(y: list[float], config: ForecastConfig) -> dict[str, np.ndarray]:
    """Predictions per row for each window (NaN where a row had nothing to say), plus the method chosen.
    ``point@L`` and ``upper@L`` are what the forecast made L windows before said of the window."""
    fc = SeriesForecaster(config)
    n = len(y)
    rows = {name: np.full(n, np.nan) for name in config.methods}
    for lead in LEADS:
        rows[f"point@{lead}"], rows[f"upper@{lead}"] = np.full(n, np.nan), np.full(n, np.nan)
    chosen = []
    for t, value in enumerate(y):
        f = fc.forecast()
        for lead in LEADS:
            if lead <= len(f.point) and t + lead - 1 < n:
                rows[f"point@{lead}"][t + lead - 1] = f.point[lead - 1]
                rows[f"upper@{lead}"][t + lead - 1] = f.upper[lead - 1]
        for name, p in fc.pending.items():
            rows[name][t] = p
        chosen.append(f.method)
        fc.observe(value)
    rows[SELECTED], rows[UPPER] = rows["point@1"], rows["upper@1"]  # what the next window was told
    rows["chosen"] = np.array(chosen)
    rows[HEADROOM] = rows["naive"] * 1.2  # what an operator does without a forecaster: last value plus margin
    return rows


def lead_scores(y: list[float], rows: dict[str, np.ndarray], start: int) -> dict[str, dict]:
    """Per lead: the band's score against the matched margin, and point MAPE against the last value's."""
    obs = np.asarray(y, dtype=float)
    out = {}
    for lead in LEADS:
        if f"upper@{lead}" not in rows:
            continue
        last = lagged(obs, lead)
        lo = max(start, lead)
        score = band_score(obs[lo:], rows[f"upper@{lead}"][lo:], last[lo:])
        out[str(lead)] = {**asdict(score),
                          "mape": accuracy(obs[lo:], rows[f"point@{lead}"][lo:])["mape"],
                          "mape_last": accuracy(obs[lo:], last[lo:])["mape"],
                          "meets": bool(score.windows and score.miss <= COVERAGE_TARGET
                                        and (score.ratio is None or score.ratio <= RATIO_TARGET))}
    return out


def default_eval_start(series: dict[str, list[WindowObservation]], config: ForecastConfig) -> int:
    """Series of two days or more are scored from their second day on (the first is the history every
    seasonal method and base needs, which a running cluster has); shorter ones after ``min_history``."""
    shortest = min((len(obs) for obs in series.values()), default=0)
    return config.season_length if shortest >= 2 * config.season_length else config.min_history


def backtest(series: dict[str, list[WindowObservation]], config: ForecastConfig, eval_start: int | None = None) -> dict:
    start = default_eval_start(series, config) if eval_start is None else eval_start
    report, traces = {}, {}
    for model, obs in series.items():
        report[model], traces[model] = {}, {}
        for target in ("avg", "peak"):
            y = [getattr(o, target) for o in obs]
            t0 = time.perf_counter()
            rows = run_series(y, config)
            elapsed = time.perf_counter() - t0
            observed = np.array(y)[start:]
            scores = {name: accuracy(observed, pred[start:]) for name, pred in rows.items()
                      if name != "chosen" and "@" not in name}
            chosen, counts = np.unique(rows["chosen"][start:], return_counts=True)
            report[model][target] = {"rows": scores, "windows": len(y), "seconds": round(elapsed, 2),
                                     "chosen": {str(c): int(n) for c, n in zip(chosen, counts)},
                                     "band": lead_scores(y, rows, start)}
            traces[model][target] = {"observed": y, SELECTED: rows[SELECTED].tolist(), UPPER: rows[UPPER].tolist()}
    return {"config": asdict(config), "eval_start_window": start, "models": report, "traces": traces,
            "band_targets": {"coverage_miss_at_most": COVERAGE_TARGET, "slack": 0.2,
                             "ratio_at_most": RATIO_TARGET, "leads": list(LEADS)}}


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


def band_table(result: dict) -> str:
    """Per model, series and lead: the band's coverage and over-provisioning, the matched fixed margin's,
    their ratio, and the point forecast's MAPE next to the last value's."""
    lines = [(f"{'model':16s} {'series':6s} {'lead':>4s} {'miss>20%':>9s} {'band over':>10s} {'margin':>8s} "
              f"{'margin over':>12s} {'ratio':>6s} {'MAPE':>7s} {'MAPE last':>10s} {'windows':>8s}  meets")]
    for model, targets in result["models"].items():
        for target, rep in targets.items():
            for lead, b in rep.get("band", {}).items():
                margin = "n/a" if b["margin"] is None else f"{100 * b['margin']:+.0f}%"
                ratio = "n/a" if b["ratio"] is None else f"{b['ratio']:.2f}"
                lines.append(f"{model:16s} {target:6s} {lead:>4s} {_pct(b['miss']):>9s} {_pct(b['over']):>10s} "
                             f"{margin:>8s} {_pct(b['margin_over']):>12s} {ratio:>6s} {_pct(b['mape']):>7s} "
                             f"{_pct(b['mape_last']):>10s} {b['windows']:8d}  {'yes' if b['meets'] else 'NO'}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def plot(result: dict, path) -> None:
    """Observed vs forecast (point and upper) per model and series, and a last row of bars: each series'
    and lead's over-provisioning, the band's against the matched fixed margin's, with their ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["traces"])
    fig, axes = plt.subplots(len(models) + 1, 2, figsize=(14, 3.2 * (len(models) + 1)), squeeze=False)
    window_h = result["window_s"] / 3600 if "window_s" in result else 1.0
    for row, model in enumerate(models):
        for col, target in enumerate(("avg", "peak")):
            tr = result["traces"][model][target]
            x = np.arange(len(tr["observed"])) * window_h
            ax = axes[row][col]
            ax.plot(x, tr["observed"], color="black", lw=1.2, label="observed")
            ax.plot(x, tr[SELECTED], color="tab:blue", lw=1, label="forecast")
            ax.plot(x, tr[UPPER], color="tab:orange", lw=0.8, ls="--", label="upper band")
            ax.set_title(f"{model}: {target} concurrency per window")
            ax.set_xlabel("hours from trace start")
            ax.legend(loc="upper left", fontsize=8)
    for col, target in enumerate(("avg", "peak")):
        ax = axes[-1][col]
        labels, band, margin, ratios = [], [], [], []
        for model in models:
            for lead, b in result["models"][model][target].get("band", {}).items():
                labels.append(f"{model}\nlead {lead}")
                band.append(100 * b["over"])
                margin.append(100 * (b["margin_over"] or 0.0))
                ratios.append(b["ratio"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, band, 0.4, label="band", color="tab:orange")
        ax.bar(x + 0.2, margin, 0.4, label="last value + matched margin", color="tab:gray")
        for i, r in enumerate(ratios):
            ax.annotate("n/a" if r is None else f"{r:.2f}x", (x[i], max(band[i], margin[i])), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("mean over-provisioning, %")
        ax.set_title(f"{target}: headroom at the band's coverage (ratio band / margin)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
