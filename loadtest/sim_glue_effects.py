"""Counterfactuals: how much each behaviour of the services' decision glue moves the simulator's numbers.

The simulator runs the services' cores. This script turns single behaviours of those cores back to what the
simulator's old copy of the glue did, one at a time, and reports attainment and P99 TTFT over several seeds,
so a change in the headline numbers can be traced to its cause. The toggles patch the cores in this process
only; nothing here is a setting of the services.

    .venv/bin/python -m loadtest.sim_glue_effects                     # 5 seeds, about three minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager
from dataclasses import replace

import services.gateway.admission_core as admission
from services.prewarm_orchestrator.core import OrchestratorCore
from shared.messages import CommandKind
from simulator.run import WARMSERVE, simulate
from simulator.workload import WorkloadSpec, build


@contextmanager
def nothing():
    yield


@contextmanager
def ask_without_backoff():
    """The gateway asks again every 0.5 s after a refused ask (no doubling up to 8 s)."""
    saved = admission.ASK_DELAY_MAX_S
    admission.ASK_DELAY_MAX_S = admission.ASK_DELAY_MIN_S
    try:
        yield
    finally:
        admission.ASK_DELAY_MAX_S = saved


@contextmanager
def offer_prewarming_devices():
    """A device with a prewarm in flight is offered for a scale-up like an idle one."""
    original = OrchestratorCore.scale_up

    def scale_up(self, view, model, tp, shard_bytes, now_s, **kw):
        saved = self.busy
        self.busy = {k: c for k, c in saved.items() if c.kind is not CommandKind.PREWARM}
        try:
            return original(self, view, model, tp, shard_bytes, now_s, **kw)
        finally:
            self.busy = {**saved, **{k: c for k, c in self.busy.items() if k not in saved}}

    OrchestratorCore.scale_up = scale_up
    try:
        yield
    finally:
        OrchestratorCore.scale_up = original


@contextmanager
def paper_with_two_way_kv():
    """The paper's configuration, but an instance may take back the KV it lent to prewarmed copies."""
    saved = WARMSERVE["warmserve-paper"]
    WARMSERVE["warmserve-paper"] = replace(saved, kv_mode="two-way")
    try:
        yield
    finally:
        WARMSERVE["warmserve-paper"] = saved


VARIANTS = {
    "as the services run": nothing,
    "ask without back-off": ask_without_backoff,
    "offer prewarming devices": offer_prewarming_devices,
    "paper with two-way KV": paper_with_two_way_kv,
}
SYSTEM_NAMES = ("serverlessllm", "warmserve-paper", "warmserve")


def interval(values: list[float]) -> str:
    """Mean and the half-width of its 95% interval (Student's t over the seeds)."""
    from scipy.stats import t

    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3g}"
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.3g} ± {half:.2g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rps", type=float, default=4.0)
    a = p.parse_args()
    workloads = [build(WorkloadSpec(total_rps=a.rps, seed=s)) for s in a.seeds]
    print(f"Regime: {len(workloads[0].models)} models on 2 x 8 GPUs (more models than GPU groups), {a.rps:g} "
          f"requests/s, 20-minute replays, seeds {a.seeds}. Mean ± 95% interval over the seeds; a request never "
          "served counts as 999 s in the P99. The change columns pair each seed with itself as the services run "
          "(same workload), so they are tighter than the levels.\n")
    print("| variant | system | SLO attainment (%) | P99 TTFT (s) | never served (total) | change in attainment "
          "(points) | change in P99 (s) |")
    print("|---|---|---|---|---|---|---|")
    base: dict[str, list[dict]] = {}
    for variant, toggle in VARIANTS.items():
        with toggle():
            for name in SYSTEM_NAMES:
                runs = [simulate(name, w) for w in workloads]
                ref = base.setdefault(name, runs)
                d_slo = [100 * (r["slo_attainment"] - b["slo_attainment"]) for r, b in zip(runs, ref)]
                d_p99 = [r["ttft_p99_s"] - b["ttft_p99_s"] for r, b in zip(runs, ref)]
                print(f"| {variant} | {name} | {interval([100 * r['slo_attainment'] for r in runs])} | "
                      f"{interval([r['ttft_p99_s'] for r in runs])} | {sum(r['unserved'] for r in runs)} | "
                      f"{interval(d_slo) if runs is not ref else ''} | {interval(d_p99) if runs is not ref else ''} |",
                      flush=True)


if __name__ == "__main__":
    main()
