"""Where a new instance of a model goes (docs/design.md, "Prewarming and scaling"), in order of preference:

1. a completed prewarmed copy whose devices all serve nothing (a prewarm hit);
2. a copy still loading there (the instance is ready once it has loaded);
3. otherwise the ``tp`` idle devices of one node with room for the weights and the KV cache, holding the
   fewest prewarmed copies (a cold load). Other models' completed copies count as room: the worker evicts
   them for the load. Copies still loading do not (a worker cannot evict them).

One chooser for the orchestrator and the simulator; ``busy`` devices (a command in flight, drained by an
operator) are left out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from shared.messages import Outcome
from shared.policy.cluster import ClusterView, Device


@dataclass(frozen=True)
class Choice:
    devices: tuple[str, ...]
    outcome: Outcome

    @property
    def worker_id(self) -> str:
        return self.devices[0]


def choose_group(view: ClusterView, model: str, tp: int, shard_bytes: int,
                 busy: Collection[str] = ()) -> Choice | None:
    """Devices for a new TP-``tp`` instance of ``model`` whose weights take ``shard_bytes`` per device."""
    order = {d.device_id: (d.node, d.index) for d in view.devices}

    def free(device_id: str) -> bool:
        return device_id in order and not view.serving(device_id) and device_id not in busy

    for want_ready, outcome in ((True, Outcome.PREWARM_HIT), (False, Outcome.COLD)):
        held = [c for c in view.copies if c.model == model and c.ready is want_ready and all(map(free, c.devices))]
        if held:
            best = min(held, key=lambda c: [order[g] for g in c.devices])
            return Choice(tuple(best.devices), outcome)

    def room(d: Device) -> int:
        return d.free_bytes + sum(c.bytes for c in view.copies_on(d.device_id) if c.ready and c.model != model)

    nodes: dict[str, list[Device]] = {}
    for d in view.devices:
        if free(d.device_id) and not view.holds(model, d.device_id) and room(d) >= shard_bytes + d.kv_cache_bytes:
            nodes.setdefault(d.node, []).append(d)
    best = None
    for node, idle in sorted(nodes.items()):
        if len(idle) < tp:
            continue
        idle.sort(key=lambda d: (len(view.copies_on(d.device_id)), -d.free_bytes, d.index, d.device_id))
        group = idle[:tp]
        key = (sum(len(view.copies_on(d.device_id)) for d in group), -sum(d.free_bytes for d in group), node)
        if best is None or key < best[0]:
            best = (key, tuple(d.device_id for d in sorted(group, key=lambda d: d.index)))
    return Choice(best[1], Outcome.COLD) if best else None
