"""The bands tried for the forecaster (docs/forecasting.md, "What was tried, and what was kept").

Each candidate band is scored as the backtest scores the shipped one (``band_score``: the share of windows
over it by more than 20%, its over-provisioning against the last value plus the matched fixed margin), on
the Azure conversation and code weeks, average and peak concurrency, leads 1 and 3, from the second day.
All candidates put the 0.97 quantile of past errors at a lead on top of a base (split-conformal) unless
their name says otherwise. The last part tries forecasting a model as the sum of its clients' forecasts on
the ServeGen day's per-client files.

Run:  python -m loadtest.forecast_band_tries [--seed 0]   (about 5 minutes on one core)
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loadtest.report import header, save
from shared.policy.band import BandConfig, ewma, seasonal_history
from shared.policy.forecast import (
    ForecastConfig,
    SeriesForecaster,
    accuracy,
    band_score,
)
from shared.policy.forecast_methods import stl_jumps
from tooling.workload.backtest import lagged
from tooling.workload.series import SeriesSpec, build_series

OUT = Path("docs/benchmarks/forecast_band_tries.json")
DAY = 288
Q = 0.97
FLOOR = 0.5
LEADS = (1, 3)


def conformal(y: np.ndarray, base: np.ndarray, lead: int, scale: np.ndarray | None = None,
              window: int = 7 * DAY) -> np.ndarray:
    """Upper = base x exp(q of past log ratios [/ scale] x scale): the ratios known when the forecast was made."""
    ratios = np.log(np.maximum(y, FLOOR) / np.maximum(base, FLOOR))
    z = ratios if scale is None else ratios / scale
    upper = np.full(len(y), np.nan)
    for t in range(2 * DAY, len(y)):
        past = z[max(0, t - window):t - lead + 1]
        past = past[np.isfinite(past)]
        if len(past) >= 24:
            q = np.quantile(past, Q)
            upper[t] = max(base[t], FLOOR) * np.exp(q * (1.0 if scale is None else scale[t]))
    return upper


def slot_conformal(y: np.ndarray, base: np.ndarray, lead: int, k: int = 6) -> np.ndarray:
    """The quantile of past ratios at the same time of day (+-k windows, previous days) only."""
    ratios = np.log(np.maximum(y, FLOOR) / np.maximum(base, FLOOR))
    upper = np.full(len(y), np.nan)
    for t in range(2 * DAY, len(y)):
        idx = [s for d in range(1, 8) for s in range(t - d * DAY - k, t - d * DAY + k + 1) if 0 <= s <= t - lead]
        past = ratios[idx]
        past = past[np.isfinite(past)]
        upper[t] = max(base[t], FLOOR) * np.exp(np.quantile(past, Q))
    return upper


def volatility(y: np.ndarray, lead: int, n: int = 12) -> np.ndarray:
    """Mean absolute log change of the last ``n`` windows known when the forecast was made."""
    change = np.abs(np.diff(np.log(np.maximum(y, FLOOR)), prepend=np.nan))
    out = np.full(len(y), np.nan)
    for t in range(n + lead, len(y)):
        out[t] = np.nanmean(change[t - lead - n + 1:t - lead + 1]) + 1e-3
    return out


def level_power(y: np.ndarray, last: np.ndarray, lead: int) -> np.ndarray:
    """A spread that falls with the load as a power law fitted on past windows (Poisson-like noise)."""
    ratios = np.log(np.maximum(y, FLOOR) / np.maximum(last, FLOOR))
    logl = np.log(np.maximum(last, FLOOR))
    upper = np.full(len(y), np.nan)
    for t in range(2 * DAY, len(y)):
        idx = np.arange(max(lead, t - 7 * DAY), t - lead + 1)
        r, lv = ratios[idx], logl[idx]
        med = np.median(r)
        coef = np.polyfit(lv, np.log(np.abs(r - med) + 1e-3), 1)
        z = (r - med) / np.exp(np.polyval(coef, lv))
        upper[t] = max(last[t], FLOOR) * np.exp(med + np.quantile(z, Q) * np.exp(np.polyval(coef, logl[t])))
    return upper


def mstl_interval(y: np.ndarray, leads: tuple[int, ...]) -> dict[int, np.ndarray]:
    """MSTL's own prediction interval (level 94: its upper is the 97% quantile), refit every 12 windows."""
    from statsforecast.models import MSTL, AutoETS

    h = max(leads)
    upper, model = {lead: np.full(len(y), np.nan) for lead in leads}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(2 * DAY - h, len(y)):
            tail = y[max(0, t - 4 * DAY):t]
            if model is None or t % 12 == 0:
                model = MSTL(DAY, trend_forecaster=AutoETS(model="ANN"), stl_kwargs=stl_jumps(DAY))
                model.fit(tail)
                f = model.predict(h=h, level=[94])
            else:
                f = model.forward(y=tail, h=h, level=[94])
            for lead in leads:
                if t + lead - 1 < len(y):
                    upper[lead][t + lead - 1] = f["hi-94"][lead - 1]
    return upper


