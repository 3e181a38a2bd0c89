"""The orchestrator's view of load and what the pure policies ask for, round by round.

Feeds each model's in-flight requests (from worker heartbeats) into a 5 s load window, asks the
autoscaler how many instances the model needs, and works out KV reservation targets; the orchestrator
executes what comes out. Drained workers' instances are stopped whatever the load.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from shared.messages import CopyState, WorkerState
from shared.policy.autoscale import AutoscaleConfig, InstanceView, LoadWindow, decide
from shared.policy.kv import next_kv_target


@dataclass(frozen=True)
class Stop:
    model: str
    worker_id: str
    instance_id: str
    reason: str


@dataclass(frozen=True)
class KvTarget:
    model: str
    worker_id: str
    free_blocks: int


@dataclass(frozen=True)
class Round:
    scale_up: dict[str, int]  # model -> instances to add
    stops: list[Stop]
    kv_targets: list[KvTarget]
    loads: dict[str, float]


@dataclass
class GatewayLoad:
    """Each gateway's latest per-second concurrency per model (requests in flight *and* waiting in its
    queue): the load instances cannot see when they are full. Old reports expire."""

    max_age_s: float = 3.0
    reports: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # model -> gateway -> (t, c)

    def add(self, model: str, gateway: str, at_s: float, concurrency: float) -> None:
        self.reports.setdefault(model, {})[gateway] = (at_s, concurrency)

    def current(self, now_s: float) -> dict[str, float]:
        out = {}
        for model, by_gw in self.reports.items():
            fresh = [c for t, c in by_gw.values() if now_s - t <= self.max_age_s]
            if fresh:
                out[model] = sum(fresh)
        return out


class AutoscalerState:
    def __init__(self, config: AutoscaleConfig, kv_reservation: bool = True):
        self.config = config
        self.kv_reservation = kv_reservation
        self.windows: dict[str, LoadWindow] = {}
        self.kv_unsupported: set[str] = set()  # workers whose engine cannot resize KV (vLLM)

    def step(self, workers: Sequence[WorkerState], now_s: float, drained: Collection[str] = (),
             busy_models: Collection[str] = (), gateway_load: Mapping[str, float] | None = None) -> Round:
        """``gateway_load``: per-model concurrency the gateways report, queued requests included; the load
        is the larger of that and the instances' in-flight requests."""
        instances: dict[str, list[InstanceView]] = {}
        in_flight: dict[str, int] = {}
        stops: list[Stop] = []
        kv: list[KvTarget] = []
        for w in workers:
            for c in w.copies:
                if c.state is not CopyState.ACTIVE or c.instance_id is None:
                    continue
                in_flight[c.model] = in_flight.get(c.model, 0) + c.in_flight
                if w.worker_id in drained:
                    stops.append(Stop(c.model, w.worker_id, c.instance_id, "worker drained by an operator"))
                    continue
                instances.setdefault(c.model, []).append(InstanceView(c.instance_id, w.worker_id, c.since_s, c.in_flight))
                if self.kv_reservation and c.kv_total_blocks > 0 and w.worker_id not in self.kv_unsupported:
                    target = next_kv_target(c.kv_target_free_blocks, c.kv_total_blocks, c.in_flight,
                                            w.batch_capacity or self.config.batch_capacity)
                    if target is not None:
                        kv.append(KvTarget(c.model, w.worker_id, target))
        gateway_load = gateway_load or {}
        for model in set(in_flight) | set(self.windows) | {m for m, v in gateway_load.items() if v > 0}:
            load = max(in_flight.get(model, 0), gateway_load.get(model, 0.0))
            self.windows.setdefault(model, LoadWindow(self.config.window_s)).add(now_s, load)
        scale_up, loads = {}, {}
        for model, window in list(self.windows.items()):
            load = window.mean(now_s)
            loads[model] = round(load, 3)
            ins = instances.get(model, [])
            if not ins and load == 0 and model not in in_flight and not gateway_load.get(model):
                del self.windows[model]  # idle and gone: forget it
                continue
            if model in busy_models:
                continue  # a scale-up or stop is under way: decide again once it lands
            d = decide(load, ins, now_s, self.config, window_full=window.full(now_s))
            if d.add and ins:  # a model with no instance is started by the gateway's request (it knows the wait)
                scale_up[model] = d.add
            stops += [Stop(model, i.worker_id, i.instance_id, f"autoscaler: {d.reason}") for i in d.stop]
        return Round(scale_up, stops, kv, loads)
