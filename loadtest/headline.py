"""The headline benchmark: WarmServe against ServerlessLLM, MuxServe and a static cluster, per regime.

For each regime (the paper's 4 models on 2 x 8 GPUs; 6 models; 12 models on 32 GPUs; 12 models on 16 GPUs,
oversubscribed), each system runs the same workloads (shipped traces, the paper's 1,024-token input clip) at
every swept rate with several seeds. Reported per point: mean and 95% interval over the seeds of P99 TTFT
(a request never served counts as 999 s), SLO attainment (TTFT and TPOT together) and GPU-seconds; per
system, the sustainable rate (the highest rate at which it and every lower rate reach 99% attainment). A
cost sweep reports the P99 ratio against ServerlessLLM as a curve over its engine start, and WarmServe's
sensitivity to its own prewarm-hit cost. Writes docs/benchmarks/headline.{json,md} and PNGs.

    .venv/bin/python -m loadtest.headline             # the full run: about 25 minutes on 2 cores
    .venv/bin/python -m loadtest.headline --quick --out /tmp/h   # CI: one regime, two rates, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loadtest.report import header
from simulator.calibration import load_calibration
from simulator.run import ABLATIONS, SYSTEMS, ClusterSpec, simulate
from simulator.workload import WorkloadSpec, build

OUT = Path("docs/benchmarks")
SUSTAIN = 0.99
DRAIN_S = 120.0  # a request not served two minutes after the replay ends counts as never served


@dataclass(frozen=True)
class Regime:
    key: str
    label: str
    models: tuple[str, ...]
    alpha: float
    nodes: int
    rates: tuple[float, ...]


REGIMES = (
    Regime("a", "(a) the paper's: 4 models (7B, 7B, 13B, 70B), alpha 2, on 2 x 8 GPUs", ("7b", "7b", "13b", "70b"),
           2.0, 2, (1, 2, 4, 6, 8, 12)),
    Regime("b", "(b) 6 models (3 x 7B, 2 x 13B, 70B), alpha 2, on 2 x 8 GPUs", ("7b",) * 3 + ("13b",) * 2 + ("70b",),
           2.0, 2, (1, 2, 4, 8, 12, 16)),
    Regime("c", "(c) 12 models (8 x 7B, 3 x 13B, 70B), alpha 1, on 4 x 8 GPUs", ("7b",) * 8 + ("13b",) * 3 + ("70b",),
           1.0, 4, (2, 4, 8, 16, 24)),
    Regime("d", "(d) oversubscribed: the same 12 models on 2 x 8 GPUs (more models than GPU groups)",
           ("7b",) * 8 + ("13b",) * 3 + ("70b",), 1.0, 2, (1, 2, 4, 6, 8)),
)
ENGINE_STARTS = (5.0, 15.0, 30.0)  # ServerlessLLM's engine start, swept (a vLLM engine: 10-30 s)
ACTIVATES = (0.1, 0.3, 1.0)  # WarmServe's prewarm hit (KV mapping + engine wake-up), swept
COST_POINT = ("a", 2.0)  # where the costs are swept: a rate every system serves
ABLATION_REGIME = "d"  # where the ablations of WarmServe run: the crowded regime, where its choices matter
ABLATION_RATES = (4.0,)  # at these rates (--ablation-rates)


def _job(job):
    """One workload (regime, rate, seed), every system on it."""
    regime, rate, seed, duration, warmup, systems, costs_list, base, time_scale = job
    spec = WorkloadSpec(models=regime.models, alpha=regime.alpha, total_rps=rate, duration_s=duration,
                        warmup_s=warmup, seed=seed, max_input_tokens=1024, max_output_tokens=1023,
                        time_scale=time_scale)
    workload = build(spec)
    out = []
    for system, costs, sweep in [(s, base.costs, None) for s in systems] + costs_list:
        t0 = time.perf_counter()
        r = simulate(system, workload, replace(base, nodes=regime.nodes, costs=costs), drain_s=DRAIN_S)
        r.pop("memory_timeline", None)
        r.pop("per_model", None)
        r.update(regime=regime.key, rate_rps=rate, seed=seed, seconds=round(time.perf_counter() - t0, 2),
                 costs=asdict(costs), sweep=sweep)
        out.append(r)
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student's t over the seeds)."""
    from scipy.stats import t

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5)


