"""The systems compared, as configurations of the cores the services run, plugged into the simulator.

The simulator has no decision code of its own for WarmServe: admission (``services/gateway/admission_core``)
decides when to ask for an instance, the orchestrator core (``services/prewarm_orchestrator/core``) where it
goes, when instances stop, which copies to prewarm or evict and the KV targets, the placement core
(``services/placement/core``) which copies should exist, and the forecast core (``services/forecaster/core``)
the forecasts, fed with the same per-second demand samples a gateway publishes. What is modelled here is
the *workers'* side: executing those commands on the simulated GPUs (load times, memory, KV lending), and
reporting back when each command is done, as a worker's reply would.

- ``WarmServe``: all four cores, configured as the paper (its forecaster, point forecasts, no eviction,
  one-way KV reservation, one placement pass, reactive scale-down, no handover) or as ours (statsforecast
  selection, upper quantiles, eviction, two-way KV reservation, idle devices first, forecast-driven
  scale-down, handover), and the ablations. Its engines are pre-spawned:
  a prewarm hit costs ``Costs.activate_s``, a miss the weights from pinned host memory and the same wake-up.

The baselines (ServerlessLLM, MuxServe, a static cluster) follow their own systems' rules, in
``baselines.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from services.forecaster.core import ForecastCore, ForecastRoundConfig
from services.gateway.admission_core import AdmissionCore
from services.placement.core import PlacementCore, PlacementCoreConfig
from services.prewarm_orchestrator.core import Command, OrchestratorConfig, OrchestratorCore
from shared.messages import CommandKind, DemandSample, Forecast, ModelSpec, Outcome, PlannedCopy
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.cluster import ClusterView, CopyView, Device, InstanceView
from shared.policy.concurrency import ConcurrencyTracker
from shared.policy.forecast import ForecastConfig, WindowObservation
from shared.policy.kv import free_blocks_target
from shared.policy.prewarm_placement import PlacementConfig
from shared.policy.routing import Route
from simulator.engine import Instance, Record, Simulator

KV_BLOCK_TOKENS = 16
DEMAND_INTERVAL_S = 1.0  # a gateway publishes each model's demand about once a second


class System:
    """The orchestrator and admission cores over simulated workers; no placement (nothing is prewarmed)."""

    name = "system"
    keep_weights = True  # a stopped instance's weights stay as a prewarmed copy
    kv_mode = "none"  # none | one-way | two-way: whether instances lend KV beyond their target, and take it back

    def __init__(self, autoscale: AutoscaleConfig, *, handover: bool = True, forecast_scale_down: bool = True,
                 shared_tier: bool = True):
        self.autoscale = autoscale
        # a guest's KV cache comes from what the instances there lend: without KV reservation there is none
        self.orchestrator = OrchestratorCore(OrchestratorConfig(
            autoscale=autoscale, kv_reservation=self.kv_mode != "none", handover=handover,
            forecast_scale_down=forecast_scale_down, shared_tier=shared_tier and self.kv_mode != "none"))
        self.admission = AdmissionCore(queue_size=1 << 30)  # the simulator's queues are unbounded
        self.plan: list[PlannedCopy] = []
        self.scores: dict[str, float] = {}  # "model@gpus" -> the plan's score of that copy
        self.trackers: dict[str, ConcurrencyTracker] = {}
        self.next_sample_s: float | None = None
        self.stopping: dict[int, Command] = {}  # instance -> its deactivate, answered once it has drained
        self.handing_over: dict[int, tuple[Command, tuple[int, ...]]] = {}  # id(cmd) -> (activate, givers draining)

    # ---- hooks the simulator calls ---------------------------------------------------------------------

    def on_arrival(self, sim: Simulator, model: str) -> None:
        self._tracker(sim, model).arrive(sim.now)

    def on_complete(self, sim: Simulator, model: str) -> None:
        self._tracker(sim, model).complete(sim.now)

    def more_kv(self, sim: Simulator, inst: Instance, blocks: int) -> bool:
        """The instance is out of KV blocks: it grows into memory nobody holds on its GPUs (vLLM would have
        allocated it at start), and with KV reservation into what the instances beside it (the shared tier)
        hold beyond their reservation; True when it got more."""
        before = inst.kv_bytes
        self._regrow(sim, [inst])
        if inst.kv_bytes <= before and self.kv_mode != "none":
            self._lend(self._beside(sim, inst, inst.gpus))
            self._regrow(sim, [inst])
        return inst.kv_bytes > before

    def shares(self, sim: Simulator, inst: Instance) -> tuple[float, float]:
        """The compute and bandwidth shares of its devices ``inst`` gets for its next steps: engines that share
        a device (the shared tier) time-slice it, so each of those computing now gets an equal part; nothing
        is gained from running them side by side."""
        computing = {id(o) for g in inst.gpus for o in sim.gpus[g].instances if o is not inst and o.segment is not None}
        share = 1.0 / (1 + len(computing))
        return share, share

    def route(self, sim: Simulator, ready: list[Instance]) -> Instance | None:
        """The gateway's routing (the admission core): least-loaded instance with room; the simulator's
        in-flight counts are exact, so nothing is pending beyond them."""
        by_id = {str(i.iid): i for i in ready}
        chosen = self.admission.choose_route(
            [Route(i.gpus[0], str(i.iid), i.in_flight, i.batch_capacity) for i in ready])
        return None if chosen is None else by_id[chosen.instance_id]

    def label(self, rec: Record, inst: Instance) -> str:
        """The gateway's label (the admission core): warm from an instance that was ready when the request
        arrived, else how the instance was made."""
        made = None if inst.outcome == "warm" else Outcome(inst.outcome)
        return self.admission.label(inst.model.name, str(inst.iid), {str(i) for i in rec.existing}, made,
                                    waited_for_reply=True).value

    def on_queued(self, sim: Simulator, model: str) -> None:
        """Requests wait: the gateway asks for an instance (admission decides whether an ask is due)."""
        if model in self.orchestrator.scaling:
            return  # the orchestrator's scale-up under way answers every asker
        if not self.admission.should_ask(model, sim.now):
            return
        reason = "at_capacity" if any(i.model.name == model and not i.draining for i in sim.instances.values()) \
            else "no_instance"
        if not self.scale_up(sim, model, reason):
            self.admission.on_reply(model, False)

    def on_tick(self, sim: Simulator) -> None:
        self.sample_demand(sim)
        self.orchestrate(sim)

    # ---- the cores' inputs -----------------------------------------------------------------------------

    def _tracker(self, sim: Simulator, model: str) -> ConcurrencyTracker:
        t = self.trackers.get(model)
        if t is None:
            t = self.trackers[model] = ConcurrencyTracker(sim.now)
        return t

    def sample_demand(self, sim: Simulator) -> list[DemandSample]:
        """Each model's demand over the last second, as a gateway publishes it (in flight and queued)."""
        if self.next_sample_s is None:
            self.next_sample_s = sim.now + DEMAND_INTERVAL_S
        if sim.now < self.next_sample_s:
            return []
        self.next_sample_s = sim.now + DEMAND_INTERVAL_S
        out = []
        for model in sim.models:
            s = DemandSample(gateway_id="sim", model=model, **asdict(self._tracker(sim, model).roll(sim.now)))
            self.orchestrator.on_demand(model, s.gateway_id, s.start_s + s.interval_s, s.concurrency_avg)
            out.append(s)
        return out

    def keep_bytes(self, inst: Instance) -> int:
        """KV an instance keeps per GPU under reservation: what it uses plus its free-block target."""
        blocks = max(inst.kv_tokens(inst.kv_max) // KV_BLOCK_TOKENS, 1)
        target = inst.kv_target if inst.kv_target is not None else free_blocks_target(
            blocks, inst.in_flight, inst.batch_capacity)
        return math.ceil((inst.used_tokens() + target * KV_BLOCK_TOKENS) * inst.model.kv_bytes_per_token
                         / len(inst.gpus))

    def view(self, sim: Simulator) -> ClusterView:
        lend = self.kv_mode != "none"
        devices = tuple(Device(
            g.gid, g.node, g.index, g.capacity, g.free(),
            serving_bytes=sum(i.shard + i.kv_bytes for i in g.instances),
            reclaimable_bytes=sum(max(i.kv_bytes - self.keep_bytes(i), 0) for i in g.instances) if lend else 0,
            batch_capacity=sim.batch_capacity) for g in sim.gpus.values())
        copies = tuple(CopyView(c.model, c.gpus, c.ready(sim.now), c.shard) for c in sim.copies())
        instances = tuple(InstanceView(
            str(i.iid), i.model.name, i.gpus, i.started_at, i.in_flight, draining=i.draining,
            made=None if i.outcome == "warm" else Outcome(i.outcome), weight_bytes=i.shard,
            kv_total_blocks=i.kv_tokens(i.kv_max) // KV_BLOCK_TOKENS if lend else 0,
            kv_target_free_blocks=i.kv_target) for i in sim.instances.values())
        return ClusterView(devices, copies, instances)

    # ---- the orchestrator's decisions, executed by the simulated workers ----------------------------

    def orchestrate(self, sim: Simulator) -> None:
        for iid, cmd in list(self.stopping.items()):  # drained instances: their deactivates are done
            if iid not in sim.instances:
                del self.stopping[iid]
                self.orchestrator.on_result(cmd, True, sim.now)
        for key, (cmd, givers) in list(self.handing_over.items()):  # handovers whose givers have drained
            if not any(i in sim.instances for i in givers):
                del self.handing_over[key]
                self._start(sim, cmd)
        r = self.orchestrator.step(self.view(sim), self.plan, sim.now)
        for cmd in r.commands:
            self.execute(sim, cmd)
        for model, n in r.scale_up.items():
            if model not in self.orchestrator.scaling:
                for _ in range(n):
                    if not self.scale_up(sim, model, "at_capacity"):
                        break

    def scale_up(self, sim: Simulator, model: str, reason: str) -> bool:
        """One scale-up through the orchestrator core; False when it refused (nothing fits now)."""
        m = sim.models[model]
        answer = self.orchestrator.scale_up(self.view(sim), model, m.tp, -(-int(m.weight_bytes) // m.tp), sim.now,
                                            reason=reason, waiting=len(sim.queues[model]))
        if answer.command is None:
            if answer.outcome is Outcome.WARM and model in self.admission.asking:
                self.admission.on_reply(model, True, answer.instance_id, answer.outcome)
            return answer.outcome is Outcome.WARM
        self.execute(sim, answer.command)
        return True

    def execute(self, sim: Simulator, cmd: Command) -> None:
        """A worker carries the command out; its reply comes when it is done (instances: once ready)."""
        if cmd.kind is CommandKind.ACTIVATE:
            givers = list({i.iid: i for g in cmd.devices for i in sim.gpus[g].instances}.values())
            if cmd.replace_active and givers:  # a handover: the worker drains what serves there first
                for inst in givers:
                    sim.drain(inst)
                still = tuple(i.iid for i in givers if i.iid in sim.instances)
                if still:
                    self.handing_over[id(cmd)] = (cmd, still)
                    return
            self._start(sim, cmd)
            return
        ok = True
        if cmd.kind is CommandKind.PREWARM:
            copy = self.prewarm(sim, cmd)
            if copy is not None:
                sim.at(copy.ready_at, self.orchestrator.on_result, cmd, True, copy.ready_at)
                return
            ok = False
        elif cmd.kind is CommandKind.EVICT:
            c = sim.gpus[cmd.worker_id].copies.get(cmd.model)
            if c is not None:
                sim.evict_copy(c)
        elif cmd.kind is CommandKind.DEACTIVATE:
            inst = sim.instances.get(int(cmd.instance_id))
            if inst is not None:
                sim.drain(inst)
            if inst is not None and inst.iid in sim.instances:  # requests still running: the reply waits for them
                self.stopping[inst.iid] = cmd
                return
        elif cmd.kind is CommandKind.SET_KV_TARGET:
            inst = next((i for i in sim.instances.values() if i.model.name == cmd.model and i.gpus == cmd.devices), None)
            if inst is not None:
                inst.kv_target = cmd.kv_free_blocks
        self.orchestrator.on_result(cmd, ok, sim.now, error_code=None if ok else "no_memory")

    def _start(self, sim: Simulator, cmd: Command) -> None:
        inst = self.activate(sim, cmd)
        sim.at(inst.ready_at, self._activated, sim, cmd, inst)

    def _activated(self, sim: Simulator, cmd: Command, inst: Instance) -> None:
        self.orchestrator.on_result(cmd, True, sim.now)
        if cmd.model in self.admission.asking:  # the gateway's ask hears back with this instance
            self.admission.on_reply(cmd.model, True, str(inst.iid), cmd.outcome)

    def activate(self, sim: Simulator, cmd: Command) -> Instance:
        inst = self._activate(sim, cmd)
        if cmd.share:  # the hosts lent what they held beyond their reservation; the guest started in it
            self._regrow(sim, self._beside(sim, inst, cmd.devices))
        return inst

    def _activate(self, sim: Simulator, cmd: Command) -> Instance:
        m = sim.models[cmd.model]
        kv = self.initial_kv(sim, cmd.model, cmd.devices)
        own = sim.gpus[cmd.devices[0]].copies.get(cmd.model)
        if cmd.share:  # a guest: the instances there give back the KV they hold beyond their reservation
            kv = kv if kv is not None else 0
            self._lend(self._beside(sim, None, cmd.devices))
        if cmd.outcome is Outcome.PREWARM_HIT:
            return sim.start_instance(cmd.model, cmd.devices, "prewarm_hit", sim.costs.activate_s, kv_limit=kv)
        if own is not None:  # still loading: it serves once loaded
            return sim.start_instance(cmd.model, cmd.devices, "cold",
                                      max(own.ready_at - sim.now, 0) + sim.costs.activate_s, kv_limit=kv)
        return sim.start_instance(cmd.model, cmd.devices, "cold", self.miss_s(sim, m), kv_limit=kv)

    def miss_s(self, sim: Simulator, m) -> float:
        """A cold start: WarmServe's engines are pre-spawned, so a miss costs the weights from pinned host
        memory and the engine's wake-up."""
        return sim.costs.load_s(m.weight_bytes, m.tp, "pinned") + sim.costs.activate_s

    def initial_kv(self, sim: Simulator, model: str, gpus: tuple[str, ...]) -> int | None:
        """KV bytes per GPU a new instance takes (None: all the memory there, evicting every copy)."""
        return None

    def prewarm(self, sim: Simulator, cmd: Command):
        """Load a copy; on a serving GPU it goes into the KV the instance lends (beyond its target)."""
        lend = self.kv_mode != "none"
        serving = self._beside(sim, None, cmd.devices)
        if lend:
            self._lend(serving)
        copy = sim.add_copy(cmd.model, cmd.devices, self.scores.get(f"{cmd.model}@{'+'.join(cmd.devices)}", 0.0))
        if lend:  # what the copy did not take goes back to the KV cache
            self._regrow(sim, serving)
        return copy

    @staticmethod
    def _beside(sim: Simulator, inst: Instance | None, gpus: tuple[str, ...]) -> list[Instance]:
        """The instances on ``gpus`` other than ``inst``, each once."""
        return list({id(o): o for g in gpus for o in sim.gpus[g].instances if o is not inst}.values())

    def _lend(self, instances: list[Instance]) -> None:
        """KV reservation: each instance keeps what it uses plus its free-block target, and lends the rest."""
        for i in instances:
            i.kv_bytes = min(i.kv_bytes, self.keep_bytes(i))

    def _regrow(self, sim: Simulator, instances: list[Instance]) -> None:
        """Each instance grows its KV cache into what nobody holds on its GPUs."""
        for i in instances:
            i.kv_bytes = max(i.kv_bytes, min(self._room(sim, i, g) for g in i.gpus))

    @staticmethod
    def _room(sim: Simulator, inst: Instance, gid: str) -> int:
        """KV bytes ``inst`` could have on ``gid`` given everything else there."""
        g = sim.gpus[gid]
        others = sum(i.shard + i.kv_bytes for i in g.instances if i is not inst)
        return g.capacity - sum(c.shard for c in g.copies.values()) - others - inst.shard


@dataclass(frozen=True)
class WarmServeConfig:
    name: str = "warmserve"
    methods: tuple[str, ...] = ("naive", "seasonal-naive", "paper", "autoets", "mstl", "ensemble")
    use_upper: bool = True  # placement prewarms for the upper quantile of the peak
    placement: PlacementConfig = PlacementConfig()
    kv_mode: str = "two-way"  # none | one-way | two-way
    prewarm: bool = True
    placement_interval_s: float = 5.0  # replan at least this often, and whenever copies or instances change
    idle_first: bool = True  # ours: what each model needs goes on idle GPUs first, then lent KV (paper: one pass)
    handover: bool = True  # ours: a queued model takes a lightly used instance's GPU (shared.policy.handover)
    forecast_scale_down: bool = True  # ours: scaling down keeps what the forecast needs in the next window
    forecast_freed_first: bool = False  # GPUs the forecast will free count as idle for copies (an ablation: off)
    shared_tier: bool = True  # ours: quiet models serve next to another instance (shared.policy.sharing)


class WarmServe(System):
    """All four cores: forecasts from per-second demand; placement whenever copies or instances change (as the
    service replans on every worker change) and at least every ``placement_interval_s``; the orchestrator
    every tick."""

    def __init__(self, autoscale: AutoscaleConfig, config: WarmServeConfig, history: dict[str, list[WindowObservation]],
                 window_s: float, season_windows: int):
        self.kv_mode = config.kv_mode
        super().__init__(autoscale, handover=config.handover, forecast_scale_down=config.forecast_scale_down,
                         shared_tier=config.shared_tier)
        self.config = config
        self.name = config.name
        self.keep_weights = config.prewarm
        fc = ForecastConfig.for_window(window_s, methods=config.methods, season_length=season_windows,
                                       fit_windows=7 * season_windows, mstl_fit_windows=4 * season_windows,
                                       ets_fit_windows=2 * season_windows)
        self.forecaster = ForecastCore(ForecastRoundConfig(forecast=fc, window_s=window_s, close_grace_s=0.0))
        self.forecaster.rebuild(history)
        self.placement = PlacementCore(PlacementCoreConfig(
            placement=config.placement, kv_reservation=config.kv_mode != "none", prewarm=config.prewarm,
            idle_first=config.idle_first, peak="upper" if config.use_upper else "point", max_tp=8,
            forecast_freed_first=config.forecast_freed_first))
        self.forecasts: dict[str, Forecast] = {}
        self.catalog: dict[str, ModelSpec] | None = None
        self.next_placement = float("-inf")
        self.last_signature: tuple | None = None

    @staticmethod
    def cluster_signature(sim: Simulator) -> tuple:
        """What placement reacts to in the service (a worker's copies or instances changed)."""
        return (frozenset((c.model, c.gpus, c.ready(sim.now)) for c in sim.copies()),
                frozenset((i.iid, i.draining) for i in sim.instances.values()))

    def on_tick(self, sim: Simulator) -> None:
        for s in self.sample_demand(sim):
            self.forecaster.add(s)
        if self.catalog is None:
            self.catalog = {m.name: ModelSpec(slug=m.name, path=f"sim://{m.name}", parameter_bytes=int(m.weight_bytes),
                                              tensor_parallel_size=m.tp) for m in sim.models.values()}
        if self.forecaster.due(sim.now):
            for f in self.forecaster.round(sim.now, self.catalog).forecasts:
                self.forecasts[f.model] = f
                self.orchestrator.on_forecast(f)
        changed = self.cluster_signature(sim)
        if changed != self.last_signature or sim.now >= self.next_placement:
            self.last_signature = changed
            plan = self.placement.plan(self.view(sim), self.catalog, self.forecasts, [], sim.now)
            self.placement.adopt(plan)
            self.plan = plan.copies
            self.scores = {k: v for k, v in plan.inputs["scores"].items() if isinstance(v, float)}
            self.next_placement = sim.now + self.config.placement_interval_s
        self.orchestrate(sim)

    def initial_kv(self, sim: Simulator, model: str, gpus: tuple[str, ...]) -> int | None:
        """With KV reservation a new instance takes KV for the requests waiting for it (the reservation
        target), so the other models' copies on its GPUs survive as far as memory allows."""
        if self.config.kv_mode == "none":
            return None
        m = sim.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        full = min(sim.gpus[g].capacity for g in gpus) - shard
        blocks = max(int(full * m.tp // m.kv_bytes_per_token) // KV_BLOCK_TOKENS, 1)
        waiting = len(sim.queues[model])
        tokens = free_blocks_target(blocks, waiting, sim.batch_capacity) * KV_BLOCK_TOKENS
        need = sum(r.request.input_tokens + r.request.output_tokens for r in list(sim.queues[model])[:sim.batch_capacity])
        return math.ceil(max(tokens, need) * m.kv_bytes_per_token / m.tp)

    def more_kv(self, sim: Simulator, inst: Instance, blocks: int) -> bool:
        """Free memory first; then, with two-way KV reservation, an instance out of KV takes back memory it
        lent, evicting the lowest-scored copies on its GPUs. One-way (the paper): it cannot."""
        if super().more_kv(sim, inst, blocks):
            return True
        if self.config.kv_mode != "two-way":
            return False
        lent = sorted({id(c): c for g in inst.gpus for c in sim.gpus[g].copies.values()}.values(),
                      key=lambda c: c.score)
        if not lent:
            return False
        sim.evict_copy(lent[0])
        self._regrow(sim, [inst])
        return True
