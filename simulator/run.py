"""Run one system on one workload and summarise what happened."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.engine import Simulator
from simulator.systems import Autoscaling, GpuSharing, WarmServe, WarmServeConfig
from simulator.workload import Workload
from shared.perfmodel import GPU_A100_PCIE, PerfModel
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.prewarm_placement import PlacementConfig


UNSERVED_TTFT_S = 999.0  # what a request that is never served counts as (benchmark rule: refused is a failure)


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 2
    gpus_per_node: int = 8
    gpu_bytes: int = 80 * 10**9
    batch_capacity: int = 32
    slo_ttft_s: float = 1.0  # a request meets the SLO when its first token comes within this


PAPER_PLACEMENT = PlacementConfig(evict=False)

SYSTEMS = {
    "autoscaling": None,
    "gpu-sharing": None,
    "warmserve-paper": WarmServeConfig(name="warmserve-paper", methods=("paper",), use_upper=False,
                                       placement=PAPER_PLACEMENT, kv_mode="one-way", idle_first=False),
    "warmserve": WarmServeConfig(),
}
ABLATIONS = {
    "warmserve/no-prewarm": WarmServeConfig(name="warmserve/no-prewarm", prewarm=False),
    "warmserve/round-robin": WarmServeConfig(name="warmserve/round-robin",
                                             placement=PlacementConfig(strategy="round-robin")),
    "warmserve/no-kv-reservation": WarmServeConfig(name="warmserve/no-kv-reservation", kv_mode="none"),
    "warmserve/no-eviction": WarmServeConfig(name="warmserve/no-eviction", placement=PlacementConfig(evict=False)),
    "warmserve/paper-forecaster": WarmServeConfig(name="warmserve/paper-forecaster", methods=("paper",),
                                                  use_upper=False),
}


def make_system(name: str, workload: Workload, cluster: ClusterSpec):
    autoscale = AutoscaleConfig(batch_capacity=cluster.batch_capacity)
    if name == "autoscaling":
        return Autoscaling(autoscale)
    if name == "gpu-sharing":
        return GpuSharing(autoscale, workload.shares)
    config = {**SYSTEMS, **ABLATIONS}[name]
    spec = workload.spec
    season = max(1, round(86400 / spec.time_scale / spec.window_s))
    return WarmServe(autoscale, config, workload.history, spec.window_s, season)


def simulate(name: str, workload: Workload, cluster: ClusterSpec = ClusterSpec(), perf: PerfModel = GPU_A100_PCIE,
             check_memory: bool = False) -> dict:
    sim = Simulator(workload.models, cluster.nodes, cluster.gpus_per_node, cluster.gpu_bytes, perf,
                    cluster.batch_capacity)
    sim.system = make_system(name, workload, cluster)
    sim.check = check_memory
    sim.run(workload.requests, workload.spec.duration_s, start_s=-workload.spec.warmup_s)
    return summarise(name, sim, workload, cluster)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarise(name: str, sim: Simulator, workload: Workload, cluster: ClusterSpec) -> dict:
    recs = [sim.records[r.rid] for r in workload.requests if r.rid in sim.records and r.arrival_s >= 0]
    served = [r for r in recs if r.ttft_s is not None]
    # a request never served counts as a TTFT of UNSERVED_TTFT_S in every mean and percentile, never left out
    ttft = [r.ttft_s if r.ttft_s is not None else UNSERVED_TTFT_S for r in recs]
    ok = sum(1 for r in served if r.ttft_s <= cluster.slo_ttft_s)
    outcomes: dict[str, int] = {}
    for r in served:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    per_model = {}
    for m in workload.models:
        t = [r.ttft_s if r.ttft_s is not None else UNSERVED_TTFT_S for r in recs if r.request.model == m.name]
        per_model[m.name] = {"requests": len(t), "served": sum(1 for r in served if r.request.model == m.name),
                             "share": round(workload.shares.get(m.name, 0.0), 4),
                             "ttft_mean_s": round(float(np.mean(t)), 4) if t else None, "ttft_p50_s": _pct(t, 50),
                             "ttft_p90_s": _pct(t, 90), "ttft_p99_s": _pct(t, 99)}
    hits, colds = outcomes.get("prewarm_hit", 0), outcomes.get("cold", 0)
    return {
        "system": name, "requests": len(recs), "served": len(served), "unserved": len(recs) - len(served),
        "slo_attainment": round(ok / len(recs), 4) if recs else None,
        "ttft_mean_s": round(float(np.mean(ttft)), 4) if ttft else None,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
        "tpot_mean_s": round(float(np.mean([r.tpot_s for r in served])), 5) if served else None,
        "outcomes": outcomes,
        "prewarm_hit_rate": round(hits / (hits + colds), 4) if hits + colds else None,
        "per_model": per_model, "memory_timeline": sim.timeline,
    }

