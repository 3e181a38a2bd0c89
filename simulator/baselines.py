"""The systems WarmServe is compared with, each following its own code's rules (docs/simulator.md,
"Baselines", cites each rule).

- ``ServerlessLLM``: per-model autoscaling on in-flight requests (``ceil(in flight / target)``, at most
  ``max_instances``), one instance created or stopped per one-second tick, keep-alive counted as idle time
  that any arrival resets; a fresh vLLM engine per instance; checkpoints loaded from the node's host-memory
  cache at PCIe speed or else from its SSD behind the node's queue of SSD reads, and then cached (LRU); the
  node with the shortest estimated load is chosen (storage-aware scheduling); at most 10 requests per
  instance, round-robin.
- ``MuxServe``: a placement computed offline from the average rates (candidate mesh splits of each node,
  models greedily, most compute first, onto the mesh with the largest throughput gain), per-model SM shares
  and KV quotas from that placement, every model served all the time. ``emulated`` follows the WarmServe
  authors' emulation (one vLLM engine per model under fixed MPS shares, no chunked prefill, the gateway
  handing an engine at most its batch size); ``ideal`` gives co-located engines work-conserving shares.
- ``StaticDedicated``: one GPU group per model at its tensor parallelism, no scaling: the reference for how
  many GPUs a latency costs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from simulator.engine import Instance, Record, Simulator
from simulator.hardware import Batch, step_cost
from simulator.scheduler import SchedulerConfig
from simulator.workload import SimModel

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of device memory for weights + KV


class Baseline:
    """Hooks the simulator calls, doing nothing: a system that never scales."""

    name = "baseline"
    keep_weights = False

    def on_arrival(self, sim: Simulator, model: str) -> None: ...

    def on_complete(self, sim: Simulator, model: str) -> None: ...

    def on_queued(self, sim: Simulator, model: str) -> None: ...

    def on_tick(self, sim: Simulator) -> None: ...

    def more_kv(self, sim: Simulator, inst: Instance, blocks: int) -> bool:
        return False

    def shares(self, sim: Simulator, inst: Instance) -> tuple[float, float]:
        return 1.0, 1.0

    def route(self, sim: Simulator, ready: list[Instance]) -> Instance | None:
        """The least-loaded instance with room (ties: the oldest)."""
        return min(ready, key=lambda i: (i.in_flight, i.iid))

    def label(self, rec: Record, inst: Instance) -> str:
        """Warm when the instance was ready as the request arrived, else how the instance was made."""
        return "warm" if inst.iid in rec.existing else inst.outcome


def vllm_kv_bytes(sim: Simulator, model: SimModel) -> int:
    """KV per device of a vLLM engine that has the device to itself (gpu_memory_utilization of 0.9)."""
    return int(sim.device.memory_bytes * GPU_MEMORY_UTILIZATION) - -(-model.weight_bytes // model.tp)


# ---- ServerlessLLM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerlessLLMConfig:
    target: int = 1  # in-flight requests per instance (auto_scaling_config "target", default 1)
    max_instances: int = 10
    keep_alive_s: float = 0.0  # idle seconds before an instance stops (default 0)
    loop_s: float = 1.0  # the auto-scaler loop's interval
    max_queue_length: int = 10  # requests an instance holds at once
    host_cache_bytes: int = 512 * 10**9  # each node's pinned host-memory checkpoint cache
    name: str = "serverlessllm"


class ServerlessLLM(Baseline):
    keep_weights = False

    def __init__(self, config: ServerlessLLMConfig = ServerlessLLMConfig()):
        self.config = config
        self.name = config.name
        self.idle_s: dict[str, float] = {}
        self.next_loop_s = float("-inf")
        self.host_cache: dict[str, OrderedDict[str, int]] = {}  # node -> model -> bytes, oldest load first
        self.disk_free_at: dict[str, float] = {}  # node -> when its SSD finishes the reads queued on it
        self.rr: dict[str, int] = {}
        self.loads: dict[str, int] = {"host": 0, "ssd": 0}

    def on_arrival(self, sim: Simulator, model: str) -> None:
        self.idle_s[model] = 0.0  # the router resets idle time on every request

    def route(self, sim: Simulator, ready: list[Instance]) -> Instance:
        model = ready[0].model.name
        k = self.rr.get(model, 0)
        self.rr[model] = k + 1
        return sorted(ready, key=lambda i: i.iid)[k % len(ready)]

    def on_tick(self, sim: Simulator) -> None:
        if sim.now < self.next_loop_s:
            return
        self.next_loop_s = sim.now + self.config.loop_s
        for model in sim.models:
            running = [i for i in sim.instances.values() if i.model.name == model and not i.draining]
            in_flight = len(sim.queues[model]) + sum(i.in_flight for i in running)
            desired = min(-(-in_flight // self.config.target), self.config.max_instances)
            if desired > len(running):
                self.idle_s[model] = 0.0
                self.create(sim, model)  # one per loop
            elif desired < len(running):
                self.idle_s[model] = self.idle_s.get(model, 0.0) + self.config.loop_s
                if self.idle_s[model] >= self.config.keep_alive_s:
                    sim.drain(max(running, key=lambda i: i.iid))  # the newest instance, after its requests
                    self.idle_s[model] = 0.0

    def load_estimate(self, sim: Simulator, node: str, m: SimModel) -> tuple[float, str]:
        """The storage-aware scheduler's estimate: from the host cache at PCIe speed, else the SSD queue."""
        if m.name in self.host_cache.get(node, {}):
            return sim.costs.load_s(m.weight_bytes, m.tp, "pinned"), "host"
        wait = max(self.disk_free_at.get(node, sim.now) - sim.now, 0.0)
        return wait + sim.costs.load_s(m.weight_bytes, m.tp, "ssd"), "ssd"

    def create(self, sim: Simulator, model: str) -> Instance | None:
        m = sim.models[model]
        options = []
        for node in sorted({g.node for g in sim.gpus.values()}):
            free = [g.gid for g in sim.gpus.values() if g.node == node and not g.instances]
            if len(free) >= m.tp:
                load, tier = self.load_estimate(sim, node, m)
                options.append((load, node, tier, tuple(free[:m.tp])))
        if not options:
            return None  # no node has the GPUs free: the request waits; the loop tries again
        load, node, tier, gpus = min(options)
        self.loads[tier] += 1
        if tier == "ssd":
            self.disk_free_at[node] = sim.now + load
        self.cache(node, model, m.weight_bytes)
        return sim.start_instance(model, gpus, "cold", sim.costs.engine_start_s + load,
                                  kv_limit=vllm_kv_bytes(sim, m), batch_capacity=self.config.max_queue_length)

    def cache(self, node: str, model: str, size: int) -> None:
        cache = self.host_cache.setdefault(node, OrderedDict())
        if model in cache:
            return  # the load time is set once, at load: eviction is oldest-load-first
        while cache and sum(cache.values()) + size > self.config.host_cache_bytes:
            cache.popitem(last=False)
        if size <= self.config.host_cache_bytes:
            cache[model] = size


