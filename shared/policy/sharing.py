"""The shared tier: quiet models served at once from one device (docs/placement.md, "Shared tier").

In a crowded cluster most models are quiet most of the time: a dedicated device for a model that has one or
two requests in flight leaves the device idle and, worse, takes it away from a model whose burst needs it.
With the shared tier a quiet model that finds no free device holding its copy becomes a *guest* on a device
that already serves: its own engine and KV cache next to the instance there, from its prewarmed copy when the
device holds one (a prewarm hit that costs only the activation, preferred to a cold load on a free device),
else loaded there when no device is free.

A device takes a guest when:

- the model is quiet: its load, its forecast peak for the next window and its waiting requests are each at
  most ``quiet`` x B;
- the device's instances are one-device ones (a guest never shares a GPU of a tensor-parallel group), none
  of them draining, fewer than ``max_instances``, and none of the same model;
- what they serve (each instance's in-flight requests, or its share of its model's load and forecast peak if
  larger) plus the guest's own load stays at most ``up`` x B: co-located engines split the device's compute,
  so together they get what one instance would;
- the memory is there: the guest's KV cache (and its weights, when the device holds no copy) fits in what is
  free and other models' prewarmed copies (what a worker evicts for it; a host's KV cache is not shrunk).

Prewarm hits before loads, then the least loaded device. A device's *host* is its oldest serving instance;
the others are its guests (so a guest whose host stopped becomes the host, whatever flag it started with).
**Promotion**: when a model with a guest stops being quiet (its load or forecast peak above ``quiet`` x B),
or its hosted instances no longer carry its load at ``up`` x B, it asks for another hosted instance (a
prewarm hit elsewhere when a copy waits there, or a handover); the guest keeps serving until the hosted
instances carry the load, then it is drained, so the model is served throughout. Everything is a function
of what is passed in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from shared.messages import Outcome
from shared.policy.cluster import ClusterView, InstanceView
from shared.policy.scaleup import Choice


@dataclass(frozen=True)
class SharingConfig:
    quiet: float = 0.25  # a model may be a guest while its load and forecast peak stay at most this x B
    up: float = 0.8  # a shared device's instances together serve at most this x B
    max_instances: int = 4  # instances on one device, the host included
    batch_capacity: int = 32


def expected(model: str, loads: Mapping[str, float], peaks: Mapping[str, float]) -> float:
    """What a model is expected to serve: the larger of its current load and its forecast peak."""
    return max(loads.get(model, 0.0), peaks.get(model, 0.0))


def is_quiet(model: str, loads: Mapping[str, float], peaks: Mapping[str, float], config: SharingConfig,
             waiting: float = 0.0) -> bool:
    return max(expected(model, loads, peaks), waiting) <= config.quiet * config.batch_capacity


def served_on(device_id: str, view: ClusterView, loads: Mapping[str, float], peaks: Mapping[str, float]) -> float:
    """What the instances on a device serve: each its in-flight requests or its share of its model's load."""
    total = 0.0
    for inst in view.instances_on(device_id):
        siblings = max(len(view.instances_of(inst.model)), 1)
        total += max(float(inst.in_flight), expected(inst.model, loads, peaks) / siblings)
    return total


def choose_shared(view: ClusterView, model: str, tp: int, shard_bytes: int, demand: float,
                  loads: Mapping[str, float], peaks: Mapping[str, float], *, busy: Collection[str] = (),
                  config: SharingConfig = SharingConfig()) -> Choice | None:
    """A serving device where ``model`` (``shard_bytes`` of weights; ``demand``: requests waiting for it) can
    be a guest, or None."""
    if tp != 1 or not is_quiet(model, loads, peaks, config, demand):
        return None
    own = max(expected(model, loads, peaks), demand, 1.0)
    best: tuple[tuple, Choice] | None = None
    for d in view.devices:
        here = view.instances_on(d.device_id)
        if not here or d.device_id in busy or len(here) >= config.max_instances:
            continue
        if any(i.model == model or i.draining or len(i.devices) > 1 for i in here):
            continue
        load = served_on(d.device_id, view, loads, peaks)
        if load + own > config.up * config.batch_capacity:
            continue
        copy = view.copy_of(model, d.device_id)
        if copy is not None and not copy.ready:
            continue  # still loading: the device is busy with it
        room = d.free_bytes + sum(
            c.bytes for c in view.copies_on(d.device_id) if c.ready and c.model != model)
        need = d.kv_cache_bytes + (0 if copy is not None else shard_bytes)
        if room < need:
            continue
        outcome = Outcome.PREWARM_HIT if copy is not None else Outcome.COLD
        key = (outcome is not Outcome.PREWARM_HIT, load, d.node, d.index)
        if best is None or key < best[0]:
            best = (key, Choice((d.device_id,), outcome))
    return best[1] if best else None


def is_guest(inst: InstanceView, view: ClusterView) -> bool:
    """Whether an older instance serves on its devices: the first instance on a device is its host."""
    key = (inst.started_at_s, inst.instance_id)
    return any(o.instance_id != inst.instance_id and not o.draining and (o.started_at_s, o.instance_id) < key
               for g in inst.devices for o in view.instances_on(g))


def promotions(view: ClusterView, loads: Mapping[str, float], peaks: Mapping[str, float],
               config: SharingConfig = SharingConfig()) -> tuple[set[str], list[InstanceView]]:
    """Guests to move: the models that should get another hosted instance (none runs, or those that run do
    not carry the load), and the guests to drain because their model's hosted instances now carry it."""
    want: set[str] = set()
    drain: list[InstanceView] = []
    for model in sorted({i.model for i in view.instances if not i.draining and is_guest(i, view)}):
        live = view.instances_of(model)
        guests = [i for i in live if is_guest(i, view)]
        hosted = len(live) - len(guests)
        if hosted * config.up * config.batch_capacity >= loads.get(model, 0.0) and hosted:
            drain.extend(guests)
        elif hosted or not is_quiet(model, loads, peaks, config):
            want.add(model)
    return want, drain
