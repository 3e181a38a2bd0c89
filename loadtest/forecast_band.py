"""The forecaster's upper band against "last value + fixed margin", over seeds (docs/forecasting.md, "The score").

For each series source (the Azure conversation and code weeks, the ServeGen day) and each seed, the series is
rebuilt (the seed draws the week's hour rotations, thinning and day levels, or the ServeGen arrivals) and
the forecaster's own ``SeriesForecaster`` is backtested on it window by window. Per model, series (average and
peak concurrency) and lead: the share of windows the load exceeded the band by more than 20% (target: at
most 2%), the band's mean over-provisioning, the fixed margin matched to the band's coverage on the same
windows and its over-provisioning, their ratio (target: at most 0.6), and the point forecast's MAPE next to
the last value's. Mean and 95% interval over seeds.

Run:  python -m loadtest.forecast_band [--seeds 5] [--sources azure-conv-week azure-code-week servegen]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
from pathlib import Path

from loadtest.report import header, save
from loadtest.vs_vllm_stats import interval as seeds_interval
from shared.policy.forecast import ForecastConfig
from tooling.workload.backtest import COVERAGE_TARGET, RATIO_TARGET, backtest
from tooling.workload.series import SeriesSpec, build_series

OUT = Path("docs/benchmarks/forecast_band.json")
SOURCES = ("azure-conv-week", "azure-code-week", "servegen")
FIELDS = ("miss", "over", "margin", "margin_over", "ratio", "mape", "mape_last")


def run_one(job: tuple[str, int]) -> dict:
    source, seed = job
    t0 = time.perf_counter()
    series = build_series(SeriesSpec(source, seed=seed))
    result = backtest(series, ForecastConfig.for_window(300.0))
    rows = []
    for model, targets in result["models"].items():
        for target, rep in targets.items():
            for lead, b in rep["band"].items():
                rows.append({"source": source, "seed": seed, "model": model, "series": target, "lead": int(lead),
                             "windows": b["windows"], **{k: b[k] for k in FIELDS}})
    print(f"  {source} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"rows": rows, "eval_start_window": result["eval_start_window"]}


def interval(values: list[float]) -> dict:
    """Mean and 95% interval over the seeds that have a value (a ratio is None where no margin matched)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return seeds_interval(vals) if vals else {"mean": None, "ci95_half": None, "seeds": []}


def summarise(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["source"], r["model"], r["series"], r["lead"]) for r in rows})
    out = []
    for key in keys:
        mine = [r for r in rows if (r["source"], r["model"], r["series"], r["lead"]) == key]
        entry = {"source": key[0], "model": key[1], "series": key[2], "lead": key[3],
                 **{k: interval([r[k] for r in mine]) for k in FIELDS},
                 "worst_miss": max(r["miss"] for r in mine),
                 "worst_ratio": max((r["ratio"] for r in mine if r["ratio"] is not None), default=None),
                 "seeds": len(mine)}
        entry["meets"] = bool(entry["worst_miss"] <= COVERAGE_TARGET
                              and (entry["worst_ratio"] is None or entry["worst_ratio"] <= RATIO_TARGET)
                              and all(r["mape"] <= r["mape_last"] + 1e-12 for r in mine))
        out.append(entry)
    return out


def _fmt(iv: dict, pct: bool = True) -> str:
    if iv["mean"] is None:
        return "n/a"
    m, h = iv["mean"], iv["ci95_half"]
    if pct:
        return f"{100 * m:.1f}%" + ("" if h is None else f" ±{100 * h:.1f}")
    return f"{m:.2f}" + ("" if h is None else f" ±{h:.2f}")


def markdown(summary: list[dict], seeds: int) -> str:
    lines = [(f"Mean over {seeds} seeds ± the 95% interval; 'meets' = every seed had miss ≤ {COVERAGE_TARGET:.0%}, "
              f"ratio ≤ {RATIO_TARGET} and the point's MAPE no worse than the last value's."), "",
             ("| series | model | target | lead | miss >20% | band over | matched margin | margin over | ratio "
              "| MAPE | MAPE last | meets |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['source']} | {e['model']} | {e['series']} | {e['lead']} | {_fmt(e['miss'])} "
                     f"| {_fmt(e['over'])} | {_fmt(e['margin'])} | {_fmt(e['margin_over'])} "
                     f"| {_fmt(e['ratio'], pct=False)} | {_fmt(e['mape'])} | {_fmt(e['mape_last'])} "
                     f"| {'yes' if e['meets'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{e['model'].removeprefix('azure-')}\n{e['series']} lead {e['lead']}" for e in summary]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.7 * len(summary)), 8))
    for ax, field, target, title in ((axes[0], "ratio", RATIO_TARGET, "over-provisioning: band / matched fixed margin"),
                                     (axes[1], "miss", COVERAGE_TARGET, "share of windows over the band by >20%")):
        means = [e[field]["mean"] or 0.0 for e in summary]
        errs = [e[field]["ci95_half"] or 0.0 for e in summary]
        colors = ["tab:green" if e["meets"] else "tab:red" for e in summary]
        ax.bar(range(len(summary)), means, yerr=errs, color=colors, capsize=3)
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target}")
        ax.set_xticks(range(len(summary)), labels, fontsize=6, rotation=30, ha="right")
        ax.set_title(title + " (green: meets on every seed)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    jobs = [(s, seed) for s in a.sources for seed in range(a.seeds)]
    print(f"backtesting {len(jobs)} series sets ({a.seeds} seeds) on {a.processes} processes ...", flush=True)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(a.processes) as pool:
        results = pool.map(run_one, jobs)
    rows = [r for res in results for r in res["rows"]]
    summary = summarise(rows)
    report = header("forecast_band", vars(a))
    report.update(window_s=300.0, targets={"coverage_miss_at_most": COVERAGE_TARGET, "slack": 0.2,
                                          "ratio_at_most": RATIO_TARGET},
                  scored_from_window={s: next(res["eval_start_window"] for (src, _), res in zip(jobs, results) if src == s)
                                      for s in a.sources},
                  seconds=round(time.perf_counter() - t0, 1), summary=summary, rows=rows)
    md = markdown(summary, a.seeds)
    print(md)
    save(report, a.out)
    a.out.with_suffix(".md").write_text(f"# Forecast band score\n\n`{report['command']}`\n\n" + md)
    plot(summary, a.out.with_suffix(".png"))
    print(f"saved {a.out.with_suffix('.md')} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
