"""``warmserve forecast ...``: status, history import, accuracy and the backtest."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

BENCH_DIR = Path("docs/benchmarks")


def _source(a) -> str:
    if a.rates:
        return f"rates:{a.rates}"
    if a.requests:
        return f"requests:{a.requests}"
    return a.trace


def _spec(a, window_s: float):
    from tooling.workload.series import SeriesSpec

    return SeriesSpec(source=_source(a), window_s=window_s, seed=a.seed, rate_scale=a.rate_scale)


async def _forecaster(verb: str, args: dict) -> object:
    from tooling.cli.client import _admin

    return await _admin(verb, args, forecaster=True, timeout=120)


def cmd_status(a) -> int:
    status = asyncio.run(_forecaster("status", {}))
    if a.json:
        print(json.dumps(status, indent=2))
        return 0
    r = status["rounds"]
    print(f"window {status['window_s']:g} s, caught up: {status['caught_up']}, rounds: {r['count']} "
          f"(first {r['first_s']} s, last {r['last_s']} s), late samples: {status['late_samples']}, "
          f"pending writes: {status['pending_writes']}")
    print(f"{'model':24s} {'history':>8s} {'method (peak/avg)':26s} {'next peak':>10s} {'upper':>8s}  note")
    for m in status["models"]:
        nxt = m["next"] or {}
        methods = f"{m['method'] or '-'}/{m['method_avg'] or '-'}"
        print(f"{m['model']:24s} {m['history_windows']:8d} {methods:26s} {nxt.get('peak', 0):10.2f} "
              f"{nxt.get('peak_upper', 0):8.2f}  {m['note']}")
    return 0


def cmd_import(a) -> int:
    from tooling.workload.series import build_series

    status = asyncio.run(_forecaster("status", {}))
    window_s = status["window_s"]
    mapping = dict(m.split("=", 1) for m in a.map) if a.map else {}
    print(f"building {window_s:g} s windows from {_source(a)} (seed {a.seed}) ...", flush=True)
    series = build_series(_spec(a, window_s))
    unknown = set(mapping) - set(series)
    if unknown:
        raise SystemExit(f"error: {sorted(unknown)} not in the trace; it has: {', '.join(sorted(series))}")
    targets = mapping or {name: name for name in series}
    for name, model in targets.items():
        rows = [(o.avg, o.peak, o.arrivals) for o in series[name]]
        result = asyncio.run(_forecaster("import", {"model": model, "window_s": window_s, "windows": rows,
                                                   "source": f"{_source(a)}#{name}"}))
        print(f"{name} -> {model}: {result['windows_written']} of {len(rows)} windows stored "
              f"({time.strftime('%Y-%m-%d %H:%M', time.gmtime(result['from_s']))} to "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(result['to_s']))} UTC); forecaster rebuilt")
    return 0


def cmd_accuracy(a) -> int:
    from tooling.cli.client import _database_url
    from shared.db import repo
    from shared.db.engine import create_engine, sessionmaker
    from shared.policy.forecast import accuracy

    async def fetch():
        engine = create_engine(_database_url())
        try:
            async with sessionmaker(engine)() as session:
                return await repo.forecast_accuracy(session, time.time() - a.hours * 3600, lead=a.lead)
        finally:
            await engine.dispose()

    rows = asyncio.run(fetch())
    if not rows:
        print(f"no forecast with an observed value in the last {a.hours:g} h")
        return 0
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    print(f"{'model':24s} {'windows':>8s} {'MAPE avg':>9s} {'MAPE peak':>10s} {'peak under>20%':>15s} "
          f"{'upper under>20%':>16s}  methods")
    for model, rs in by_model.items():
        avg = accuracy([r["observed_avg"] for r in rs], [r["predicted_avg"] for r in rs])
        peak = accuracy([r["observed_peak"] for r in rs], [r["predicted_peak"] for r in rs])
        upper = accuracy([r["observed_peak"] for r in rs], [r["predicted_peak_upper"] for r in rs])
        methods = ",".join(sorted({r["method"] for r in rs}))
        print(f"{model:24s} {len(rs):8d} {_pct(avg['mape']):>9s} {_pct(peak['mape']):>10s} "
              f"{_pct(peak['under_20pct']):>15s} {_pct(upper['under_20pct']):>16s}  {methods}")
    return 0


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def cmd_backtest(a) -> int:
    from shared.policy.forecast import ForecastConfig
    from tooling.workload.backtest import backtest, band_table, plot, table
    from tooling.workload.series import build_series

    spec = _spec(a, a.window_s)
    print(f"building {a.window_s:g} s windows from {spec.source} (seed {a.seed}) ...", flush=True)
    series = build_series(spec)
    config = ForecastConfig.for_window(a.window_s, **({"methods": tuple(a.methods.split(","))} if a.methods else {}))
    t0 = time.perf_counter()
    result = backtest(series, config)
    result.update(series_spec=spec.as_dict(), window_s=a.window_s, seconds=round(time.perf_counter() - t0, 1),
                  command="warmserve forecast backtest " + " ".join(a.argv))
    print(table(result))
    print()
    print(band_table(result))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"forecast_backtest_{Path(spec.source.split(':')[-1]).stem}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    plot(result, out / f"{stem}.png")
    print(f"saved {out / (stem + '.json')} and {out / (stem + '.png')} ({result['seconds']} s)")
    return 0


def _add_source(p: argparse.ArgumentParser) -> None:
    from tooling.workload.series import SOURCES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", choices=SOURCES, default="servegen", help="a trace shipped in tooling/traces")
    src.add_argument("--rates", help="a per-model rate file (ServeGen format: model,t_start_s,rate_rps[,cv])")
    src.add_argument("--requests", help="a request trace (Azure format: TIMESTAMP,ContextTokens,GeneratedTokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for the synthesised arrivals and lengths")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply every rate by this")


def add_parser(sub) -> None:
    fc = sub.add_parser("forecast", help="the forecaster: status, history import, accuracy, backtest")
    fsub = fc.add_subparsers(dest="forecast_command", required=True)
    st = fsub.add_parser("status", aliases=["show"], help="each model's method, history and next forecast")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    im = fsub.add_parser("import", help="seed the forecaster's history from a trace file")
    _add_source(im)
    im.add_argument("--map", action="append", metavar="TRACE_MODEL=SLUG",
                    help="store a trace model's load as a catalog model's (repeatable; default: same names)")
    im.set_defaults(func=cmd_import)
    ac = fsub.add_parser("accuracy", help="forecast accuracy from Postgres history (observed vs predicted)")
    ac.add_argument("--hours", type=float, default=24.0)
    ac.add_argument("--lead", type=int, default=1, help="1 = forecasts made one window ahead")
    ac.set_defaults(func=cmd_accuracy)
    bt = fsub.add_parser("backtest", help="replay a series through the forecaster and score every method")
    _add_source(bt)
    bt.add_argument("--window-s", type=float, default=300.0)
    bt.add_argument("--methods", help="comma-separated candidate methods (default: all)")
    bt.add_argument("--out", default=str(BENCH_DIR), help="folder for the JSON and PNG")
    bt.add_argument("--name", help="file stem (default: forecast_backtest_<source>)")
    bt.set_defaults(func=cmd_backtest)
