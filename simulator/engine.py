"""The discrete-event core: GPUs, prewarmed copies, instances, requests, and the clock.

Model of an instance (continuous batching, simplified): a request that starts on an instance waits for
its prefill (``PerfModel.prefill_s``), then generates its output tokens at the decode step time of the
batch it joined (``PerfModel.decode_s`` with the instance's running requests, times the number of
instances sharing the GPU under gpu-sharing). An instance takes at most B requests and as many as its KV
cache holds (input + output tokens each). Memory per GPU: prewarmed copies' shards + the instance's
weight shard + its KV cache never exceed the GPU's capacity (``check_memory``).

The system under test (``systems.py``) decides placement, scale-up and scale-down through hooks; the
engine only keeps time and state.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from simulator.workload import Request, SimModel
from shared.perfmodel import PerfModel


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


@dataclass
class Instance:
    iid: int
    model: SimModel
    gpus: tuple[str, ...]
    shard: int  # weight bytes per GPU
    kv_bytes: int  # KV cache per GPU
    ready_at: float
    started_at: float
    outcome: str
    batch_capacity: int
    running: dict[int, int] = field(default_factory=dict)  # request id -> KV tokens it holds
    draining: bool = False
    kv_max: int = 0  # the KV cache it had when it started (per GPU): the base of its reservation target
    kv_target: int | None = None  # free KV blocks to keep, as the orchestrator last set it (None: not set)

    def kv_tokens(self, kv_bytes: int | None = None) -> int:
        kv = self.kv_bytes if kv_bytes is None else kv_bytes
        return int(kv * len(self.gpus) // max(self.model.kv_bytes_per_token, 1))

    def used_tokens(self) -> int:
        return sum(self.running.values())

    def can_take(self, tokens: int) -> bool:
        return (not self.draining and len(self.running) < self.batch_capacity
                and self.used_tokens() + tokens <= self.kv_tokens())


@dataclass
class Gpu:
    gid: str
    node: str
    index: int
    capacity: int
    copies: dict[str, Copy] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)  # one, or several under gpu-sharing

    def held(self) -> int:
        return sum(c.shard for c in self.copies.values()) + sum(i.shard + i.kv_bytes for i in self.instances)

    def free(self) -> int:
        return self.capacity - self.held()


@dataclass
class Record:
    """What happened to one request."""

    request: Request
    outcome: str = ""
    start_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    tpot_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s


class Simulator:
    def __init__(self, models: list[SimModel], nodes: int, gpus_per_node: int, gpu_bytes: int, perf: PerfModel,
                 batch_capacity: int = 32):
        self.perf = perf
        self.models = {m.name: m for m in models}
        self.gpus = {f"n{n}g{g}": Gpu(f"n{n}g{g}", f"n{n}", g, gpu_bytes)
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
        self.system = None  # the system under test (systems.py); set before run()
        self.check = False  # check the memory invariant after every event (tests)

    # ---- the clock ------------------------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, requests: list[Request], until_s: float, tick_s: float = 0.5, sample_s: float = 10.0,
            start_s: float = 0.0) -> None:
        """Replay ``requests`` from ``start_s`` (a warm-up before 0 is allowed) to ``until_s``."""
        self.now = start_s
        for r in requests:
            self.at(r.arrival_s, self._arrive, r)
        t = start_s
        while t <= until_s:
            self.at(t, self._tick)
            t += tick_s
        t = 0.0
        while t <= until_s:
            self.at(t, self._sample)
            t += sample_s
        drain_until = until_s + 600.0  # let requests in flight at the end finish
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > drain_until:
                break
            self.now = t
            fn(*args)
            if self.check:
                self.check_memory()

    def check_memory(self) -> None:
        for g in self.gpus.values():
            assert g.held() <= g.capacity, f"{g.gid} holds {g.held()} > {g.capacity} at {self.now:.3f}"

    # ---- requests -------------------------------------------------------------------------------------

    def _arrive(self, request: Request) -> None:
        rec = self.records[request.rid] = Record(request)
        self.queues[request.model].append(rec)
        self.system.on_arrival(self, request.model)
        self.dispatch(request.model)
        if self.queues[request.model]:
            self.system.on_queued(self, request.model)

    def dispatch(self, model: str) -> None:
        """Start queued requests on ready instances with room, least loaded first (the gateway's rule)."""
        queue = self.queues[model]
        while queue:
            rec = queue[0]
            tokens = rec.request.input_tokens + rec.request.output_tokens
            ready = [i for i in self.instances.values()
                     if i.model.name == model and i.ready_at <= self.now and i.can_take(tokens)]
            if not ready:
                if self.system.on_kv_short(self, model, tokens):
                    continue
                return
            inst = min(ready, key=lambda i: (len(i.running), i.iid))
            queue.popleft()
            self._start(rec, inst, tokens)

    def _start(self, rec: Record, inst: Instance, tokens: int) -> None:
        r, m = rec.request, inst.model
        inst.running[r.rid] = tokens
        share = self.system.compute_share(self, inst)
        prefill = self.perf.prefill_s(m.weight_bytes, r.input_tokens, m.tp) * share
        tpot = self.perf.decode_s(m.weight_bytes, len(inst.running), m.tp) * share
        rec.start_s = self.now
        rec.first_token_s = self.now + prefill
        rec.tpot_s = tpot
        # an instance made while the request waited carries how it was made; an older one is a warm hit
        rec.outcome = inst.outcome if inst.started_at >= r.arrival_s or inst.ready_at > r.arrival_s else "warm"
        rec.done_s = rec.first_token_s + max(r.output_tokens - 1, 0) * tpot
        self.at(rec.done_s, self._done, rec, inst)

    def _done(self, rec: Record, inst: Instance) -> None:
        inst.running.pop(rec.request.rid, None)
        self.system.on_complete(self, inst.model.name)
        self.dispatch(inst.model.name)
        if inst.draining and not inst.running:
            self.stop_instance(inst, keep_weights=self.system.keep_weights)

    # ---- instances and copies ------------------------------------------------------------------------

    def start_instance(self, model: str, gpus: tuple[str, ...], outcome: str, delay_s: float,
                       kv_limit: int | None = None) -> Instance:
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
                        self.batch_capacity, kv_max=max(room, 0))
        for gid in gpus:
            self.gpus[gid].instances.append(inst)
        self.instances[inst.iid] = inst
        self.at(inst.ready_at, self._ready, inst)
        return inst

    def _ready(self, inst: Instance) -> None:
        if inst.iid in self.instances:
            self.dispatch(inst.model.name)

    def drain(self, inst: Instance) -> None:
        inst.draining = True
        if not inst.running:
            self.stop_instance(inst, keep_weights=self.system.keep_weights)

    def stop_instance(self, inst: Instance, keep_weights: bool = True) -> None:
        """The instance goes; with ``keep_weights`` its weights stay as a prewarmed copy (WarmServe)."""
        if self.instances.pop(inst.iid, None) is None:
            return
        for gid in inst.gpus:
            self.gpus[gid].instances.remove(inst)
        if keep_weights and inst.model.name not in self.gpus[inst.gpus[0]].copies:
            c = Copy(inst.model.name, inst.gpus, inst.shard, self.now)
            for gid in inst.gpus:
                self.gpus[gid].copies[c.model] = c
        self.dispatch(inst.model.name)

    def add_copy(self, model: str, gpus: tuple[str, ...], score: float = 0.0) -> Copy | None:
        m = self.models[model]
        shard = -(-int(m.weight_bytes) // m.tp)
        if any(self.gpus[g].free() < shard or model in self.gpus[g].copies for g in gpus):
            return None
        c = Copy(model, tuple(gpus), shard, self.now + self.perf.load_s(m.weight_bytes, m.tp), score)
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

    def _sample(self) -> None:
        weights = kv = prewarm = 0
        for g in self.gpus.values():
            prewarm += sum(c.shard for c in g.copies.values())
            weights += sum(i.shard for i in g.instances)
            kv += sum(i.kv_bytes for i in g.instances)
        self.timeline.append({"t": self.now, "weights": weights, "kv": kv, "prewarmed": prewarm,
                              "instances": len(self.instances),
                              "queued": sum(len(q) for q in self.queues.values())})