def sustainable(points: dict[float, float]) -> float:
    """Highest rate whose attainment, and every lower rate's, reaches the bar (0 when none does)."""
    best = 0.0
    for rate in sorted(points):
        if points[rate] < SUSTAIN:
            break
        best = rate
    return best


def ratio_interval(pairs: list[tuple[float, float]]) -> tuple[float, float | None, float | None]:
    """Geometric mean of a / b over paired runs, with its 95% interval (None with one pair)."""
    m, h = interval([math.log(a / b) for a, b in pairs])
    return math.exp(m), (math.exp(m - h) if h == h else None), (math.exp(m + h) if h == h else None)


def summarise(results: list[dict], regimes, systems, seeds) -> dict:
    runs = {(r["regime"], r["system"], r["rate_rps"], r["seed"]): r for r in results if r["sweep"] is None}
    table, sustain, ratios = {}, {}, {}
    for regime in regimes:
        for system in systems:
            for rate in regime.rates:
                point = [runs[k] for seed in seeds if (k := (regime.key, system, rate, seed)) in runs]
                if point:
                    table[f"{regime.key}|{system}|{rate:g}"] = {
                        k: interval([r[k] for r in point]) for k in
                        ("ttft_p99_s", "ttft_p50_s", "slo_attainment", "gpu_seconds_serving", "gpu_seconds_busy",
                         "gpu_seconds_idle", "unserved", "tpot_mean_s")} | {"seeds": len(point)}
                if system != "warmserve":  # P99 of each system over WarmServe's, paired by seed
                    pairs = [(runs[(regime.key, system, rate, seed)]["ttft_p99_s"],
                              runs[(regime.key, "warmserve", rate, seed)]["ttft_p99_s"]) for seed in seeds
                             if (regime.key, system, rate, seed) in runs and (regime.key, "warmserve", rate, seed) in runs]
                    if pairs:
                        ratios[f"{regime.key}|{system}|{rate:g}"] = ratio_interval(pairs)
            per_seed = [sustainable(pts) for seed in seeds
                        if (pts := {rate: runs[k]["slo_attainment"] for rate in regime.rates
                                    if (k := (regime.key, system, rate, seed)) in runs})]
            if per_seed:
                sustain[f"{regime.key}|{system}"] = interval(per_seed)
    return {"table": table, "sustainable": sustain, "p99_ratio_over_warmserve": ratios}


def cost_curve(results: list[dict], rate: float) -> dict:
    """Regime (a) at ``rate``: each swept cost, and the default, against WarmServe's P99 at default costs."""
    out = {}
    for r in results:
        default = (r["sweep"] is None and r["regime"] == "a" and r["rate_rps"] == rate
                   and r["system"] in ("serverlessllm", "warmserve"))
        if r["sweep"] == "cost" or default:
            key = (f"{r['system']}|engine_start_s={r['costs']['engine_start_s']:g}" if r["system"].startswith("serverless")
                   else f"{r['system']}|activate_s={r['costs']['activate_s']:g}")
            out.setdefault(key, []).append(r)
    ws = {r["seed"]: r for r in results if r["system"] == "warmserve" and r["sweep"] is None
          and r["regime"] == "a" and r["rate_rps"] == rate}
    return {key: {"ttft_p99_s": interval([r["ttft_p99_s"] for r in point]),
                  "slo_attainment": interval([r["slo_attainment"] for r in point]),
                  "p99_over_warmserve": ratio_interval([(r["ttft_p99_s"], ws[r["seed"]]["ttft_p99_s"])
                                                        for r in point if r["seed"] in ws])}
            for key, point in out.items()}


