"""Placement's decisions, free of I/O: cluster view + catalog + forecasts + operator holds + now -> plan.

The service (``main.py``) and the simulator both drive it. It turns what placement sees into the inputs of
the pure evict-aware policy (``shared.policy.prewarm_placement``) and its decision back into a plan of
(model, device group) copies, with the inputs and scores that explain it. Options the simulator compares
are options the service can run too (``PlacementCoreConfig``).

- **Capacity.** A device's memory for prewarmed copies is its budget minus what serving instances hold
  (weights and KV cache) plus, with KV reservation, the KV they hold beyond their targets.
- **Sizes.** A model is as big as a worker measured it; one no worker has loaded yet is its catalog size
  plus the largest engine overhead measured for any other model, so a first plan does not ask a worker
  for a copy that cannot fit once loaded.
- **Idle first** (``idle_first``): a copy on a serving device cannot become an instance until that
  instance stops, so each model's replicas are placed on idle devices first (copies on serving devices do
  not count), and only then in the KV that instances lend. With ``forecast_freed_first`` a device counts
  as idle in the first pass also when its instances are forecast to stop within the next window (their
  model has more instances than the scale-down rule leaves for its forecast average; the least busy stop
  first), so copies go
  where an activation will soon be possible.
- **No prewarming** (``prewarm=False``): forecasts are ignored and no unpinned copy is kept (reactive
  autoscaling: a stopped instance is evicted, the next scale-up loads from scratch).
- **The lead.** A copy planned now can serve once it is loaded and its engine is up (``copy_ready_s``:
  engine start plus weight bytes at ``copy_load_bytes_per_s``). Each model's burst replicas are sized for
  the largest upper peak over the forecast windows from the one running now to the one running when such a
  copy is ready: the lead its load time matches, the lead the forecaster's band was sized and scored for.
- **No workers.** While no worker reports (a NATS outage, everything restarting) the plan in force is
  kept: a plan for no workers would forget where the copies are, and the next would move them around.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from shared.messages import Forecast, ModelSpec, ModelStatus, OperatorHold, PlacementPlan, PlannedCopy
from shared.policy.autoscale import AutoscaleConfig, forecast_target
from shared.policy.cluster import ClusterView
from shared.policy.prewarm_placement import Gpu, ModelDemand, PlacementConfig, PlacementDecision, Replica, place


@dataclass(frozen=True)
class PlacementCoreConfig:
    placement: PlacementConfig = PlacementConfig()
    kv_reservation: bool = True
    prewarm: bool = True
    idle_first: bool = False
    peak: Literal["upper", "point"] = "upper"  # which forecast of the peak sizes the burst replicas
    max_tp: int = 1  # the largest tensor-parallel group the workers can run (each service worker drives one device)
    forecast_freed_first: bool = False  # idle first counts devices whose instances the forecast will stop as idle
    copy_start_s: float = 20.0  # engine start of a copy being loaded (vLLM on a GPU: measured 10-30 s)
    copy_load_bytes_per_s: float = 2e9  # storage to host memory, for a copy's weights

    def copy_ready_s(self, weight_bytes: int) -> float:
        """Seconds from planning a copy to its being able to serve."""
        return self.copy_start_s + weight_bytes / self.copy_load_bytes_per_s


@dataclass(frozen=True)
class PlanInputs:
    gpus: list[Gpu]
    demands: list[ModelDemand]
    existing: list[Replica]
    skipped: dict[str, str] = field(default_factory=dict)


def engine_overhead(view: ClusterView, catalog: Mapping[str, ModelSpec]) -> int:
    """The largest measured-minus-catalog size of any loaded model (process, runtime, KV space on a CPU)."""
    return max((n * max(catalog[m].tensor_parallel_size, 1) - catalog[m].parameter_bytes
                for m, n in view.measured.items() if m in catalog), default=0)


def footprint(spec: ModelSpec, view: ClusterView, overhead: int) -> int:
    """A whole model's bytes as workers measured them (per device x tp), else catalog plus ``overhead``."""
    seen = view.measured_bytes(spec.slug)
    if seen:
        return seen * max(spec.tensor_parallel_size, 1)
    return spec.parameter_bytes + max(overhead, 0)


