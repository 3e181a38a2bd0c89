"""Handover: a queued model takes a GPU from a lightly used instance of another model (docs/placement.md,
"Handover").

In a crowded cluster (more models than GPU groups) a model's prewarmed copy usually sits on a GPU that
serves another model, and a copy can only become an instance where nothing serves. Without handover the
queued model waits until the autoscaler stops that instance on its own. With it, the other instance (the
*giver*) is drained (its requests finish; new ones go to its model's other instances or wait) and the queued
model is activated there, from its copy when the GPU holds one.

Givers lie wholly inside the group taken (a one-GPU model never stops a four-GPU instance for one of its
GPUs); the group's other devices are free. A giver is chosen only if giving it up costs its model little:

- **fits**: its model's other instances cover both its current load and its forecast peak for the next
  window at the scale-up threshold, so nothing of its model waits or misses; or
- **trades**: it is lightly loaded (at most ``down`` x B requests in flight, below the autoscaler's
  scale-down threshold), the queued model's waiting requests are at least ``margin`` times what the giver
  serves now and is forecast to serve, and its model keeps serving: another instance of it runs, or a
  ready copy of it waits on free devices outside the group (its next request is a prewarm hit there), or
  it is a trickle (at most ``trickle`` requests in flight on average, now and in its forecast peak), whose
  next request can wait for an instance of its own. Its model may then queue a little more, for a GPU that
  serves more than ``margin`` times as much. The margin, leaving busy instances alone and never
  taking a model's last instance while it has load keep two models from handing a GPU back and forth and
  keep a quiet model from starving in a saturated cluster (measured on the paper's regime at 8-12 rps:
  without these conditions P99 TTFT was 10-100x worse, and a low-rate model's requests went unserved).

When another GPU is free for a cold load, only an idle giver (no request in flight) that fits and holds a
ready copy is taken: that handover is a prewarm hit at no cost to anyone, while a busy giver's drain can
take longer than the cold load. Fits before trades, prewarm hits before cold loads, then the giver with
the fewest requests in flight (the shortest drain). Everything is a function of what is passed in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from shared.messages import Outcome
from shared.policy.cluster import ClusterView, InstanceView


@dataclass(frozen=True)
class HandoverConfig:
    margin: float = 2.0  # a trade needs this many times the giver's demand
    up: float = 0.8  # the autoscaler's scale-up threshold: the other instances' usable share
    down: float = 0.5  # the scale-down threshold: a giver traded away has at most this share in flight
    trickle: float = 1.0  # a model this quiet (mean concurrency, now and forecast) may lose its last instance
    batch_capacity: int = 32


@dataclass(frozen=True)
class Handover:
    devices: tuple[str, ...]
    outcome: Outcome  # prewarm_hit: the group holds a ready copy; cold: the model is loaded there
    givers: tuple[str, ...]  # instance ids drained first
    rule: str  # "fits" or "trades"

    @property
    def worker_id(self) -> str:
        return self.devices[0]


def giver_rule(inst: InstanceView, view: ClusterView, demand: float, loads: Mapping[str, float],
               peaks: Mapping[str, float], config: HandoverConfig, rehomed: bool = False) -> str | None:
    """Whether ``inst`` may give its GPU to a model with ``demand`` requests waiting: "fits", "trades" or
    None. ``rehomed``: its model has a ready copy on free devices elsewhere, so its next request is a
    prewarm hit there."""
    if inst.draining:
        return None
    siblings = view.instances_of(inst.model)
    b = max(inst.in_flight, 0)
    load = max(loads.get(inst.model, 0.0), float(sum(i.in_flight for i in siblings)))
    peak = peaks.get(inst.model, 0.0)
    rest = (len(siblings) - 1) * config.batch_capacity * config.up
    if len(siblings) > 1 and rest >= max(load, peak):
        return "fits"
    light = b <= config.down * config.batch_capacity
    keeps_serving = len(siblings) > 1 or rehomed or (load <= config.trickle and peak <= config.trickle)
    if light and keeps_serving and demand >= config.margin * max(load / max(len(siblings), 1),
                                                                 peak / max(len(siblings), 1), b, 1.0):
        return "trades"
    return None


def choose_handover(view: ClusterView, model: str, tp: int, shard_bytes: int, demand: float,
                    loads: Mapping[str, float], peaks: Mapping[str, float], *, busy: Collection[str] = (),
                    free_alternative: bool = False, config: HandoverConfig = HandoverConfig()) -> Handover | None:
    """A group of ``tp`` devices for ``model`` (``shard_bytes`` of weights per device; ``demand``: its
    requests waiting for an instance) taken from the instances serving there, or None. ``loads``: each
    model's current load, ``peaks``: its forecast peak for the next window (both concurrency).
    ``free_alternative``: a free group could take a cold load."""
    order = {d.device_id: (d.node, d.index) for d in view.devices}
    candidates: list[tuple[tuple, Handover]] = []

    def rehomed(giver: str, group: tuple[str, ...]) -> bool:
        return any(c.model == giver and c.ready and not set(c.devices) & set(group)
                   and not any(view.serving(g) or g in busy for g in c.devices) for c in view.copies)

    def consider(devices: tuple[str, ...], outcome: Outcome) -> None:
        # every device of the group is free or serves: a 70B's four GPUs may be two idle ones and a 13B's two
        if any(g not in order or g in busy for g in devices) or not any(view.serving(g) for g in devices):
            return
        givers = {i.instance_id: i for g in devices for i in view.instances_on(g)}
        if any(i.model == model or not set(i.devices) <= set(devices) for i in givers.values()):
            return  # never a giver spanning devices beyond the group: a 7B does not stop a 70B's four GPUs
        rules = [giver_rule(i, view, demand, loads, peaks, config, rehomed(i.model, devices))
                 for i in givers.values()]
        if None in rules:
            return
        rule = "trades" if "trades" in rules else "fits"
        in_flight = sum(i.in_flight for i in givers.values())
        if free_alternative and (rule != "fits" or in_flight or outcome is not Outcome.PREWARM_HIT):
            return
        key = (rule != "fits", outcome is not Outcome.PREWARM_HIT, in_flight, [order[g] for g in devices])
        candidates.append((key, Handover(tuple(devices), outcome, tuple(sorted(givers)), rule)))

    for c in view.copies:
        if c.model == model and c.ready and len(c.devices) == tp:
            consider(c.devices, Outcome.PREWARM_HIT)
    for i in view.instances:  # a cold load where one instance's devices are exactly the group needed
        if len(i.devices) == tp and not any(view.holds(model, g) for g in i.devices) and all(
                d is not None and d.memory_bytes >= shard_bytes + d.kv_cache_bytes for d in map(view.device, i.devices)):
            consider(i.devices, Outcome.COLD)
    return min(candidates, key=lambda kc: kc[0])[1] if candidates else None
