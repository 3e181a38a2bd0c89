"""The pure half of ``loadtest.vs_vllm``: the open-loop arrival schedule and prompts, each request's figures
from its recorded stream, the summary of a run (a request not served counts as ``UNSERVED_S`` in every
figure), intervals across seeds, WarmServe / vLLM ratios and the markdown report. No processes, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from loadtest.replay_client import UNSERVED_TTFT_S, prompt_of

UNSERVED_S = UNSERVED_TTFT_S  # a request not served counts as this in every figure, never as a fast answer
TARGET_RATIO = 1.2  # WarmServe / vLLM, issue 17
TARGETS = ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s")
METRICS = ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "itl_p99_s")
SYSTEMS = ("vllm", "warmserve")
LABEL = {"vllm": "vLLM OpenAI server", "warmserve": "WarmServe gateway"}


# ---- the load (pure) ----------------------------------------------------------------------------------


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, seconds): the same for every system at a given (rate, seed)."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    out, t = [], 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= seconds:
            return out
        out.append(t)


def prompts(n: int, input_tokens: int, seed: int) -> list[str]:
    """One prompt per request, ``input_tokens`` plain words each (mostly a token each), different per request
    (no cache makes one cheaper than a user's) and the same for every system."""
    return [prompt_of(input_tokens, seed * 1_000_003 + i) for i in range(n)]


@dataclass
class Rec:
    """One request as the client saw it; times in seconds from the start of its run."""

    at_s: float  # scheduled
    sent_s: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)  # SSE events carrying content: (time, text)
    done_s: float | None = None  # end of the stream (or of the attempt)
    end: str = "lost"  # ok | error | lost
    finish: str | None = None  # the choice's finish_reason
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the usage event (stream_options.include_usage)
    outcome: str | None = None  # x-warmserve-outcome (WarmServe only)


def request_metrics(r: Rec) -> dict:
    """TTFT, TPOT and ITLs of one request. Served = ended ``ok`` with a finish reason; anything else gets
    ``None`` figures (the summaries count it as ``UNSERVED_S``). A served answer with no content at all
    counts its whole time as its TTFT."""
    served = r.end == "ok" and r.sent_s is not None and r.done_s is not None
    if not served:
        return {"served": False, "ttft_s": None, "tpot_s": None, "itl_s": [], "tokens": r.completion_tokens}
    times = [t for t, _ in r.events]
    tokens = r.completion_tokens if r.completion_tokens is not None else len(times)
    ttft = (times[0] if times else r.done_s) - r.sent_s
    tpot = (r.done_s - times[0]) / (tokens - 1) if times and tokens > 1 else None
    return {"served": True, "ttft_s": ttft, "tpot_s": tpot, "itl_s": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def run_summary(recs: list[Rec], output_tokens: int) -> dict:
    """One run's figures over every request: a request not served is ``UNSERVED_S`` in the TTFT, TPOT and
    ITL distributions (one value each), so a run that refuses more never looks faster."""
    m = [request_metrics(r) for r in recs]
    served = [x for x in m if x["served"]]
    unserved = len(m) - len(served)
    ttft = [x["ttft_s"] for x in served] + [UNSERVED_S] * unserved
    tpot = [x["tpot_s"] for x in served if x["tpot_s"] is not None] + [UNSERVED_S] * unserved
    itl = [g for x in served for g in x["itl_s"]] + [UNSERVED_S] * unserved
    ends = Counter(r.end for r in recs)
    return {"requests": len(recs), "ok": ends["ok"], "errors": ends["error"], "lost": ends["lost"],
            "unserved": unserved, "short": sum(x["tokens"] is not None and x["tokens"] < output_tokens for x in served),
            "ttft_mean_s": _mean(ttft), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_mean_s": _mean(tpot), "tpot_p99_s": pct(tpot, 99),
            "itl_mean_s": _mean(itl), "itl_p99_s": pct(itl, 99),
            "prompt_tokens_mean": _mean([r.prompt_tokens for r in recs if r.prompt_tokens is not None]),
            "completion_tokens_mean": _mean([x["tokens"] for x in served if x["tokens"] is not None]),
            "max_late_s": max((r.sent_s - r.at_s for r in recs if r.sent_s is not None), default=0.0),
            "outcomes": dict(Counter(r.outcome for r in recs if r.outcome))}


def interval(xs: list[float]) -> dict:
    """Mean over seeds and the half-width of its 95% interval (Student's t; None with one seed)."""
    from scipy.stats import t

    half = (float(t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))
            if len(xs) > 1 else None)
    return {"mean": float(np.mean(xs)), "ci95_half": half, "seeds": [float(x) for x in xs]}


