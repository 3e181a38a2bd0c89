"""The cluster as every control-plane decision sees it: one snapshot type for the services and the simulator.

A ``ClusterView`` holds devices (a worker in the services, a GPU in the simulator), the prewarmed copies on
them and the instances serving from them, as the reader last saw them. The services build it from worker
heartbeats (``ClusterView.from_workers``), the simulator from its own state; the cores in
``services/*/core.py`` decide on it and nothing else. Units: bytes and seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from shared.messages import CopyState, Outcome, WorkerState


def silence(seen_s: float, now_s: float, blind: Sequence[tuple[float, float]] = ()) -> float:
    """Seconds since ``seen_s`` that the reader could have heard a writer: time inside ``blind`` (the
    reader's own outages, a NATS restart) does not count, so a writer that had no way to be heard does not
    count as gone, and a plan is not moved off it, because the reader was away."""
    unseen = sum(max(0.0, min(end, now_s) - max(start, seen_s)) for start, end in blind)
    return now_s - seen_s - unseen


def live_workers(states: Iterable[WorkerState], now_s: float, timeout_s: float,
                 blind: Sequence[tuple[float, float]] = (),
                 seen_at: Mapping[str, float] | None = None) -> list[WorkerState]:
    """Workers silent for at most ``timeout_s`` (``silence``), sorted by id for determinism.

    ``seen_at``: when the reader saw each worker's latest state (by worker id), on the reader's clock (the
    KV mirror's receipt time, or the server's timestamp for a state read from the store), never the
    worker's own ``heartbeat_at_s``: a worker whose clock runs behind would be invisible, one ahead never
    declared dead. A worker missing from it has not been seen. Without it (states on one clock: the
    simulator, hand-built tests) the states' own heartbeat times count."""
    def seen(w: WorkerState) -> float:
        if seen_at is None:
            return w.heartbeat_at_s
        return seen_at.get(w.worker_id, float("-inf"))
    return sorted((w for w in states if silence(seen(w), now_s, blind) <= timeout_s), key=lambda w: w.worker_id)


@dataclass(frozen=True)
class Device:
    device_id: str  # a worker id (services) or a GPU id (simulator)
    node: str
    index: int  # position on its node: groups and ties are ordered by (node, index)
    memory_bytes: int  # the budget for weights and KV cache
    free_bytes: int  # held by nothing
    serving_bytes: int = 0  # weights and KV cache of the instances on it
    reclaimable_bytes: int = 0  # KV those instances hold beyond their reservation target
    kv_cache_bytes: int = 0  # KV cache an activation here needs beyond the weights (0: whatever is left)
    batch_capacity: int = 32


@dataclass(frozen=True)
class CopyView:
    """A prewarmed copy (``ready``) or one still loading: weights, no KV cache."""

    model: str
    devices: tuple[str, ...]
    ready: bool
    bytes: int  # per device
    idle_since_s: float = 0.0  # when it last served or finished loading (least recently used goes first)


@dataclass(frozen=True)
class InstanceView:
    """A serving instance (or one being drained)."""

    instance_id: str
    model: str
    devices: tuple[str, ...]
    started_at_s: float
    in_flight: int = 0
    draining: bool = False
    made: Outcome | None = None  # cold or prewarm_hit, as its worker reports
    weight_bytes: int = 0  # per device
    kv_total_blocks: int = 0
    kv_target_free_blocks: int | None = None

    @property
    def worker_id(self) -> str:
        return self.devices[0]


@dataclass(frozen=True)
class ClusterView:
    devices: tuple[Device, ...] = ()
    copies: tuple[CopyView, ...] = ()
    instances: tuple[InstanceView, ...] = ()

    @cached_property
    def _by_id(self) -> dict[str, Device]:
        return {d.device_id: d for d in self.devices}

    @cached_property
    def serving_devices(self) -> frozenset[str]:
        return frozenset(g for i in self.instances for g in i.devices)

    def device(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def serving(self, device_id: str) -> bool:
        return device_id in self.serving_devices

    def copies_on(self, device_id: str) -> list[CopyView]:
        return self._copies_by_device.get(device_id, [])

    def copy_of(self, model: str, device_id: str) -> CopyView | None:
        return next((c for c in self.copies_on(device_id) if c.model == model), None)

    @cached_property
    def _held(self) -> frozenset[tuple[str, str]]:
        return frozenset((c.model, g) for c in self.copies for g in c.devices) | frozenset(
            (i.model, g) for i in self.instances for g in i.devices)

    def holds(self, model: str, device_id: str) -> bool:
        """Whether ``device_id`` has ``model`` in any state (copy or instance)."""
        return (model, device_id) in self._held

    def instances_of(self, model: str) -> list[InstanceView]:
        """The model's instances that serve (not draining)."""
        return [i for i in self.instances if i.model == model and not i.draining]

    @cached_property
    def measured(self) -> dict[str, int]:
        """Per model, the largest per-device footprint a worker reported (absent: never loaded)."""
        out: dict[str, int] = {}
        for model, n in [(c.model, c.bytes) for c in self.copies] + [(i.model, i.weight_bytes) for i in self.instances]:
            if n:
                out[model] = max(out.get(model, 0), n)
        return out

    def measured_bytes(self, model: str) -> int:
        return self.measured.get(model, 0)

    def instances_on(self, device_id: str) -> list[InstanceView]:
        """Every instance on ``device_id``, draining ones included."""
        return self._instances_by_device.get(device_id, [])

    @cached_property
    def _instances_by_device(self) -> dict[str, list[InstanceView]]:
        out: dict[str, list[InstanceView]] = {}
        for i in self.instances:
            for g in i.devices:
                out.setdefault(g, []).append(i)
        return out

    @cached_property
    def _copies_by_device(self) -> dict[str, list[CopyView]]:
        out: dict[str, list[CopyView]] = {}
        for c in self.copies:
            for g in c.devices:
                out.setdefault(g, []).append(c)
        return out

    @classmethod
    def from_workers(cls, workers: Sequence[WorkerState]) -> ClusterView:
        """One device per worker (each worker drives one device), indexed on its node in (device, id) order."""
        devices, copies, instances = [], [], []
        per_node: dict[str, int] = {}
        for w in sorted(workers, key=lambda w: (w.node, w.device, w.worker_id)):
            index = per_node.get(w.node, 0)
            per_node[w.node] = index + 1
            serving = sum(c.weight_bytes for c in w.copies if c.state in (CopyState.ACTIVE, CopyState.DRAINING))
            devices.append(Device(w.worker_id, w.node, index, w.memory_budget_bytes, w.free_bytes,
                                  serving_bytes=serving + w.kv_bytes, reclaimable_bytes=w.reclaimable_bytes,
                                  kv_cache_bytes=w.kv_cache_bytes, batch_capacity=w.batch_capacity))
            for c in w.copies:
                if c.state in (CopyState.LOADING, CopyState.PREWARMED):
                    copies.append(CopyView(c.model, (w.worker_id,), c.state is CopyState.PREWARMED, c.weight_bytes,
                                           idle_since_s=c.since_s))
                elif c.instance_id is not None:
                    instances.append(InstanceView(
                        c.instance_id, c.model, (w.worker_id,), c.since_s, c.in_flight,
                        draining=c.state is CopyState.DRAINING, made=c.made, weight_bytes=c.weight_bytes,
                        kv_total_blocks=c.kv_total_blocks, kv_target_free_blocks=c.kv_target_free_blocks))
        return cls(tuple(devices), tuple(copies), tuple(instances))