def missing_points(results: list[dict], regimes, systems, seeds) -> list[tuple[str, str, float]]:
    """(regime, system, rate) points without a result for every seed: the run is incomplete."""
    have: dict[tuple, int] = {}
    for r in results:
        if r["sweep"] is None:
            key = (r["regime"], r["system"], r["rate_rps"])
            have[key] = have.get(key, 0) + 1
    return [(reg.key, s, rate) for reg in regimes for s in systems for rate in reg.rates
            if have.get((reg.key, s, rate), 0) != len(seeds)]


def ablation_table(results: list[dict], points: list[tuple[str, float]]) -> dict:
    """Per ablation point ("d@4"), each WarmServe variant's P99, attainment, hit rate and GPU-seconds."""
    out = {}
    for regime, rate in points:
        table = {}
        for name in ("warmserve", *ABLATIONS):
            runs = [r for r in results if r["system"] == name and r["regime"] == regime and r["rate_rps"] == rate
                    and r["sweep"] in (None, "ablation")]
            if runs:
                table[name] = {k: interval([r[k] or 0.0 for r in runs]) for k in
                               ("ttft_p99_s", "slo_attainment", "prewarm_hit_rate", "gpu_seconds_serving")}
        if table:
            out[f"{regime}@{rate:g}"] = table
    return out


def ablation_points(report: dict) -> list[tuple[str, float]]:
    """The report's ablation points (older reports name one, ``ablation_point``)."""
    points = report.get("ablation_points") or [report["ablation_point"]]
    return [(regime, float(rate)) for regime, rate in points]


def progress(done: int, total: int, started: float, label: str) -> None:
    width = 30
    filled = int(width * done / total)
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} workloads, "
                     f"{time.perf_counter() - started:5.0f} s  {label:30s}")
    sys.stdout.flush()


def _pm(x: tuple[float, float], scale: float = 1.0, digits: int = 2) -> str:
    m, h = x
    if h != h:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}"