def across_seeds(runs: list[dict]) -> dict:
    """Per figure: mean over the seeds' runs with its interval; counts summed."""
    out = {k: interval([r[k] for r in runs]) for k in METRICS if all(r[k] is not None for r in runs)}
    for k in ("requests", "ok", "errors", "lost", "unserved", "short"):
        out[k] = sum(r[k] for r in runs)
    tokens = [r["prompt_tokens_mean"] for r in runs if r.get("prompt_tokens_mean") is not None]
    out["prompt_tokens_mean"] = float(np.mean(tokens)) if tokens else None  # the same prompts: equal per system
    return out


def ratios(ws_runs: list[dict], vllm_runs: list[dict]) -> dict:
    """WarmServe / vLLM per target figure: the ratio of the means over seeds (what the target is judged
    on) and the interval of the paired per-seed ratios (both systems saw the same arrivals and prompts)."""
    out = {}
    for k in TARGETS:
        ws, vl = [r[k] for r in ws_runs], [r[k] for r in vllm_runs]
        if None in ws or None in vl or not vl or min(vl) <= 0:
            continue
        ratio = float(np.mean(ws) / np.mean(vl))
        out[k] = {"ratio": ratio, "per_seed": interval([a / b for a, b in zip(ws, vl)]),
                  "target": TARGET_RATIO, "pass": ratio <= TARGET_RATIO}
    return out


# ---- the report (pure) --------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    ms = v * 1e3
    return f"{ms:,.2f}" if ms < 10 else f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    half = "" if s["ci95_half"] is None else f" ± {fmt_ms(s['ci95_half'])}"
    return f"{fmt_ms(s['mean'])}{half}"


def table(results: dict) -> str:
    """Markdown: per rate and system, mean ± 95% half-width over seeds, in ms."""
    head = ("| rate (req/s) | system | requests | not served (error / lost) | TTFT mean | TTFT P50 | TTFT P99 "
            "| TPOT mean | TPOT P99 | ITL P99 |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for rate, by_system in results.items():
        for system, s in by_system.items():
            lines.append(f"| {rate} | {LABEL.get(system, system)} | {s['requests']:,} | "
                         f"{s['unserved']:,} ({s['errors']:,} / {s['lost']:,}) | "
                         + " | ".join(_cell(s.get(k)) for k in METRICS) + " |")
    return "\n".join(lines)


def ratio_table(by_rate: dict) -> str:
    names = {"ttft_mean_s": "TTFT mean", "ttft_p99_s": "TTFT P99", "tpot_mean_s": "TPOT mean", "tpot_p99_s": "TPOT P99"}
    lines = [f"| rate (req/s) | figure | WarmServe / vLLM | per-seed ratios, mean ± 95% | target ≤ {TARGET_RATIO:g}x |",
             "|---|---|---|---|---|"]
    for rate, rs in by_rate.items():
        for k, r in rs.items():
            ps = r["per_seed"]
            spread = f"{ps['mean']:.2f}" + ("" if ps["ci95_half"] is None else f" ± {ps['ci95_half']:.2f}")
            lines.append(f"| {rate} | {names[k]} | {r['ratio']:.2f}x | {spread} | {'pass' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    p = report["params"]
    seeds = p["seeds"]
    out = [f"# WarmServe vs vLLM's OpenAI server ({report['when']})", "",
           f"`{report['command']}`", "",
           f"Regime: {report['regime']}.", "",
           f"Each cell: mean over {seeds} seed{'s' if seeds != 1 else ''} ± half-width of the 95% interval "
           f"(Student's t), in ms. A request not served counts as {UNSERVED_S:g} s in every figure; ITL is over "
           "the gaps between SSE events carrying content.", ""]
    if seeds < 5:
        out += [f"**{seeds} seed{'s' if seeds != 1 else ''}: a trial, not a result (the standard is 5 or more).**", ""]
    out += [table(report["results"]), ""]
    seen = [f"{LABEL.get(system, system)} {s['prompt_tokens_mean']:.1f} at {rate} req/s"
            for rate, by_system in report["results"].items() for system, s in by_system.items()
            if s.get("prompt_tokens_mean") is not None]
    if seen:
        out += ["Prompt tokens per request, as each system counted them (usage): " + "; ".join(seen) + ".", ""]
    if report["ratios"]:
        out += [f"WarmServe / vLLM: ratio of the means (the target, ≤ {TARGET_RATIO:g}x) and the paired per-seed "
                "ratios.", "", ratio_table(report["ratios"]), ""]
    notes = report.get("notes") or []
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
