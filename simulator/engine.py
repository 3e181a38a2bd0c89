"""The discrete-event core: GPUs, prewarmed copies, instances stepping like vLLM, requests, and the clock.

An instance is an engine (``scheduler.EngineScheduler``) that advances step by step: each step's batch is
timed by the roofline model of its device (``hardware.step_cost``), under the compute and bandwidth shares
the system under test gives it when instances share a GPU (``System.shares``). Decode-only runs in which
the batch cannot change are one event (``hardware.decode_run_time``); anything that could change the batch
mid-run (a request handed to the instance, a co-located instance starting or stopping) cuts the run at the
end of the step in flight. Memory per GPU: prewarmed copies' shards + instances' weight shards + their KV
caches never exceed the GPU's capacity (``check_memory``).

Requests wait in the gateway's queue per model and are handed to a ready instance with fewer than its
routing capacity in flight, least loaded first. The system under test (``systems.py``, ``baselines.py``)
decides placement, scale-up and scale-down through hooks; the engine keeps time and state.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from simulator.costs import Costs
from simulator.hardware import A100_80G, DeviceSpec, StepCost, decode_run_time, decode_steps_within, \
    growth_per_step, step_cost
from simulator.scheduler import EngineScheduler, SchedulerConfig, Seq, Step
from simulator.workload import Request, SimModel


@dataclass
class Copy:
    """A prewarmed copy (weights resident, no KV) of a model on a GPU group."""

    model: str
    gpus: tuple[str, ...]
    shard: int
    ready_at: float
    score: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.ready_at


@dataclass(eq=False)
class Segment:
    """Steps an instance is running: ``steps`` steps of ``step`` from ``start_s`` to ``end_s``."""

    step: Step
    start_s: float
    end_s: float
    cost: StepCost
    growth: StepCost | None
    shares: tuple[float, float]
    version: int = 0

    def run_time(self, steps: int) -> float:
        if self.growth is None:
            return self.cost.time(*self.shares)
        return decode_run_time(self.cost, self.growth, steps, *self.shares)


@dataclass(eq=False)
class Instance:
    iid: int
    model: SimModel
    gpus: tuple[str, ...]
    shard: int  # weight bytes per GPU
    kv_bytes_: int  # KV cache per GPU
    ready_at: float
    started_at: float
    outcome: str
    batch_capacity: int  # requests the gateway hands it at once (its routing capacity)
    sched: EngineScheduler = field(default_factory=EngineScheduler)
    draining: bool = False
    kv_max: int = 0  # the KV cache it had when it started (per GPU): the base of its reservation target
    kv_target: int | None = None  # free KV blocks to keep, as the orchestrator last set it (None: not set)
    segment: Segment | None = None
    busy_s: float = 0.0
    records: dict[int, "Record"] = field(default_factory=dict)  # request id -> record, while in flight

    def __post_init__(self):
        self.kv_bytes = self.kv_bytes_

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_

    @kv_bytes.setter
    def kv_bytes(self, value: int) -> None:
        self.kv_bytes_ = int(value)
        self.sched.total_blocks = self.kv_tokens() // self.sched.config.block_tokens

    @property
    def in_flight(self) -> int:
        return len(self.sched)

    def kv_tokens(self, kv_bytes: int | None = None) -> int:
        kv = self.kv_bytes if kv_bytes is None else kv_bytes
        return int(kv * len(self.gpus) // max(self.model.kv_bytes_per_token, 1))

    def used_tokens(self) -> int:
        return self.sched.used_blocks * self.sched.config.block_tokens

    def can_take(self) -> bool:
        return not self.draining and self.in_flight < self.batch_capacity


@dataclass
class Gpu:
    gid: str
    node: str
    index: int
    capacity: int
    copies: dict[str, Copy] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)  # one, or several under gpu-sharing
    serving_s: float = 0.0  # seconds with at least one instance (what an allocation costs)
    busy_s: float = 0.0  # seconds with at least one instance computing a step
    since_s: float = 0.0
    busy_count: int = 0

    def held(self) -> int:
        return sum(c.shard for c in self.copies.values()) + sum(i.shard + i.kv_bytes for i in self.instances)

    def free(self) -> int:
        return self.capacity - self.held()

    def account(self, now: float) -> None:
        """Add the time since the last change to the serving and busy totals."""
        if self.instances:
            self.serving_s += now - self.since_s
        if self.busy_count:
            self.busy_s += now - self.since_s
        self.since_s = now


@dataclass
class Record:
    """What happened to one request."""

    request: Request
    outcome: str = ""
    start_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    tpot_s: float | None = None
    preemptions: int = 0
    existing: frozenset[int] = frozenset()  # the model's ready instances when it arrived (how it is labelled)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s


class Simulator:
    def __init__(self, models: list[SimModel], nodes: int, gpus_per_node: int, device: DeviceSpec = A100_80G,
                 costs: Costs = Costs(), batch_capacity: int = 32, scheduler: SchedulerConfig = SchedulerConfig()):
        self.device = device
        self.costs = costs
        self.scheduler = scheduler
        self.models = {m.name: m for m in models}
        self.gpus = {f"n{n}g{g}": Gpu(f"n{n}g{g}", f"n{n}", g, device.memory_bytes)
                     for n in range(nodes) for g in range(gpus_per_node)}
        self.batch_capacity = batch_capacity
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self._iids = itertools.count(1)
        self.instances: dict[int, Instance] = {}
        self.queues: dict[str, deque[Record]] = {m: deque() for m in self.models}
        self.records: dict[int, Record] = {}
        self.timeline: list[dict] = []  # memory by role over time
        self.system = None  # the system under test; set before run()
        self.check = False  # check the memory invariant after every event (tests)
        self.steps = 0  # engine segments simulated (a decode run counts once)
        self.gpu_seconds_at_start = {"serving": 0.0, "busy": 0.0}

    # ---- the clock ------------------------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, requests: list[Request], until_s: float, tick_s: float = 0.5, sample_s: float = 10.0,
            start_s: float = 0.0, drain_s: float = 600.0) -> None:
        """Replay ``requests`` from ``start_s`` (a warm-up before 0 is allowed) to ``until_s``, then let the
        requests in flight finish for up to ``drain_s``."""
        self.now = start_s
        for g in self.gpus.values():
            g.since_s = start_s
        for r in requests:
            self.at(r.arrival_s, self._arrive, r)
        end = until_s + drain_s
        t = start_s
        while t <= end:  # the control loops go on while the last requests drain
            self.at(t, self._tick)
            t += tick_s
        t = 0.0
        while t <= until_s:
            self.at(t, self._sample)
            t += sample_s
        self.at(0.0, self._mark)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > end:
                break
            self.now = t
            fn(*args)
            if self.check:
                self.check_memory()
        self.now = min(max(self.now, until_s), end)
        for g in self.gpus.values():
            g.account(self.now)

    def _mark(self) -> None:
        """Measurement starts: GPU-seconds from here on are the run's (the warm-up is not counted)."""
        for g in self.gpus.values():
            g.account(self.now)
        self.gpu_seconds_at_start = self.gpu_seconds()

    def gpu_seconds(self) -> dict[str, float]:
        return {"serving": sum(g.serving_s for g in self.gpus.values()),
                "busy": sum(g.busy_s for g in self.gpus.values())}

    def check_memory(self) -> None:
        for g in self.gpus.values():
            assert g.held() <= g.capacity, f"{g.gid} holds {g.held()} > {g.capacity} at {self.now:.3f}"

    # ---- requests -------------------------------------------------------------------------------------

    def _arrive(self, request: Request) -> None:
        rec = self.records[request.rid] = Record(request, existing=frozenset(
            i.iid for i in self.instances.values() if i.model.name == request.model and i.ready_at <= self.now))
        self.queues[request.model].append(rec)
        self.system.on_arrival(self, request.model)
        self.dispatch(request.model)
        if self.queues[request.model]:
            self.system.on_queued(self, request.model)

    def dispatch(self, model: str) -> None:
        """Hand queued requests to ready instances with room, the one the system routes to (``System.route``)."""
        queue = self.queues[model]
        while queue:
            ready = [i for i in self.instances.values()
                     if i.model.name == model and i.ready_at <= self.now and i.can_take()]
            inst = self.system.route(self, ready) if ready else None
            if inst is None:
                return
            self._start(queue.popleft(), inst)

    def _start(self, rec: Record, inst: Instance) -> None:
        r = rec.request
        rec.start_s = self.now
        rec.outcome = self.system.label(rec, inst)
        inst.records[r.rid] = rec
        inst.sched.add(Seq(r.rid, max(r.input_tokens, 1), max(r.output_tokens, 1)))
        self.kick(inst)

    # ---- stepping -------------------------------------------------------------------------------------

    def kick(self, inst: Instance) -> None:
        """New work for ``inst``: start stepping if idle, else cut a decode run at the step in flight."""
        if inst.segment is None:
            self._next_segment(inst)
        else:
            self._cut(inst)

    def _cut(self, inst: Instance) -> None:
        seg = inst.segment
        if seg is None or seg.growth is None or seg.step.steps <= 1 or self.now >= seg.end_s:
            return
        done = decode_steps_within(seg.cost, seg.growth, self.now - seg.start_s, seg.step.steps, *seg.shares)
        steps = min(done + 1, seg.step.steps)
        if steps == seg.step.steps:
            return
        seg.step.steps = steps
        seg.end_s = seg.start_s + seg.run_time(steps)
        seg.version += 1
        self.at(seg.end_s, self._segment_end, inst, seg, seg.version)

    def _next_segment(self, inst: Instance) -> None:
        if inst.iid not in self.instances or self.now < inst.ready_at:
            return
        step = inst.sched.schedule(lambda blocks: self.system.more_kv(self, inst, blocks))
        if step is None:
            return
        shape = inst.model.shape
        shares = self.system.shares(self, inst)
        cost = step_cost(shape, self.device, step.batch(), inst.model.tp)
        growth = growth_per_step(shape, self.device, len(step.work), inst.model.tp) if step.steps > 1 else None
        seg = Segment(step, self.now, self.now, cost, growth, shares)
        seg.end_s = self.now + seg.run_time(step.steps)
        inst.segment = seg
        self.steps += 1
        self._busy(inst, +1)
        self.at(seg.end_s, self._segment_end, inst, seg, seg.version)

    def _busy(self, inst: Instance, delta: int) -> None:
        """An instance started or stopped computing: GPU accounting, and co-located runs re-timed."""
        for gid in inst.gpus:
            g = self.gpus[gid]
            g.account(self.now)
            g.busy_count += delta
        if len(self.gpus[inst.gpus[0]].instances) > 1 or any(len(self.gpus[g].instances) > 1 for g in inst.gpus):
            for other in {id(o): o for gid in inst.gpus for o in self.gpus[gid].instances if o is not inst}.values():
                self._cut(other)

    def _segment_end(self, inst: Instance, seg: Segment, version: int) -> None:
        if inst.segment is not seg or seg.version != version:
            return  # re-timed since
        inst.segment = None
        inst.busy_s += self.now - seg.start_s
        self._busy(inst, -1)
        finished = inst.sched.apply(seg.step, seg.step.steps, self.now)
        for s, _ in seg.step.work:
            rec = inst.records.get(s.rid)
            if rec is not None and rec.first_token_s is None and s.first_token_s is not None:
                rec.first_token_s = s.first_token_s
        for s in finished:
            rec = inst.records.pop(s.rid)
            rec.done_s = self.now
            rec.preemptions = s.preemptions
            out = s.output_tokens
            rec.tpot_s = (rec.done_s - rec.first_token_s) / (out - 1) if out > 1 else 0.0
            self.system.on_complete(self, inst.model.name)
        self._next_segment(inst)
        if finished:
            self.dispatch(inst.model.name)
            if inst.draining and not inst.in_flight:
                self.stop_instance(inst, keep_weights=self.system.keep_weights)

    # ---- instances and copies ------------------------------------------------------------------------

    def start_instance(self, model: str, gpus: tuple[str, ...], outcome: str, delay_s: float,
                       kv_limit: int | None = None, batch_capacity: int | None = None,
                       scheduler: SchedulerConfig | None = None) -> Instance:
        """An instance on ``gpus``. Without ``kv_limit`` its KV cache takes all the memory there (other
        models' prewarmed copies are evicted); with it (KV reservation) copies are evicted, lowest score
        first, only until ``kv_limit`` bytes per GPU fit. Requests that waited for it carry ``outcome``."""
        m = self.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        own = self.gpus[gpus[0]].copies.get(model)
        if own is not None:
            self.evict_copy(own)  # its weights become the instance's
        for gid in gpus:
            g = self.gpus[gid]
            for other in sorted((c for c in g.copies.values() if c.model != model), key=lambda c: c.score):
                if kv_limit is not None and g.free() >= shard + kv_limit:
                    break
                self.evict_copy(other)
        room = min(self.gpus[g].free() - shard for g in gpus)
        kv = room if kv_limit is None else min(kv_limit, room)
        inst = Instance(next(self._iids), m, tuple(gpus), shard, max(kv, 0), self.now + delay_s, self.now, outcome,
                        batch_capacity or self.batch_capacity, EngineScheduler(scheduler or self.scheduler),
                        kv_max=max(room, 0))
        for gid in gpus:
            self.gpus[gid].account(self.now)
            self.gpus[gid].instances.append(inst)
        self.instances[inst.iid] = inst
        self.at(inst.ready_at, self._ready, inst)
        return inst

    def _ready(self, inst: Instance) -> None:
        if inst.iid in self.instances:
            self.dispatch(inst.model.name)

    def drain(self, inst: Instance) -> None:
        inst.draining = True
        if not inst.in_flight:
            self.stop_instance(inst, keep_weights=self.system.keep_weights)

    def stop_instance(self, inst: Instance, keep_weights: bool = True) -> None:
        """The instance goes; with ``keep_weights`` its weights stay as a prewarmed copy (WarmServe)."""
        if self.instances.pop(inst.iid, None) is None:
            return
        if inst.segment is not None:
            inst.segment = None
            self._busy(inst, -1)
        for rec in inst.records.values():  # a stop with requests in flight sends them back to the queue
            rec.start_s = None
            self.queues[inst.model.name].appendleft(rec)
        for gid in inst.gpus:
            self.gpus[gid].account(self.now)
            self.gpus[gid].instances.remove(inst)
        if keep_weights and inst.model.name not in self.gpus[inst.gpus[0]].copies:
            c = Copy(inst.model.name, inst.gpus, inst.shard, self.now)
            for gid in inst.gpus:
                self.gpus[gid].copies[c.model] = c
        self.dispatch(inst.model.name)

    def add_copy(self, model: str, gpus: tuple[str, ...], score: float = 0.0, load_s: float | None = None) -> Copy | None:
        m = self.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        if any(self.gpus[g].free() < shard or model in self.gpus[g].copies for g in gpus):
            return None
        load = self.costs.load_s(m.weight_bytes, m.tp) if load_s is None else load_s
        c = Copy(model, tuple(gpus), shard, self.now + load, score)
        for gid in gpus:
            self.gpus[gid].copies[model] = c
        return c

    def evict_copy(self, c: Copy) -> None:
        for gid in c.gpus:
            if self.gpus[gid].copies.get(c.model) is c:
                del self.gpus[gid].copies[c.model]

    def copies(self) -> list[Copy]:
        seen, out = set(), []
        for g in self.gpus.values():
            for c in g.copies.values():
                if id(c) not in seen:
                    seen.add(id(c))
                    out.append(c)
        return out

    # ---- periodic ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.system.on_tick(self)
        for model, queue in self.queues.items():
            if queue:
                self.dispatch(model)
                if queue:
                    self.system.on_queued(self, model)
        for inst in list(self.instances.values()):  # KV given back since: a waiting sequence may fit now
            if inst.segment is None and inst.sched.waiting:
                self._next_segment(inst)

    def _sample(self) -> None:
        weights = kv = prewarm = 0
        for g in self.gpus.values():
            prewarm += sum(c.shard for c in g.copies.values())
            weights += sum(i.shard for i in g.instances)
            kv += sum(i.kv_bytes for i in g.instances)
        self.timeline.append({"t": self.now, "weights": weights, "kv": kv, "prewarmed": prewarm,
                              "instances": len(self.instances),
                              "queued": sum(len(q) for q in self.queues.values())})
