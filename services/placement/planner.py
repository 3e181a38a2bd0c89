"""From what placement sees (catalog, live workers, forecasts, operator holds, the current plan) to the
inputs of the pure placement policy and back to a plan of (model, worker) copies.

Each worker drives one device, so a GPU here is a worker; a model with tensor parallelism above 1 would
need a group of workers acting as one engine, which the worker does not do yet: such models are skipped
with that reason (the policy itself places them, and the simulator uses that).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from shared.messages import CopyState, Forecast, ModelSpec, ModelStatus, OperatorHold, PlacementPlan, PlannedCopy, WorkerState
from shared.policy.prewarm_placement import Gpu, ModelDemand, PlacementConfig, PlacementDecision, Replica, place

HELD = (CopyState.LOADING, CopyState.PREWARMED)  # what a prewarmed-copy plan is about
SERVING = (CopyState.ACTIVE, CopyState.DRAINING)


@dataclass(frozen=True)
class PlanInputs:
    gpus: list[Gpu]
    demands: list[ModelDemand]
    existing: list[Replica]
    skipped: dict[str, str]


def measured_bytes(spec: ModelSpec, workers: Sequence[WorkerState], catalog: Mapping[str, ModelSpec]) -> int:
    """A model's footprint as workers measured it (the largest report). A model no worker has loaded yet
    is its catalog size plus the largest engine overhead measured for any other model (measured minus
    catalog bytes: process, runtime, KV space on a CPU), so a first plan does not ask a worker for a copy
    that cannot fit once loaded."""
    seen = [c.weight_bytes for w in workers for c in w.copies if c.model == spec.slug and c.weight_bytes]
    if seen:
        return max(seen)
    overhead = max((c.weight_bytes - catalog[c.model].parameter_bytes for w in workers for c in w.copies
                    if c.weight_bytes and c.model in catalog), default=0)
    return spec.parameter_bytes + max(overhead, 0)


def gpu_of(w: WorkerState, index: int, kv_reservation: bool) -> Gpu:
    """Memory prewarmed copies may use: the budget minus serving instances' weights and KV cache, plus
    (with KV reservation) the KV those instances hold beyond their targets."""
    serving = sum(c.weight_bytes for c in w.copies if c.state in SERVING)
    capacity = w.memory_budget_bytes - serving - w.kv_bytes + (w.reclaimable_bytes if kv_reservation else 0)
    return Gpu(gpu_id=w.worker_id, node=w.node, index=index, capacity_bytes=max(capacity, 0))


def plan_inputs(catalog: Mapping[str, ModelSpec], workers: Sequence[WorkerState], forecasts: Mapping[str, Forecast],
                holds: Collection[OperatorHold], current: PlacementPlan | None, kv_reservation: bool) -> PlanInputs:
    drained = {h.target for h in holds if h.kind == "drain"}
    pinned = {h.target: h.copies for h in holds if h.kind == "pin"}
    usable = [w for w in workers if w.worker_id not in drained]
    per_node: dict[str, int] = {}
    gpus = []
    for w in sorted(usable, key=lambda w: (w.node, w.device, w.worker_id)):
        gpus.append(gpu_of(w, per_node.get(w.node, 0), kv_reservation))
        per_node[w.node] = per_node.get(w.node, 0) + 1
    skipped, demands = {}, []
    for slug, spec in sorted(catalog.items()):
        if spec.status is not ModelStatus.ACTIVE:
            continue
        if spec.tensor_parallel_size > 1:
            skipped[slug] = (f"tensor parallel size {spec.tensor_parallel_size}: each worker drives one device, "
                             "multi-device groups are not supported by the worker")
            continue
        fc = forecasts.get(slug)
        running = sum(1 for w in usable for c in w.copies if c.model == slug and c.state is CopyState.ACTIVE)
        demands.append(ModelDemand(model=slug, weight_bytes=measured_bytes(spec, workers, catalog), tp=1,
                                   avg=fc.predicted_avg if fc else 0.0, peak=fc.predicted_peak_upper if fc else 0.0,
                                   running=running, pinned=pinned.get(slug, 0)))
    live_ids = {g.gpu_id for g in gpus}
    existing = {(c.model, w.worker_id) for w in usable for c in w.copies if c.state in HELD}
    if current is not None:  # copies planned and not there yet (a prewarm under way) stay planned
        existing |= {(c.model, c.worker_id) for c in current.copies if c.worker_id in live_ids}
    known = {d.model for d in demands}
    replicas = [Replica(m, (wid,)) for m, wid in sorted(existing) if m in known and wid in live_ids]
    return PlanInputs(gpus, demands, replicas, skipped)


def to_plan(decision: PlacementDecision, inputs: PlanInputs, forecasts: Mapping[str, Forecast],
            config: PlacementConfig, now_s: float) -> PlacementPlan:
    copies = [PlannedCopy(model=r.model, worker_id=r.gpus[0]) for r in decision.replicas]
    def score(r: Replica) -> float | str:
        s = decision.scores.get(r, 0.0)
        return "pinned" if s == float("inf") else round(s, 3)
    return PlacementPlan(created_at_s=now_s, copies=copies, inputs={
        "strategy": config.strategy, "evict": config.evict, "batch_capacity": config.batch_capacity,
        "workers": {g.gpu_id: {"node": g.node, "capacity_bytes": g.capacity_bytes} for g in inputs.gpus},
        "demand": {d.model: {"avg": round(d.avg, 3), "peak_upper": round(d.peak, 3), "running": d.running,
                             "weight_bytes": d.weight_bytes, "pinned": d.pinned,
                             "forecast_method": forecasts[d.model].method if d.model in forecasts else None}
                   for d in inputs.demands},
        "scores": {f"{r.model}@{r.gpus[0]}": score(r) for r in decision.replicas},
        "added": [f"{r.model}@{r.gpus[0]}" for r in decision.added],
        "evicted": [f"{r.model}@{r.gpus[0]}" for r in decision.evicted],
        "skipped": {**inputs.skipped, **decision.skipped},
    })


def plan(catalog, workers, forecasts, holds, current, config: PlacementConfig, kv_reservation: bool,
         now_s: float, prewarm: bool = True) -> PlacementPlan:
    """``prewarm=False`` ignores forecasts and keeps no unpinned copy (reactive autoscaling: an instance
    that stops is evicted, and the next scale-up loads from scratch)."""
    if not workers and current is not None and current.copies:
        # no worker has reported lately (a NATS outage, everything restarting): a plan for no workers would
        # forget where the copies are, and the next one would place them afresh, moving them around
        return current
    if not prewarm:
        forecasts = {}
    inputs = plan_inputs(catalog, workers, forecasts, holds, current, kv_reservation)
    if not prewarm:
        pinned = {d.model for d in inputs.demands if d.pinned}
        inputs = replace(inputs, existing=[r for r in inputs.existing if r.model in pinned])
    decision = place(inputs.demands, inputs.gpus, inputs.existing, config)
    out = to_plan(decision, inputs, forecasts, config, now_s)
    out.inputs["prewarm"] = prewarm
    return out