def _ratio(x) -> str:
    m, lo, hi = x
    return f"{m:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def markdown(report: dict) -> str:
    s, regimes, systems = report["summary"], report["regimes"], report["systems"]
    lines = ["# Headline benchmark (simulator)\n", f"Command: `{report['command']}`\n",
             f"Seeds: {report['seeds']}; replay {report['duration_s']:g} s after {report['warmup_s']:g} s of warm-up, "
             f"trace time compressed {report['params'].get('time_scale', 18.0):g}x; "
             f"SLO: TTFT <= {report['cluster']['slo_ttft_s']:g} s and TPOT <= {report['cluster']['slo_tpot_s']:g} s; "
             f"device {report['cluster']['device']['name']}; costs {json.dumps(report['costs'])}. "
             "Every cell: mean ± 95% interval over the seeds; a request never served counts as 999 s.\n"]
    for reg in regimes:
        lines += [f"## {reg['label']}\n", "| system | " + " | ".join(
            f"{r:g} rps: P99 TTFT (s) / SLO % / GPU-s" for r in reg["rates"]) + " | sustainable rps |",
            "|---|" + "---|" * (len(reg["rates"]) + 1)]
        for system in systems:
            cells = []
            for rate in reg["rates"]:
                c = s["table"].get(f"{reg['key']}|{system}|{rate:g}")
                cells.append("-" if c is None else f"{_pm(c['ttft_p99_s'])} / {_pm(c['slo_attainment'], 100, 1)} / "
                             f"{_pm(c['gpu_seconds_serving'], 1, 0)}")
            sus = s["sustainable"].get(f"{reg['key']}|{system}")
            lines.append(f"| {system} | " + " | ".join(cells) + f" | {_pm(sus, 1, 1) if sus else '-'} |")
        mid = reg["rates"][len(reg["rates"]) // 2]
        lines += ["", f"What the latency costs at {mid:g} rps: GPU-seconds with an instance (serving), computing (busy) "
                  "and serving but not computing (idle):\n", "| system | serving | busy | idle |", "|---|---|---|---|"]
        for system in systems:
            c = s["table"].get(f"{reg['key']}|{system}|{mid:g}")
            if c:
                lines.append(f"| {system} | {_pm(c['gpu_seconds_serving'], 1, 0)} | {_pm(c['gpu_seconds_busy'], 1, 0)} | "
                             f"{_pm(c['gpu_seconds_idle'], 1, 0)} |")
        lines += ["", "P99 TTFT of each system over WarmServe's (geometric mean of per-seed ratios, 95% interval):\n",
                  "| system | " + " | ".join(f"{r:g} rps" for r in reg["rates"]) + " |",
                  "|---|" + "---|" * len(reg["rates"])]
        for system in systems:
            if system == "warmserve":
                continue
            lines.append(f"| {system} | " + " | ".join(
                _ratio(s["p99_ratio_over_warmserve"][k]) if (k := f"{reg['key']}|{system}|{r:g}")
                in s["p99_ratio_over_warmserve"] else "-" for r in reg["rates"]) + " |")
        lines.append("")
    if report["cost_curve"]:
        lines += [f"## Cost sweep, regime (a) at {report['cost_rate']:g} rps\n",
                  "| system and cost | P99 TTFT (s) | SLO % | P99 over WarmServe's (default costs) |", "|---|---|---|---|"]
        for key, c in report["cost_curve"].items():
            lines.append(f"| {key} | {_pm(c['ttft_p99_s'])} | {_pm(c['slo_attainment'], 100, 1)} | "
                         f"{_ratio(c['p99_over_warmserve'])} |")
    for point, table in report.get("ablations", {}).items():
        regime, rate = point.split("@")
        lines += ["", f"## Ablations of WarmServe, regime ({regime}) at {rate} rps\n",
                  "| variant | P99 TTFT (s) | SLO % | prewarm hit rate | GPU-s |", "|---|---|---|---|---|"]
        for name, c in table.items():
            lines.append(f"| {name} | {_pm(c['ttft_p99_s'])} | {_pm(c['slo_attainment'], 100, 1)} | "
                         f"{_pm(c['prewarm_hit_rate'])} | {_pm(c['gpu_seconds_serving'], 1, 0)} |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, regimes = report["summary"], report["regimes"]
    rows = (("slo_attainment", 100, "SLO attainment (%)"), ("ttft_p99_s", 1, "P99 TTFT (s)"),
            ("gpu_seconds_serving", 1, "GPU-seconds serving"))
    fig, axes = plt.subplots(len(rows), len(regimes), figsize=(4.2 * len(regimes), 10), squeeze=False)
    for col, reg in enumerate(regimes):
        for system in report["systems"]:
            pts = [(r, s["table"][k]) for r in reg["rates"] if (k := f"{reg['key']}|{system}|{r:g}") in s["table"]]
            for row, (metric, scale, _) in enumerate(rows):
                if pts:
                    axes[row, col].errorbar([p[0] for p in pts], [scale * p[1][metric][0] for p in pts],
                                            yerr=[scale * (p[1][metric][1] if p[1][metric][1] == p[1][metric][1] else 0)
                                                  for p in pts], marker="o", ms=3, capsize=2, label=system)
        axes[0, col].set_title(textwrap.fill(reg["label"], 48), fontsize=8)
        axes[0, col].axhline(100 * SUSTAIN, color="grey", ls="--", lw=0.8)
        axes[0, col].set_ylim(0, 102)
        axes[1, col].set_yscale("log")
        axes[-1, col].set_xlabel("requests/s (all models)")
        for row, (_, _, label) in enumerate(rows):
            axes[row, col].set_ylabel(label)
            axes[row, col].set_xscale("log", base=2)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=100)
    plt.close(fig)
    if report["cost_curve"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for prefix in sorted({k.split("|")[0] for k in report["cost_curve"]}):
            pts = sorted((float(k.split("=")[1]), v["p99_over_warmserve"][0]) for k, v in report["cost_curve"].items()
                         if k.startswith(prefix + "|"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prefix)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("engine start (ServerlessLLM) or prewarm-hit cost (WarmServe), s")
        ax.set_ylabel("P99 TTFT over WarmServe's")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}_costs.png", dpi=100)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="regime (a), two rates, two seeds, 2-minute replays")
    p.add_argument("--regimes", nargs="+", default=[r.key for r in REGIMES])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--duration", type=float, default=600.0, help="replay seconds")
    p.add_argument("--warmup", type=float, default=120.0)
    p.add_argument("--time-scale", type=float, default=18.0,
                   help="trace seconds per replay second: 18 compresses three trace hours into 10 minutes; 1 is real time")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    p.add_argument("--calibration", type=Path, help="a calibration file (loadtest/calibrate_gpu.py) to use")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--ablation-rates", type=float, nargs="+", default=list(ABLATION_RATES),
                   help=f"rates of regime ({ABLATION_REGIME}) at which every WarmServe ablation runs too")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--name", default="headline")
    p.add_argument("--from-json", type=Path, help="summarise and draw the runs of an earlier report again, run nothing")
    a = p.parse_args()
    if a.from_json:
        return write(json.loads(a.from_json.read_text()), a.out, a.name)
    regimes = [r for r in REGIMES if r.key in a.regimes]
    if a.quick:
        regimes = [replace(REGIMES[0], rates=(4, 16))]
        a.seeds, a.duration, a.warmup = a.seeds[:2], 120.0, 60.0
    base = ClusterSpec()
    if a.calibration:  # measured device constants and start-up costs instead of the published ones
        device, costs = load_calibration(a.calibration)
        base = replace(base, device=device or base.device, costs=base.costs.with_(**costs))
    points = [(ABLATION_REGIME, float(r)) for r in a.ablation_rates]
    jobs = []
    for reg in regimes:
        for rate in reg.rates:
            for seed in a.seeds:
                extra = []
                if (reg.key, rate) == COST_POINT and not a.quick:
                    extra = [("serverlessllm", base.costs.with_(engine_start_s=e), "cost") for e in ENGINE_STARTS
                             if e != base.costs.engine_start_s]
                    extra += [("warmserve", base.costs.with_(activate_s=x), "cost") for x in ACTIVATES
                              if x != base.costs.activate_s]
                if (reg.key, rate) in points and not a.quick:
                    extra += [(name, base.costs, "ablation") for name in ABLATIONS]
                jobs.append((reg, rate, seed, a.duration, a.warmup, tuple(a.systems), extra, base, a.time_scale))
    jobs.sort(key=lambda j: -j[1] * len(j[0].models) / j[0].nodes)  # the longest first, so none is left alone at the end
    started, results = time.perf_counter(), []
    with mp.get_context("spawn").Pool(a.processes) as pool:
        for i, out in enumerate(pool.imap_unordered(_job, jobs), start=1):
            results += out
            progress(i, len(jobs), started, f"({out[0]['regime']}) {out[0]['rate_rps']:g} rps seed {out[0]['seed']}")
    print()
    report = header(a.name, vars(a))
    report.update(regimes=[asdict(r) for r in regimes], systems=list(a.systems), seeds=a.seeds, duration_s=a.duration,
                  warmup_s=a.warmup, cluster=asdict(base), costs=asdict(base.costs), cost_rate=COST_POINT[1],
                  ablation_points=points, runs=results, wall_s=round(time.perf_counter() - started, 1),
                  quick=a.quick)
    write(report, a.out, a.name)


def write(report: dict, out: Path, name: str) -> None:
    """Summarise the runs of ``report`` and write its JSON, markdown and PNGs; exit non-zero if numbers are missing."""
    regimes = [Regime(**{**r, "models": tuple(r["models"]), "rates": tuple(r["rates"])}) for r in report["regimes"]]
    results = report["runs"]
    report.update(summary=summarise(results, regimes, report["systems"], report["seeds"]),
                  cost_curve={} if report.get("quick") else cost_curve(results, report["cost_rate"]),
                  ablations=ablation_table(results, ablation_points(report)),
                  missing=missing_points(results, regimes, report["systems"], report["seeds"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / f"{name}.md").write_text(md)
    plots(report, out, name)
    print(md)
    print(f"saved {out / name}.json, .md and PNGs (runs took {report['wall_s']} s)")
    if report["missing"]:
        sys.exit(f"missing numbers for {report['missing']}")


if __name__ == "__main__":
    main()
