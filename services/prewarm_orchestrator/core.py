"""The orchestrator's decisions, free of I/O: the service (``main.py``) and the simulator both drive it.

Every round (``step``) it compares the cluster with the placement plan (prewarm, evict, keep ``min_active``
instances), runs the autoscaler over each model's load (the larger of the instances' in-flight requests and
what the gateways report, queued requests included), promotes shared-tier guests whose model is no longer
quiet, and pushes KV reservation targets. ``scale_up`` picks where a new instance goes: a free device with a
prewarmed copy (``shared.policy.scaleup``), else a handover whose giver fits, a guest from a copy
(``shared.policy.sharing``), a handover that trades, a cold load on a free device, a guest loaded there, in
that order. Every command it hands out
marks its (device, model) busy until ``on_result`` reports how it ended; a failed command is not retried on
that (device, model, kind) before a doubling back-off (1 s to 30 s); one whose worker died while it was
out (``worker_lost``) keeps that device out of scale-ups for ``lost_hold_s``. Time is passed in; nothing
here sleeps, sends or stores.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from shared.messages import CommandKind, Forecast, Outcome, PlannedCopy
from shared.policy.autoscale import AutoscaleConfig, InstanceView as AutoscaleInstance, LoadWindow, decide, forecast_keep
from shared.policy.cluster import ClusterView
from shared.policy.handover import Handover, HandoverConfig, choose_handover
from shared.policy.keepalive import IdleCopyPolicy
from shared.policy.kv import next_kv_target
from shared.policy.reconcile import reconcile
from shared.policy.scaleup import Choice, choose_group
from shared.policy.sharing import SharingConfig, choose_shared, promotions

RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
DRAINED = "worker drained by an operator"
WORKER_LOST = "worker_lost"  # a command's error code: its worker died (or restarted) while it was out


@dataclass(frozen=True)
class OrchestratorConfig:
    autoscale: AutoscaleConfig = AutoscaleConfig()
    kv_reservation: bool = True
    min_active: int = 0  # instances kept per planned model whatever the load
    gateway_load_max_age_s: float = 3.0  # a gateway's report older than this no longer counts
    forecast_scale_down: bool = True  # keep the instances a model's forecast needs within the next window
    handover: bool = True  # a queued model may take the GPU of a lightly used instance (shared.policy.handover)
    handover_margin: float = 2.0
    forecast_max_age_windows: float = 2.0  # an older forecast is not acted on
    shared_tier: bool = True  # a quiet model with no free device may serve next to another (shared.policy.sharing)
    shared_quiet: float = 0.25  # quiet: load and forecast peak at most this x B
    shared_max_instances: int = 4  # instances on one device, its host included
    lost_hold_s: float = 10.0  # a worker lost with a command out takes no scale-up for this long
    idle_copy_policy: IdleCopyPolicy = "evict"  # unplanned prewarmed copies: evicted, or kept (shared.policy.keepalive)


@dataclass(frozen=True)
class Command:
    """One worker command as data; the shell turns it into a ``WorkerCommand`` (or the simulator acts on it)."""

    kind: CommandKind
    model: str
    devices: tuple[str, ...]
    reason: str = ""
    instance_id: str | None = None  # deactivate: the instance meant
    drain: bool = True
    kv_free_blocks: int | None = None  # set_kv_target
    outcome: Outcome | None = None  # activate: how the instance is made (prewarm_hit or cold)
    scale_up: bool = False  # an activation asked for by a scale-up (its askers retry; no back-off here)
    replace_active: bool = False  # activate: a handover (the worker drains its current instance first)
    share: bool = False  # activate: a guest next to the instance serving there (the shared tier)

    @property
    def worker_id(self) -> str:
        return self.devices[0]

    @property
    def key(self) -> tuple[str, str]:
        return (self.devices[0], self.model)


@dataclass(frozen=True)
class ScaleAnswer:
    """What a scale-up ask gets: a command to send, an instance that already runs, or a refusal."""

    command: Command | None = None
    outcome: Outcome | None = None
    worker_id: str | None = None
    instance_id: str | None = None  # an instance that is already active (outcome warm)
    error_code: str | None = None
    error: str = ""


@dataclass(frozen=True)
class Round:
    commands: list[Command]  # send these now
    scale_up: dict[str, int]  # model -> instances to add (each through ``scale_up``)
    loads: dict[str, float]


@dataclass
class GatewayLoad:
    """Each gateway's latest concurrency per model (in flight *and* queued): the load instances cannot see
    when they are full."""

    max_age_s: float = 3.0
    reports: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # model -> gateway -> (t, c)

    def add(self, model: str, gateway: str, at_s: float, concurrency: float) -> None:
        self.reports.setdefault(model, {})[gateway] = (at_s, concurrency)

    def current(self, now_s: float) -> dict[str, float]:
        """Each model's fresh total. Reports too old to count are dropped: gateways come and go (a restarted
        one may have a new id) and models leave the catalog, so nothing here outlives ``max_age_s``."""
        out = {}
        for model, by_gw in list(self.reports.items()):
            for gw in [g for g, (t, _) in by_gw.items() if now_s - t > self.max_age_s]:
                del by_gw[gw]
            if by_gw:
                out[model] = sum(c for _, c in by_gw.values())
            else:
                del self.reports[model]
        return out


class OrchestratorCore:
    def __init__(self, config: OrchestratorConfig = OrchestratorConfig()):
        self.config = config
        self.busy: dict[tuple[str, str], Command] = {}  # (device, model) -> lifecycle command in flight
        self.kv_busy: dict[tuple[str, str], Command] = {}  # (device, model) -> KV target in flight
        self.retry_at: dict[tuple[str, str, CommandKind], tuple[float, float]] = {}  # -> (not before, delay)
        self.kv_unsupported: set[str] = set()  # devices whose engine cannot resize KV (vLLM)
        self.lost: dict[str, float] = {}  # device -> until when no scale-up goes there (lost with a command out)
        self.windows: dict[str, LoadWindow] = {}
        self.gateway_load = GatewayLoad(config.gateway_load_max_age_s)
        self.forecasts: dict[str, Forecast] = {}
        self.handover = HandoverConfig(margin=config.handover_margin, up=config.autoscale.up,
                                       down=config.autoscale.down, batch_capacity=config.autoscale.batch_capacity)
        self.sharing = SharingConfig(quiet=config.shared_quiet, up=config.autoscale.up,
                                     max_instances=config.shared_max_instances,
                                     batch_capacity=config.autoscale.batch_capacity)

    # ---- inputs ---------------------------------------------------------------------------------------

    def on_demand(self, model: str, gateway: str, at_s: float, concurrency: float) -> None:
        self.gateway_load.add(model, gateway, at_s, concurrency)

    def on_forecast(self, forecast: Forecast) -> None:
        self.forecasts[forecast.model] = forecast

    def fresh_forecasts(self, now_s: float) -> dict[str, Forecast]:
        """The forecasts young enough to act on."""
        return {m: f for m, f in self.forecasts.items()
                if now_s - f.window_start_s <= self.config.forecast_max_age_windows * f.window_s}

    def _prune(self, view: ClusterView, now_s: float) -> None:
        """Forget what no decision will read again, so nothing grows with models or workers that came and
        went: forecasts too old to act on (a model that left the catalog is forecast no more), lost marks
        that ran out, and back-offs and KV findings of devices that are gone."""
        self.forecasts = self.fresh_forecasts(now_s)
        self.lost = {d: t for d, t in self.lost.items() if t > now_s}
        present = {d.device_id for d in view.devices}
        self.retry_at = {k: v for k, v in self.retry_at.items() if k[0] in present or v[0] > now_s}
        self.kv_unsupported &= present

    def peaks(self, now_s: float) -> dict[str, float]:
        """Each model's forecast peak concurrency (upper quantile) for the next window, if fresh."""
        return {m: f.predicted_peak_upper for m, f in self.fresh_forecasts(now_s).items()}

    def loads(self, now_s: float) -> dict[str, float]:
        return {m: w.mean(now_s) for m, w in self.windows.items()}

    def on_result(self, command: Command, ok: bool, now_s: float, error_code: str | None = None) -> None:
        """How a command ended: frees its (device, model) and sets or clears its back-off."""
        table = self.kv_busy if command.kind is CommandKind.SET_KV_TARGET else self.busy
        if table.get(command.key) is command:
            del table[command.key]
        if error_code == WORKER_LOST:  # not chosen again until it has been back a while (a restart, a resume)
            for device in command.devices:
                self.lost[device] = now_s + self.config.lost_hold_s
        retry_key = (command.devices[0], command.model, command.kind)
        if ok or command.scale_up:
            self.retry_at.pop(retry_key, None)
            return
        if error_code == "unsupported" and command.kind is CommandKind.SET_KV_TARGET:
            self.kv_unsupported.add(command.devices[0])  # vLLM: KV is fixed; stop asking
        delay = min(self.retry_at.get(retry_key, (0.0, RETRY_MIN_S / 2))[1] * 2, RETRY_MAX_S)
        self.retry_at[retry_key] = (now_s + delay, delay)

    def retry_in(self, command: Command, now_s: float) -> float:
        return max(self.retry_at.get((command.devices[0], command.model, command.kind), (now_s, 0.0))[0] - now_s, 0.0)

    def lost_now(self, now_s: float) -> list[str]:
        """Devices lost with a command out, still held back from scale-ups."""
        return [d for d, until in self.lost.items() if until > now_s]

    @property
    def scaling(self) -> set[str]:
        """Models with an activation in flight."""
        return {c.model for c in self.busy.values() if c.kind is CommandKind.ACTIVATE}

    # ---- the round --------------------------------------------------------------------------------------

    def step(self, view: ClusterView, plan: Sequence[PlannedCopy], now_s: float,
             drained: Collection[str] = ()) -> Round:
        """Reconcile with the plan, then autoscale and push KV targets. ``drained``: devices an operator
        drains (their instances stop whatever the load; nothing new goes there)."""
        self._prune(view, now_s)
        commands: list[Command] = []
        for a in reconcile(plan, view, min_active=self.config.min_active, busy=self.busy,
                           idle_copy_policy=self.config.idle_copy_policy):
            cmd = Command(a.kind, a.model, a.group, reason="placement plan")
            if self._issue(cmd, now_s):
                commands.append(cmd)
        scale_up, loads = self._autoscale(view, now_s, drained, commands)
        return Round(commands, scale_up, loads)

    def _issue(self, cmd: Command, now_s: float) -> bool:
        """Mark ``cmd`` in flight unless its (device, model) is busy or backing off."""
        table = self.kv_busy if cmd.kind is CommandKind.SET_KV_TARGET else self.busy
        if cmd.key in table or self.retry_at.get((cmd.devices[0], cmd.model, cmd.kind), (0.0, 0.0))[0] > now_s:
            return False
        table[cmd.key] = cmd
        return True

    def _autoscale(self, view: ClusterView, now_s: float, drained: Collection[str],
                   commands: list[Command]) -> tuple[dict[str, int], dict[str, float]]:
        cfg = self.config.autoscale
        instances: dict[str, list[AutoscaleInstance]] = {}
        groups = {i.instance_id: i.devices for i in view.instances}
        in_flight: dict[str, int] = {}
        for inst in view.instances:
            if inst.draining:
                continue
            in_flight[inst.model] = in_flight.get(inst.model, 0) + inst.in_flight
            if drained and set(inst.devices) & set(drained):
                cmd = Command(CommandKind.DEACTIVATE, inst.model, inst.devices, reason=DRAINED,
                              instance_id=inst.instance_id)
                if self._issue(cmd, now_s):
                    commands.append(cmd)
                continue
            instances.setdefault(inst.model, []).append(
                AutoscaleInstance(inst.instance_id, inst.devices[0], inst.started_at_s, inst.in_flight))
            if self.config.kv_reservation and inst.kv_total_blocks > 0 and inst.devices[0] not in self.kv_unsupported:
                device = view.device(inst.devices[0])
                target = next_kv_target(inst.kv_target_free_blocks, inst.kv_total_blocks, inst.in_flight,
                                        (device.batch_capacity if device else 0) or cfg.batch_capacity)
                if target is not None:
                    cmd = Command(CommandKind.SET_KV_TARGET, inst.model, inst.devices, reason="kv reservation",
                                  kv_free_blocks=target)
                    if self._issue(cmd, now_s):
                        commands.append(cmd)
        gateway = self.gateway_load.current(now_s)
        for model in sorted(set(in_flight) | set(self.windows) | {m for m, v in gateway.items() if v > 0}):
            load = max(in_flight.get(model, 0), gateway.get(model, 0.0))
            self.windows.setdefault(model, LoadWindow(cfg.window_s)).add(now_s, load)
        # a drained worker's stop does not hold its model back: the replacement may start meanwhile
        busy_models = {m for (_, m), c in self.busy.items() if c.reason != DRAINED}
        averages = ({m: f.predicted_avg for m, f in self.fresh_forecasts(now_s).items()}
                    if self.config.forecast_scale_down else {})
        scale_up, loads = {}, {}
        promote, settled = promotions(view, self.loads(now_s), self.peaks(now_s), self.sharing) \
            if self.config.shared_tier else (set(), [])
        for inst in settled:  # promoted: its model's dedicated instances carry the load, the guest drains
            if inst.model in busy_models:
                continue
            cmd = Command(CommandKind.DEACTIVATE, inst.model, inst.devices, instance_id=inst.instance_id,
                          reason="promoted: a dedicated instance carries the load")
            if self._issue(cmd, now_s):
                commands.append(cmd)
                busy_models.add(inst.model)
        for model, window in list(self.windows.items()):
            load = window.mean(now_s)
            loads[model] = round(load, 3)
            ins = instances.get(model, [])
            if not ins and load == 0 and model not in in_flight and not gateway.get(model):
                del self.windows[model]  # idle and gone: forget it
                continue
            if model in busy_models:
                continue  # a scale-up or stop is under way: decide again once it lands
            d = decide(load, ins, now_s, cfg, window_full=window.full(now_s),
                       keep=forecast_keep(averages.get(model, 0.0), cfg))
            if d.add and ins:  # a model with no instance is started by the gateway's request (it knows the wait)
                scale_up[model] = d.add
            if model in promote:  # a guest that is no longer quiet: a dedicated instance, then the guest drains
                scale_up[model] = max(scale_up.get(model, 0), 1)
            for i in d.stop:
                cmd = Command(CommandKind.DEACTIVATE, model, groups[i.instance_id], reason=f"autoscaler: {d.reason}",
                              instance_id=i.instance_id)
                if self._issue(cmd, now_s):
                    commands.append(cmd)
        return scale_up, loads

    # ---- scale-up -----------------------------------------------------------------------------------------

    def scale_up(self, view: ClusterView, model: str, tp: int, shard_bytes: int, now_s: float, *,
                 reason: str = "at_capacity", waiting: int = 0, drained: Collection[str] = ()) -> ScaleAnswer:
        """Where another instance of ``model`` goes. ``reason`` ``no_instance``: an instance that became
        active meanwhile answers (warm). The activation's devices are busy until ``on_result``."""
        if reason == "no_instance":
            running = view.instances_of(model)
            if running:
                return ScaleAnswer(outcome=Outcome.WARM, worker_id=running[0].worker_id,
                                   instance_id=running[0].instance_id)
        # a device busy with this model's prewarm may still be the best choice; one it is being activated on
        # (an earlier scale-up of the same round) or evicted from is not
        busy = {device for (device, m), c in self.busy.items() if m != model or c.kind is not CommandKind.PREWARM}
        unusable = set(drained) | set(self.lost_now(now_s))
        busy |= unusable
        choice = choose_group(view, model, tp, shard_bytes, busy=busy)
        if choice is not None and choice.outcome is Outcome.PREWARM_HIT:
            return self._activate(model, choice, f"scale-up ({reason}, {waiting} waiting)")
        served = sum(i.in_flight for i in view.instances_of(model))
        demand = max(self.gateway_load.current(now_s).get(model, 0.0) - served, float(waiting))  # waiting
        taken = {g for c in self.busy.values() for g in c.devices} | unusable
        loads, peaks = self.loads(now_s), self.peaks(now_s)
        guest = choose_shared(view, model, tp, shard_bytes, demand, loads, peaks, busy=taken,
                              config=self.sharing) if self.config.shared_tier else None
        h = choose_handover(view, model, tp, shard_bytes, demand, loads, peaks, busy=taken,
                            free_alternative=choice is not None, config=self.handover) if self.config.handover else None
        asked = f"{reason}, {waiting} waiting"
        # a giver that fits costs nobody anything; a guest costs its host a share of the device's time; a
        # trade costs the giver's model its instance
        if h is not None and h.rule == "fits":
            return self._handover(model, h, asked)
        if guest is not None and guest.outcome is Outcome.PREWARM_HIT:
            return self._activate(model, guest, f"shared tier: guest ({asked})", share=True)
        if h is not None:
            return self._handover(model, h, asked)
        if choice is not None:
            return self._activate(model, choice, f"scale-up ({asked})")
        if guest is not None:
            return self._activate(model, guest, f"shared tier: guest, loaded ({asked})", share=True)
        return ScaleAnswer(error_code="no_capacity", error=f"no worker can take another instance of {model} now")

    def _handover(self, model: str, h: Handover, asked: str) -> ScaleAnswer:
        return self._activate(model, Choice(h.devices, h.outcome),
                              f"handover ({h.rule}) from {', '.join(h.givers)} ({asked})", replace_active=True)

    def _activate(self, model: str, choice: Choice, reason: str, *, share: bool = False,
                  replace_active: bool = False) -> ScaleAnswer:
        cmd = Command(CommandKind.ACTIVATE, model, choice.devices, reason=reason, outcome=choice.outcome,
                      scale_up=True, share=share, replace_active=replace_active)
        self.busy[cmd.key] = cmd
        return ScaleAnswer(command=cmd, outcome=choice.outcome, worker_id=choice.worker_id)