class PlacementCore:
    def __init__(self, config: PlacementCoreConfig = PlacementCoreConfig()):
        self.config = config
        self.current: PlacementPlan | None = None  # the plan in force
        self.latest: PlacementPlan | None = None  # the newest computed (fresher inputs, maybe the same copies)

    def gpus(self, view: ClusterView, drained: Collection[str] = (), *, lend: bool | None = None) -> list[Gpu]:
        lend = self.config.kv_reservation if lend is None else lend
        out = []
        for d in view.devices:
            if d.device_id in drained:
                continue
            capacity = d.memory_bytes - d.serving_bytes + (d.reclaimable_bytes if lend else 0)
            out.append(Gpu(gpu_id=d.device_id, node=d.node, index=d.index, capacity_bytes=max(capacity, 0)))
        return out

    def inputs(self, view: ClusterView, catalog: Mapping[str, ModelSpec], forecasts: Mapping[str, Forecast],
               holds: Collection[OperatorHold], now_s: float | None = None) -> PlanInputs:
        """What the policy is given. ``now_s`` picks the forecast windows a copy planned now serves (None:
        the forecast's first window)."""
        drained = {h.target for h in holds if h.kind == "drain"}
        pinned = {h.target: h.copies for h in holds if h.kind == "pin"}
        gpus = self.gpus(view, drained)
        usable = {g.gpu_id for g in gpus}
        skipped, demands = {}, []
        overhead = engine_overhead(view, catalog)
        for slug, spec in sorted(catalog.items()):
            if spec.status is not ModelStatus.ACTIVE:
                continue
            if spec.tensor_parallel_size > self.config.max_tp:
                skipped[slug] = (f"tensor parallel size {spec.tensor_parallel_size}: each worker drives one device, "
                                 "multi-device groups are not supported by the worker")
                continue
            fc = forecasts.get(slug) if self.config.prewarm else None
            size = footprint(spec, view, overhead)
            peak = peak_to_cover(fc, now_s, self.config.copy_ready_s(size), self.config.peak == "upper") if fc else 0.0
            running = sum(1 for i in view.instances_of(slug) if usable.issuperset(i.devices))
            demands.append(ModelDemand(model=slug, weight_bytes=size,
                                       tp=spec.tensor_parallel_size, avg=fc.predicted_avg if fc else 0.0, peak=peak,
                                       running=running, pinned=pinned.get(slug, 0)))
        existing = {(c.model, c.devices) for c in view.copies}
        if self.current is not None:  # copies planned and not there yet (a prewarm under way) stay planned
            existing |= {(c.model, c.group) for c in self.current.copies}
        known = {d.model for d in demands}
        if not self.config.prewarm:
            known = {d.model for d in demands if d.pinned}
        replicas = [Replica(m, g) for m, g in sorted(existing) if m in known and usable.issuperset(g)]
        return PlanInputs(gpus, demands, replicas, skipped)

    def freed(self, view: ClusterView, forecasts: Mapping[str, Forecast]) -> set[str]:
        """Devices whose every instance the forecast says will stop within the next window: a model with more
        instances than the scale-down rule leaves for its forecast average (``forecast_target``) loses its
        least busy ones first (the autoscaler's order). A model without a forecast keeps what it has."""
        cfg = AutoscaleConfig(batch_capacity=self.config.placement.batch_capacity)
        stopping: set[str] = set()
        for model in {i.model for i in view.instances}:
            fc = forecasts.get(model)
            if fc is None:
                continue
            running = sorted(view.instances_of(model), key=lambda i: (i.in_flight, -i.started_at_s, i.instance_id))
            extra = max(len(running) - forecast_target(fc.predicted_avg, cfg), 0)
            stopping |= {i.instance_id for i in running[:extra]}
        return {g for g in view.serving_devices
                if all(not i.draining and i.instance_id in stopping for i in view.instances_on(g))}

    def decide(self, view: ClusterView, inputs: PlanInputs,
               forecasts: Mapping[str, Forecast] | None = None) -> PlacementDecision:
        if not self.config.idle_first:
            return place(inputs.demands, inputs.gpus, inputs.existing, self.config.placement)
        # pass 1: idle devices only (and, with forecast_freed_first, those whose instances will stop), with the
        # copies already on them; pass 2: everything, lent KV included
        usable = {u.gpu_id for u in inputs.gpus}
        freed = self.freed(view, forecasts or {}) if self.config.forecast_freed_first and self.config.prewarm else set()
        capacity = {g.gpu_id: g for g in inputs.gpus}
        idle = [g for g in self.gpus(view, lend=False) if not view.serving(g.gpu_id) and g.gpu_id in usable]
        idle += [capacity[gid] for gid in sorted(freed & usable)]
        idle_ids = {g.gpu_id for g in idle}
        first = place(inputs.demands, idle, [r for r in inputs.existing if idle_ids.issuperset(r.gpus)],
                      self.config.placement)
        kept = list(first.replicas) + [r for r in inputs.existing if not idle_ids.issuperset(r.gpus)]
        second = place(inputs.demands, inputs.gpus, kept, self.config.placement)
        return replace(second, added=tuple(r for r in second.replicas if r not in inputs.existing),
                       evicted=tuple(r for r in inputs.existing if r not in second.replicas),
                       skipped={**first.skipped, **second.skipped})

    def plan(self, view: ClusterView, catalog: Mapping[str, ModelSpec], forecasts: Mapping[str, Forecast],
             holds: Collection[OperatorHold], now_s: float) -> PlacementPlan:
        """The plan for now. It becomes ``current`` only through ``adopt`` (once published)."""
        if not view.devices and self.current is not None and self.current.copies:
            self.latest = self.current
            return self.current
        inputs = self.inputs(view, catalog, forecasts, holds, now_s)
        decision = self.decide(view, inputs, forecasts)
        self.latest = to_plan(decision, inputs, forecasts if self.config.prewarm else {}, self.config, now_s)
        return self.latest

    def changed(self, plan: PlacementPlan) -> bool:
        return not plan.same_copies(self.current)

    def adopt(self, plan: PlacementPlan) -> None:
        self.current = plan