# ---- MuxServe --------------------------------------------------------------------------------------------

RATE_SCALE = {1: 1, 2: 2, 4: 8}  # compute weight by the model's size (MuxServe: 7B 1, 13B 2, 30B 4, 65B 8), by TP
PREFILL_MPS = {1: 80, 2: 90, 4: 100}  # MuxServe's fixed prefill SM percentage by model size
AVG_PROMPT, AVG_OUTPUT = 161, 337  # MuxServe's workload averages (ShareGPT), for offline estimates


@dataclass(frozen=True)
class Placed:
    model: str
    gpus: tuple[str, ...]
    sm_share: float  # percent of the mesh's SMs
    kv_bytes: int  # KV quota per GPU
    max_num_seqs: int


def mesh_splits(gpus_per_node: int) -> list[tuple[int, ...]]:
    """Every split of a node into meshes of power-of-two sizes, largest first."""
    sizes = [s for s in (8, 4, 2, 1) if s <= gpus_per_node]
    out: set[tuple[int, ...]] = set()

    def rec(left: int, parts: tuple[int, ...]) -> None:
        if left == 0:
            out.add(tuple(sorted(parts, reverse=True)))
            return
        for s in sizes:
            if s <= left and (not parts or s <= parts[-1]):
                rec(left - s, parts + (s,))
    rec(gpus_per_node, ())
    return sorted(out, reverse=True)


