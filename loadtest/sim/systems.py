"""The systems compared, as policies plugged into the simulator. Every decision comes from shared/policy:
forecasts (``forecast``), placement (``prewarm_placement``), GPU choice (``scaleup.choose_group``),
autoscaling (``autoscale``), KV reservation (``kv``) and load measurement (``concurrency``).

- ``Autoscaling`` (ServerlessLLM-like): instances loaded on demand at host-to-device speed, stopped after a
  keep-alive, weights dropped; no prewarming.
- ``GpuSharing`` (MuxServe-like): every model placed once, statically, by popularity; GPUs' memory and
  compute shared by the models placed on them; no cold starts, no scaling.
- ``WarmServe``: forecast-driven prewarming and the autoscaler, configured as the paper (its forecaster,
  point forecasts, no eviction, one-way KV reservation) or as ours (statsforecast selection, upper
  quantiles, eviction, two-way KV reservation), and the ablations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from loadtest.sim.engine import Instance, Simulator
from shared.messages import Outcome
from shared.policy.autoscale import AutoscaleConfig, InstanceView, LoadWindow, decide
from shared.policy.concurrency import ConcurrencyTracker
from shared.policy.forecast import ForecastConfig, ModelForecaster, WindowObservation
from shared.policy.kv import free_blocks_target
from shared.policy.prewarm_placement import Gpu as PGpu
from shared.policy.prewarm_placement import ModelDemand, PlacementConfig, Replica, place
from shared.policy.scaleup import GpuView, choose_group


class System:
    name = "system"
    keep_weights = True

    def __init__(self, autoscale: AutoscaleConfig):
        self.autoscale = autoscale
        self.windows: dict[str, LoadWindow] = {}

    # hooks the simulator calls
    def on_arrival(self, sim: Simulator, model: str) -> None: ...
    def on_complete(self, sim: Simulator, model: str) -> None: ...
    def on_kv_short(self, sim: Simulator, model: str, tokens: int) -> bool:
        return False

    def compute_share(self, sim: Simulator, inst: Instance) -> int:
        return 1

    def on_queued(self, sim: Simulator, model: str) -> None:
        """Requests wait: start one instance unless one is already on its way (the gateway's scale-up)."""
        if not any(i.model.name == model and i.ready_at > sim.now for i in sim.instances.values()):
            self.scale_up(sim, model)

    def scale_up(self, sim: Simulator, model: str) -> Instance | None:
        m = sim.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        views = [GpuView(g.gid, g.node, g.index, bool(g.instances), g.free(),
                         tuple((c.model, c.shard, c.ready(sim.now)) for c in g.copies.values()))
                 for g in sim.gpus.values()]
        groups = [(c.model, c.gpus, c.ready(sim.now)) for c in sim.copies()]
        choice = choose_group(model, m.tp, shard, views, groups)
        if choice is None:
            return None
        gpus, outcome = choice
        kv = self.initial_kv(sim, model, gpus)
        if outcome is Outcome.PREWARM_HIT:
            return sim.start_instance(model, gpus, "prewarm_hit", sim.perf.activate_s, kv_limit=kv)
        own = sim.gpus[gpus[0]].copies.get(model)
        if own is not None:  # still loading: it serves once loaded
            return sim.start_instance(model, gpus, "cold", max(own.ready_at - sim.now, 0) + sim.perf.activate_s,
                                      kv_limit=kv)
        return sim.start_instance(model, gpus, "cold", sim.perf.load_s(m.weight_bytes, m.tp), kv_limit=kv)

    def initial_kv(self, sim: Simulator, model: str, gpus: tuple[str, ...]) -> int | None:
        """KV bytes per GPU a new instance takes (None: all the memory there, evicting every copy)."""
        return None

    def on_tick(self, sim: Simulator) -> None:
        """The autoscaler: load over the last window from in-flight requests, up and down by the paper's rule."""
        by_model: dict[str, list[Instance]] = {}
        for inst in sim.instances.values():
            by_model.setdefault(inst.model.name, []).append(inst)
        for model in sim.models:
            insts = by_model.get(model, [])
            # load: requests in flight and waiting (what the gateway's queue adds to the instances' view)
            demand = sum(len(i.running) for i in insts) + len(sim.queues[model])
            w = self.windows.setdefault(model, LoadWindow(self.autoscale.window_s))
            w.add(sim.now, demand)
            live = [i for i in insts if not i.draining]
            views = [InstanceView(str(i.iid), i.gpus[0], i.started_at, len(i.running)) for i in live]
            d = decide(w.mean(sim.now), views, sim.now, self.autoscale, window_full=w.full(sim.now))
            for _ in range(d.add if live else 0):
                if self.scale_up(sim, model) is None:
                    break
            for stop in d.stop:
                inst = sim.instances.get(int(stop.instance_id))
                if inst is not None:
                    inst.draining = True
                    if not inst.running:
                        sim.stop_instance(inst, keep_weights=self.keep_weights)
        for inst in list(sim.instances.values()):  # drained ones finish, then stop
            if inst.draining and not inst.running:
                sim.stop_instance(inst, keep_weights=self.keep_weights)


class Autoscaling(System):
    """ServerlessLLM-like: cold start on demand from host memory, keep-alive, no prewarmed copies."""

    name = "autoscaling"
    keep_weights = False

    def __init__(self, autoscale: AutoscaleConfig, keep_alive_s: float = 30.0):
        super().__init__(replace(autoscale, min_lifetime_s=keep_alive_s))


class GpuSharing(System):
    """MuxServe-like: all models placed at start by popularity; memory and compute shared."""

    name = "gpu-sharing"

    def __init__(self, autoscale: AutoscaleConfig, shares: dict[str, float]):
        super().__init__(autoscale)
        self.shares = shares
        self.placed = False

    def on_queued(self, sim: Simulator, model: str) -> None:
        return  # static: nothing to scale

    def on_tick(self, sim: Simulator) -> None:
        if not self.placed:
            self.place_all(sim)
            self.placed = True

    def place_all(self, sim: Simulator) -> None:
        """Largest load first onto the least-loaded group of its TP with room for its weights; then each
        GPU's remaining memory is split among its models in proportion to popularity for KV."""
        load = {g: 0.0 for g in sim.gpus}
        weight_left = {g: sim.gpus[g].capacity for g in sim.gpus}
        assigned: list[tuple[str, tuple[str, ...]]] = []
        for model in sorted(sim.models, key=lambda m: -self.shares.get(m, 0) * sim.models[m].weight_bytes):
            m = sim.models[model]
            shard = -(-int(m.weight_bytes) // m.tp)
            best = None
            for node in sorted({g.node for g in sim.gpus.values()}):
                gpus = sorted((g for g in sim.gpus.values() if g.node == node),
                              key=lambda g: (load[g.gid], g.index))
                fit = [g for g in gpus if weight_left[g.gid] >= shard * 1.15][: m.tp]  # keep 15% for KV
                if len(fit) == m.tp:
                    key = sum(load[g.gid] for g in fit)
                    if best is None or key < best[0]:
                        best = (key, tuple(g.gid for g in fit))
            if best is None:
                continue  # does not fit: its requests wait forever (counted as SLO misses)
            for gid in best[1]:
                load[gid] += self.shares.get(model, 0)
                weight_left[gid] -= shard
            assigned.append((model, best[1]))
        kv_share: dict[str, float] = {}
        for model, gpus in assigned:
            per_gpu = []
            for gid in gpus:
                total = sum(self.shares.get(o, 0) for o, gs in assigned if gid in gs) or 1.0
                per_gpu.append(weight_left[gid] * self.shares.get(model, 0) / total)
            kv_share[model] = min(per_gpu)
        for model, gpus in assigned:
            sim.start_instance(model, gpus, "warm", 0.0, kv_limit=int(kv_share[model]))

    def compute_share(self, sim: Simulator, inst: Instance) -> int:
        """Models sharing a GPU take turns: a step takes as long as the busy co-located instances."""
        busy = {i.iid for gid in inst.gpus for i in sim.gpus[gid].instances if i.running}
        return max(len(busy), 1)


@dataclass(frozen=True)
class WarmServeConfig:
    name: str = "warmserve"
    methods: tuple[str, ...] = ("naive", "seasonal-naive", "paper", "autoets", "mstl", "ensemble")
    use_upper: bool = True  # placement prewarms for the upper quantile of the peak
    placement: PlacementConfig = PlacementConfig()
    kv_mode: str = "two-way"  # none | one-way | two-way
    prewarm: bool = True
    placement_interval_s: float = 10.0
    idle_first: bool = True  # ours: what each model needs goes on idle GPUs first, then lent KV (paper: one pass)


class WarmServe(System):
    def __init__(self, autoscale: AutoscaleConfig, config: WarmServeConfig, history: dict[str, list[WindowObservation]],
                 window_s: float, season_windows: int):
        super().__init__(autoscale)
        self.config = config
        self.name = config.name
        self.keep_weights = config.prewarm
        self.window_s = window_s
        fc = ForecastConfig.for_window(window_s, methods=config.methods, season_length=season_windows,
                                       fit_windows=7 * season_windows, mstl_fit_windows=4 * season_windows,
                                       ets_fit_windows=2 * season_windows)
        self.forecasters = {m: ModelForecaster.replay(fc, h, 12) for m, h in history.items()}
        self.start_s = min((h[-1].start_s + window_s for h in history.values() if h), default=0.0)
        self.trackers: dict[str, ConcurrencyTracker] = {m: ConcurrencyTracker(self.start_s) for m in history}
        self.demand: dict[str, tuple[float, float]] = {}
        self.next_window = self.start_s
        self.next_placement = self.start_s

    def on_arrival(self, sim, model):
        self.trackers[model].arrive(sim.now)

    def on_complete(self, sim, model):
        self.trackers[model].complete(sim.now)

    def on_tick(self, sim: Simulator) -> None:
        if sim.now >= self.next_window:
            self.forecast(sim)
            self.next_window += self.window_s
        super().on_tick(sim)
        if self.config.prewarm and sim.now >= self.next_placement:
            self.replan(sim)
            self.next_placement = sim.now + self.config.placement_interval_s

    def forecast(self, sim: Simulator) -> None:
        for model, f in self.forecasters.items():
            if sim.now > self.start_s:
                s = self.trackers[model].roll(sim.now)
                f.observe(WindowObservation(sim.now - self.window_s, s.concurrency_avg, s.concurrency_peak))
            avg, peak = f.forecast()
            self.demand[model] = (avg.point[0], peak.upper[0] if self.config.use_upper else peak.point[0])

    def initial_kv(self, sim: Simulator, model: str, gpus: tuple[str, ...]) -> int | None:
        """With KV reservation a new instance takes KV for the requests waiting for it (the reservation
        target), so the other models' copies on its GPUs survive as far as memory allows."""
        if self.config.kv_mode == "none":
            return None
        m = sim.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        full = min(sim.gpus[g].capacity for g in gpus) - shard
        blocks = max(int(full * m.tp // m.kv_bytes_per_token) // 16, 1)
        waiting = len(sim.queues[model])
        tokens = free_blocks_target(blocks, waiting, sim.batch_capacity) * 16
        need = sum(r.request.input_tokens + r.request.output_tokens for r in list(sim.queues[model])[:sim.batch_capacity])
        return math.ceil(max(tokens, need) * m.kv_bytes_per_token / m.tp)

    def _keep_bytes(self, inst: Instance) -> int:
        """KV an instance keeps per GPU under reservation: what it uses plus its free-block target."""
        blocks = max(inst.kv_tokens(inst.kv_max) // 16, 1)
        free_tokens = free_blocks_target(blocks, len(inst.running), inst.batch_capacity) * 16
        return math.ceil((inst.used_tokens() + free_tokens) * inst.model.kv_bytes_per_token / len(inst.gpus))

    def _gpus(self, sim: Simulator, lend: bool) -> list[PGpu]:
        """Capacity for prewarmed copies: an idle GPU's whole memory; a serving GPU's KV beyond the
        instance's reservation target when it lends, else only what copies already hold there."""
        out = []
        for g in sim.gpus.values():
            if not g.instances:
                cap = g.capacity
            elif lend:
                inst = g.instances[0]
                cap = max(g.capacity - inst.shard - self._keep_bytes(inst), 0)
            else:
                cap = sum(c.shard for c in g.copies.values())
            out.append(PGpu(g.gid, g.node, g.index, cap))
        return out

    def replan(self, sim: Simulator) -> None:
        lend = self.config.kv_mode in ("one-way", "two-way")
        running = {}
        for inst in sim.instances.values():
            running[inst.model.name] = running.get(inst.model.name, 0) + (0 if inst.draining else 1)
        demands = [ModelDemand(m, int(sim.models[m].weight_bytes), sim.models[m].tp, *self.demand.get(m, (0.0, 0.0)),
                               running=running.get(m, 0)) for m in sim.models]
        if self.config.idle_first:
            # a copy on a serving GPU cannot become an instance until that instance stops: first place
            # what each model needs on idle GPUs only (copies on serving GPUs do not count), then use lent KV
            idle = [g for g in self._gpus(sim, False) if not sim.gpus[g.gpu_id].instances]
            on_idle = [Replica(c.model, c.gpus) for c in sim.copies()
                       if not any(sim.gpus[gid].instances for gid in c.gpus)]
            self._apply(sim, place(demands, idle, on_idle, self.config.placement), False)
        existing = [Replica(c.model, c.gpus) for c in sim.copies()]
        self._apply(sim, place(demands, self._gpus(sim, lend), existing, self.config.placement), lend)

    def _apply(self, sim: Simulator, decision, lend: bool) -> None:
        for r in decision.evicted:
            c = sim.gpus[r.gpus[0]].copies.get(r.model)
            if c is not None:
                sim.evict_copy(c)
        if lend:  # instances lend KV beyond their target; copies may be placed in it
            for inst in sim.instances.values():
                inst.kv_bytes = min(inst.kv_bytes, self._keep_bytes(inst))
        for r in decision.added:
            sim.add_copy(r.model, r.gpus, decision.scores.get(r, 0.0))
        if lend:  # what the copies did not take goes back to the KV cache (both ways)
            for inst in sim.instances.values():
                inst.kv_bytes = max(inst.kv_bytes, min(self._room(sim, inst, g) for g in inst.gpus))

    @staticmethod
    def _room(sim: Simulator, inst: Instance, gid: str) -> int:
        """KV bytes ``inst`` could have on ``gid`` given everything else there."""
        g = sim.gpus[gid]
        others = sum(i.shard + i.kv_bytes for i in g.instances if i is not inst)
        return g.capacity - sum(c.shard for c in g.copies.values()) - others - inst.shard

    def on_kv_short(self, sim: Simulator, model: str, tokens: int) -> bool:
        """Two-way KV reservation: an instance out of KV takes back memory it lent, evicting the
        lowest-scored copies on its GPUs. One-way (the paper): it cannot."""
        if self.config.kv_mode != "two-way":
            return False
        for inst in sorted((i for i in sim.instances.values() if i.model.name == model and not i.draining
                            and i.ready_at <= sim.now and len(i.running) < i.batch_capacity),
                           key=lambda i: i.iid):
            lent = sorted({id(c): c for g in inst.gpus for c in sim.gpus[g].copies.values()}.values(),
                          key=lambda c: c.score)
            if not lent:
                continue
            sim.evict_copy(lent[0])
            inst.kv_bytes = max(inst.kv_bytes, min(self._room(sim, inst, g) for g in inst.gpus))
            return True
        return False