def peak_to_cover(fc: Forecast, now_s: float | None, ready_s: float, upper: bool) -> float:
    """The largest peak (upper or point) over the forecast's windows from the one running at ``now_s`` to
    the one running when a copy planned now is ready. Outside the horizon: its nearest window."""
    points = fc.points
    if not points or now_s is None:
        return fc.predicted_peak_upper if upper else fc.predicted_peak
    served = [p for p in points if p.window_start_s + fc.window_s > now_s and p.window_start_s <= now_s + ready_s]
    if not served:
        served = [points[0] if now_s + ready_s < points[0].window_start_s else points[-1]]
    return max(p.peak_upper if upper else p.peak for p in served)


def to_plan(decision: PlacementDecision, inputs: PlanInputs, forecasts: Mapping[str, Forecast],
            config: PlacementCoreConfig, now_s: float) -> PlacementPlan:
    copies = [PlannedCopy(model=r.model, worker_id=r.gpus[0], devices=list(r.gpus) if len(r.gpus) > 1 else [])
              for r in decision.replicas]

    def name(r: Replica) -> str:
        return f"{r.model}@{'+'.join(r.gpus)}"

    def score(r: Replica) -> float | str:
        s = decision.scores.get(r, 0.0)
        return "pinned" if s == float("inf") else round(s, 3)
    p = config.placement
    return PlacementPlan(created_at_s=now_s, copies=copies, inputs={
        "strategy": p.strategy, "evict": p.evict, "batch_capacity": p.batch_capacity, "prewarm": config.prewarm,
        "idle_first": config.idle_first, "forecast_freed_first": config.forecast_freed_first,
        "workers": {g.gpu_id: {"node": g.node, "capacity_bytes": g.capacity_bytes} for g in inputs.gpus},
        "demand": {d.model: {"avg": round(d.avg, 3), "peak_upper": round(d.peak, 3), "running": d.running,
                             "weight_bytes": d.weight_bytes, "pinned": d.pinned,
                             "forecast_method": forecasts[d.model].method if d.model in forecasts else None}
                   for d in inputs.demands},
        "scores": {name(r): score(r) for r in decision.replicas},
        "added": [name(r) for r in decision.added],
        "evicted": [name(r) for r in decision.evicted],
        "skipped": {**inputs.skipped, **decision.skipped},
    })