def shipped(y: np.ndarray, leads: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The forecaster's own band (SeriesForecaster, default methods)."""
    fc = SeriesForecaster(ForecastConfig.for_window(300.0))
    upper = {lead: np.full(len(y), np.nan) for lead in leads}
    for t, v in enumerate(y):
        f = fc.forecast()
        for lead in leads:
            if t + lead - 1 < len(y):
                upper[lead][t + lead - 1] = f.upper[lead - 1]
        fc.observe(v)
    return upper


def candidates(y: np.ndarray, lead: int, fitted: dict[str, dict[int, np.ndarray]]) -> dict[str, Callable[[], np.ndarray]]:
    last = lagged(y, lead)
    seasonal = np.full(len(y), np.nan)
    made = np.arange(len(y) - lead + 1)
    seasonal[made + lead - 1] = seasonal_history(y, BandConfig(), lead)[lead - 1][made]
    moving = lagged(ewma(y, 0.5), lead)

    def additive() -> np.ndarray:
        errors = y - seasonal
        upper = np.full(len(y), np.nan)
        for t in range(2 * DAY, len(y)):
            past = errors[max(0, t - 7 * DAY):t - lead + 1]
            upper[t] = seasonal[t] + np.quantile(past[np.isfinite(past)], Q)
        return upper

    return {
        "last value, rolling quantile (the margin learnt online)": lambda: conformal(y, last, lead),
        "last value, quantile of the same time of day": lambda: slot_conformal(y, last, lead),
        "last value, scaled by recent volatility": lambda: conformal(y, last, lead, volatility(y, lead)),
        "last value, spread a power law of the load": lambda: level_power(y, last, lead),
        "moving-average base (alpha 0.5)": lambda: conformal(y, moving, lead),
        "seasonal base": lambda: conformal(y, seasonal, lead),
        "seasonal base, additive errors": additive,
        "MSTL's prediction interval": lambda: fitted["mstl"][lead],
        "shipped: narrowest of seasonal, moving average, last, MSTL": lambda: fitted["shipped"][lead],
    }


def per_client_try(seed: int) -> dict:
    """Sum of per-client AutoETS forecasts against AutoETS on the total and the last value (ServeGen day)."""
    from statsforecast.models import AutoETS

    from tooling.workload import traces
    from tooling.workload.series import request_windows
    from tooling.workload.synth import ServiceModel, gamma_arrivals, sampled_requests

    def ets(y: np.ndarray) -> np.ndarray:
        p, model = np.full(len(y), np.nan), None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in range(24, len(y)):
                if model is None or t % 12 == 0:
                    model = AutoETS(model="ZZN")
                    model.fit(y[:t])
                    p[t] = max(model.predict(h=1)["mean"][0], 0.0)
                else:
                    p[t] = max(model.forward(y=y[:t], h=1)["mean"][0], 0.0)
        return p

    rng, service, hists, out = np.random.default_rng(seed), ServiceModel(), traces.read_token_histograms(), {}
    for model in traces.servegen_models():
        clients = []
        for c in traces.read_servegen_clients(model):
            reqs = sampled_requests(gamma_arrivals(c, rng), hists[(model, "input_tokens")],
                                    hists[(model, "output_tokens")], rng)
            clients.append(np.array([o.avg for o in request_windows(reqs, service, 300.0, 86400.0)]))
        total = np.sum(clients, axis=0)
        busy = [y for y in clients if (y > 0).sum() > 30]  # a client seen in few windows: its last value
        summed = np.sum([ets(y) for y in busy], axis=0) + np.sum(
            [lagged(y, 1) for y in clients if (y > 0).sum() <= 30], axis=0)
        start = 48
        out[model] = {"clients": len(clients), "fitted": len(busy),
                      "mape_total_autoets": accuracy(total[start:], ets(total)[start:])["mape"],
                      "mape_sum_of_clients_autoets": accuracy(total[start:], summed[start:])["mape"],
                      "mape_last_value": accuracy(total[start:], lagged(total, 1)[start:])["mape"]}
        print(f"  per client, {model}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[model].items()
                                                      if k.startswith("mape")), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    report = header("forecast_band_tries", vars(a))
    rows = []
    for source in ("azure-conv-week", "azure-code-week"):
        obs = build_series(SeriesSpec(source, seed=a.seed))[source]
        for target in ("avg", "peak"):
            y = np.array([getattr(o, target) for o in obs])
            fitted = {"mstl": mstl_interval(y, LEADS), "shipped": shipped(y, LEADS)}
            for lead in LEADS:
                last = lagged(y, lead)
                for name, make in candidates(y, lead, fitted).items():
                    upper = make()
                    s = band_score(y[2 * DAY:], upper[2 * DAY:], last[2 * DAY:])
                    rows.append({"source": source, "series": target, "lead": lead, "band": name,
                                 "miss": s.miss, "over": s.over, "margin_over": s.margin_over, "ratio": s.ratio})
                    print(f"{source} {target} lead {lead}: {name}: miss {100 * s.miss:.1f}% "
                          f"over {100 * s.over:.0f}% ratio {s.ratio if s.ratio is None else round(s.ratio, 2)}",
                          flush=True)
    report["rows"] = rows
    report["per_client"] = per_client_try(a.seed)
    save(report, a.out)


if __name__ == "__main__":
    main()
