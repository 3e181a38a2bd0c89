"""Run one system on one workload and summarise what happened."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.baselines import MuxServe, ServerlessLLM, ServerlessLLMConfig, StaticDedicated, static_gpus
from simulator.costs import Costs
from simulator.engine import Simulator
from simulator.hardware import A100_80G, DeviceSpec
from simulator.systems import WarmServe, WarmServeConfig
from simulator.workload import Workload
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.prewarm_placement import PlacementConfig

UNSERVED_TTFT_S = 999.0  # what a request that is never served counts as (benchmark rule: refused is a failure)


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 2
    gpus_per_node: int = 8
    device: DeviceSpec = A100_80G  # or a calibrated one (simulator/calibration.py)
    costs: Costs = field(default_factory=Costs)
    batch_capacity: int = 32  # WarmServe's B: requests an instance is handed at once, and its autoscaler's unit
    slo_ttft_s: float = 1.0  # a request meets the SLO when its first token comes within this ...
    slo_tpot_s: float = 0.1  # ... and its later tokens come at most this far apart on average

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


PAPER_PLACEMENT = PlacementConfig(evict=False)

WARMSERVE = {
    "warmserve-paper": WarmServeConfig(name="warmserve-paper", methods=("paper",), use_upper=False,
                                       placement=PAPER_PLACEMENT, kv_mode="one-way", idle_first=False,
                                       handover=False, forecast_scale_down=False, shared_tier=False),
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
    "warmserve/no-handover": WarmServeConfig(name="warmserve/no-handover", handover=False),
    "warmserve/no-forecast-scale-down": WarmServeConfig(name="warmserve/no-forecast-scale-down",
                                                        forecast_scale_down=False),
    "warmserve/forecast-freed-first": WarmServeConfig(name="warmserve/forecast-freed-first",
                                                      forecast_freed_first=True),
    "warmserve/no-shared-tier": WarmServeConfig(name="warmserve/no-shared-tier", shared_tier=False),
}
SERVERLESSLLM = {  # its defaults (target 1, keep-alive 0), the keep-alive swept, and the newer release's target 5
    "serverlessllm": ServerlessLLMConfig(),
    "serverlessllm-ka30": ServerlessLLMConfig(keep_alive_s=30.0, name="serverlessllm-ka30"),
    "serverlessllm-ka300": ServerlessLLMConfig(keep_alive_s=300.0, name="serverlessllm-ka300"),
    "serverlessllm-t5": ServerlessLLMConfig(target=5, name="serverlessllm-t5"),
}
BASELINES = (*SERVERLESSLLM, "muxserve", "muxserve-ideal", "static")
SYSTEMS = BASELINES + tuple(WARMSERVE)


def make_system(name: str, workload: Workload, cluster: ClusterSpec):
    if name in SERVERLESSLLM:
        return ServerlessLLM(SERVERLESSLLM[name])
    if name in ("muxserve", "muxserve-ideal"):
        rates = {m: s * workload.spec.total_rps for m, s in workload.shares.items()}
        return MuxServe(rates, "emulated" if name == "muxserve" else "ideal")
    if name == "static":
        return StaticDedicated()
    config = {**WARMSERVE, **ABLATIONS}[name]
    spec = workload.spec
    season = max(1, round(86400 / spec.time_scale / spec.window_s))
    return WarmServe(AutoscaleConfig(batch_capacity=cluster.batch_capacity), config, workload.history,
                     spec.window_s, season)


def simulate(name: str, workload: Workload, cluster: ClusterSpec = ClusterSpec(), check_memory: bool = False,
             drain_s: float = 600.0) -> dict:
    """One system on one workload; requests still unserved ``drain_s`` after the replay ends count as never served."""
    nodes = cluster.nodes
    if name == "static":  # as many GPUs as one group per model takes: the reference for what a latency costs
        nodes = -(-static_gpus(workload.models) // cluster.gpus_per_node)
    sim = Simulator(list(workload.models), nodes, cluster.gpus_per_node, cluster.device, cluster.costs,
                    cluster.batch_capacity)
    sim.system = make_system(name, workload, cluster)
    sim.check = check_memory
    sim.run(workload.requests, workload.spec.duration_s, start_s=-workload.spec.warmup_s, drain_s=drain_s)
    return summarise(name, sim, workload, cluster)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarise(name: str, sim: Simulator, workload: Workload, cluster: ClusterSpec) -> dict:
    recs = [sim.records[r.rid] for r in workload.requests if r.rid in sim.records and r.arrival_s >= 0]
    served = [r for r in recs if r.ttft_s is not None]
    # a request never served counts as a TTFT of UNSERVED_TTFT_S in every mean and percentile, never left out
    ttft = [r.ttft_s if r.ttft_s is not None else UNSERVED_TTFT_S for r in recs]
    finished = [r for r in served if r.tpot_s is not None]
    ok = sum(1 for r in finished if r.ttft_s <= cluster.slo_ttft_s and r.tpot_s <= cluster.slo_tpot_s)
    ok_ttft = sum(1 for r in served if r.ttft_s <= cluster.slo_ttft_s)
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
    gpu_s = {k: round(v - sim.gpu_seconds_at_start[k], 1) for k, v in sim.gpu_seconds().items()}
    tpot = [r.tpot_s for r in finished]
    return {
        "system": name, "requests": len(recs), "served": len(served), "unserved": len(recs) - len(served),
        "slo_attainment": round(ok / len(recs), 4) if recs else None,
        "slo_ttft_attainment": round(ok_ttft / len(recs), 4) if recs else None,
        "ttft_mean_s": round(float(np.mean(ttft)), 4) if ttft else None,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
        "tpot_mean_s": round(float(np.mean(tpot)), 5) if tpot else None, "tpot_p99_s": _pct(tpot, 99),
        "gpus": len(sim.gpus), "gpu_seconds_serving": gpu_s["serving"], "gpu_seconds_busy": gpu_s["busy"],
        "gpu_seconds_idle": round(gpu_s["serving"] - gpu_s["busy"], 1),
        "preemptions": sum(r.preemptions for r in recs), "segments": sim.steps,
        "outcomes": outcomes,
        "prewarm_hit_rate": round(hits / (hits + colds), 4) if hits + colds else None,
        "per_model": per_model, "memory_timeline": sim.timeline,
    }