def request_seconds(sim: Simulator, m: SimModel, tp: int) -> float:
    """Device seconds one average request takes at a batch of 8 (prefill + its share of decode steps)."""
    pre = step_cost(m.shape, sim.device, Batch(((AVG_PROMPT, 0),)), tp).time()
    dec = step_cost(m.shape, sim.device, Batch(decodes=(AVG_PROMPT + AVG_OUTPUT // 2,) * 8), tp).time()
    return pre + AVG_OUTPUT * dec / 8


def muxserve_placement(sim: Simulator, rates: dict[str, float]) -> list[Placed]:
    """MuxServe's offline placement from average rates, over the candidate mesh splits of each node."""
    nodes = sorted({g.node for g in sim.gpus.values()})
    per_node = len([g for g in sim.gpus.values() if g.node == nodes[0]])
    best: tuple[float, list] | None = None
    for split in mesh_splits(per_node):
        meshes = []
        for node in nodes:
            gids = [g.gid for g in sorted(sim.gpus.values(), key=lambda g: g.index) if g.node == node]
            k = 0
            for size in split:
                meshes.append({"gpus": tuple(gids[k:k + size]), "models": [], "load": 0.0,
                               "weights": 0})
                k += size
        order = sorted(sim.models.values(), key=lambda m: (-rates.get(m.name, 0) * RATE_SCALE.get(m.tp, m.tp),
                                                           -RATE_SCALE.get(m.tp, m.tp), m.name))
        for m in order:
            rate = rates.get(m.name, 0.0)
            fits = [x for x in meshes
                    if len(x["gpus"]) >= m.tp and (x["weights"] + m.weight_bytes) / len(x["gpus"])
                    <= sim.device.memory_bytes * GPU_MEMORY_UTILIZATION * 0.8]
            if not fits:
                continue

            def gain(x, m=m, rate=rate):  # the served rate the mesh adds with the model on it
                before_rate = sum(r for _, r in x["models"])
                load = x["load"] + rate * request_seconds(sim, m, len(x["gpus"]))
                before = before_rate * min(1.0, 1.0 / max(x["load"], 1e-9))
                after = (before_rate + rate) * min(1.0, 1.0 / max(load, 1e-9))
                return after - before, -x["load"] / len(x["gpus"]), -len(x["gpus"])
            x = max(fits, key=gain)
            x["models"].append((m.name, rate))
            x["load"] += rate * request_seconds(sim, m, len(x["gpus"]))
            x["weights"] += m.weight_bytes
        served = sum(sum(r for _, r in x["models"]) * min(1.0, 1.0 / max(x["load"], 1e-9)) for x in meshes)
        placed = sum(len(x["models"]) for x in meshes)
        key = (placed, served)
        if best is None or key > best[0]:
            best = (key, meshes)
    out: list[Placed] = []
    for x in best[1] if best else []:
        if not x["models"]:
            continue
        size = len(x["gpus"])
        free = sim.device.memory_bytes * GPU_MEMORY_UTILIZATION - x["weights"] / size
        total_rate = sum(r for _, r in x["models"]) or 1.0
        mps = {}
        for name, rate in x["models"]:
            m = sim.models[name]
            need = rate * request_seconds(sim, m, size)  # share of the mesh's time the model needs
            decode = next((p for p in range(10, 100, 10) if p / 100 >= need), 90)
            mps[name] = max(PREFILL_MPS.get(m.tp, 100), decode)
        for name, rate in x["models"]:
            m = sim.models[name]
            kv = int(free * rate / total_rate) if total_rate else int(free / len(x["models"]))
            tokens = kv * size // m.kv_bytes_per_token
            seqs = max(int(tokens // (AVG_PROMPT + AVG_OUTPUT - 82)), 1)  # MuxServe's average sequence: 416 tokens
            out.append(Placed(name, x["gpus"], 100 * mps[name] / sum(mps.values()), kv, seqs))
    return out


class MuxServe(Baseline):
    keep_weights = False

    def __init__(self, rates: dict[str, float], mode: str = "emulated"):
        self.rates = rates
        self.mode = mode
        self.name = "muxserve" if mode == "emulated" else "muxserve-ideal"
        self.placed: dict[int, Placed] = {}
        self.done = False

    def on_tick(self, sim: Simulator) -> None:
        if self.done:
            return
        self.done = True
        sched = SchedulerConfig(max_num_batched_tokens=100_000 if self.mode == "emulated" else 2048)
        for p in muxserve_placement(sim, self.rates):
            sim.models[p.model] = replace(sim.models[p.model], tp=len(p.gpus))  # intra-op over the whole mesh
            inst = sim.start_instance(p.model, p.gpus, "warm", 0.0, kv_limit=p.kv_bytes,
                                      batch_capacity=p.max_num_seqs,
                                      scheduler=replace(sched, max_num_seqs=p.max_num_seqs))
            self.placed[inst.iid] = p

    def shares(self, sim: Simulator, inst: Instance) -> tuple[float, float]:
        """Emulated: the MPS share caps compute; bandwidth is split among the engines computing now.
        Ideal: both split among the engines computing now, by their shares."""
        mine = self.placed[inst.iid].sm_share
        busy = [o for o in sim.gpus[inst.gpus[0]].instances if o.segment is not None and o is not inst]
        total = mine + sum(self.placed[o.iid].sm_share for o in busy)
        bandwidth = mine / total
        compute = mine / 100 if self.mode == "emulated" else bandwidth
        return compute, bandwidth


# ---- static dedicated ------------------------------------------------------------------------------------


class StaticDedicated(Baseline):
    """One instance per model on its own GPU group, placed once; models that do not fit are never served."""

    name = "static"

    def __init__(self):
        self.done = False

    def on_tick(self, sim: Simulator) -> None:
        if self.done:
            return
        self.done = True
        free = sorted(sim.gpus.values(), key=lambda g: (g.node, g.index))
        for m in sorted(sim.models.values(), key=lambda m: (-m.tp, m.name)):
            by_node: dict[str, list[str]] = {}
            for g in free:
                if not g.instances:
                    by_node.setdefault(g.node, []).append(g.gid)
            group = next((gids[:m.tp] for gids in by_node.values() if len(gids) >= m.tp), None)
            if group is not None:
                sim.start_instance(m.name, tuple(group), "warm", 0.0, kv_limit=vllm_kv_bytes(sim, m),
                                   batch_capacity=sim.scheduler.max_num_seqs)


def static_gpus(models: list[SimModel]) -> int:
    """GPUs a static dedicated cluster needs: one group per model."""
    return sum(m.tp for m in models)

