"""What the orchestrator must do to turn the cluster into the placement plan (docs/design.md, "Prewarming and scaling")."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.messages import CommandKind, PlannedCopy
from shared.policy.cluster import ClusterView, CopyView
from shared.policy.keepalive import IdleCopy, IdleCopyPolicy, eviction_order, victims


@dataclass(frozen=True)
class Action:
    kind: CommandKind
    worker_id: str  # the group's first device
    model: str
    devices: tuple[str, ...] = ()  # the whole group of a multi-device copy (empty: just ``worker_id``)

    @property
    def group(self) -> tuple[str, ...]:
        return self.devices or (self.worker_id,)


def _action(kind: CommandKind, model: str, group: tuple[str, ...]) -> Action:
    return Action(kind, group[0], model, group if len(group) > 1 else ())


def reconcile(plan: Sequence[PlannedCopy], view: ClusterView, *, min_active: int,
              busy: Collection[tuple[str, str]] = (), idle_copy_policy: IdleCopyPolicy = "evict") -> list[Action]:
    """Commands that move the cluster in ``view`` toward ``plan``.

    - a planned copy whose model the group's first device does not hold is prewarmed;
    - a prewarmed copy that is no longer planned is evicted (copies still loading finish first; instances
      are left to scaling). Under ``keep-lru`` it is kept, and evicted only to make room for a planned copy
      on its device, least recently used first (``unplanned_to_evict``);
    - a planned model with fewer than ``min_active`` instances is activated on a group that holds it
      prewarmed and serves nothing else (one instance per device).
    ``busy`` holds (device, model) pairs with a command in flight; they are left alone.
    """
    planned: dict[tuple[str, str], tuple[str, ...]] = {}
    for c in plan:
        if all(view.device(g) is not None for g in c.group):
            planned[(c.group[0], c.model)] = c.group
    actions: list[Action] = []

    for (first, model), group in sorted(planned.items()):
        if (first, model) not in busy and not view.holds(model, first):
            actions.append(_action(CommandKind.PREWARM, model, group))

    unplanned = [c for c in view.copies if c.ready and (c.devices[0], c.model) not in planned
                 and (c.devices[0], c.model) not in busy]
    if idle_copy_policy == "keep-lru":
        unplanned = unplanned_to_evict(unplanned, planned, view, busy)
    for c in unplanned:
        actions.append(_action(CommandKind.EVICT, c.model, c.devices))

    serving = set(view.serving_devices) | {wid for wid, _ in busy}
    for model in sorted({m for _, m in planned}):
        active = len(view.instances_of(model))
        for c in view.copies:
            if active >= min_active:
                break
            if c.model == model and c.ready and not serving.intersection(c.devices):
                actions.append(_action(CommandKind.ACTIVATE, model, c.devices))
                serving.update(c.devices)
                active += 1
    return actions


def unplanned_to_evict(unplanned: Sequence[CopyView], planned: dict[tuple[str, str], tuple[str, ...]],
                       view: ClusterView, busy: Collection[tuple[str, str]]) -> list[CopyView]:
    """Under ``keep-lru``: the unplanned copies on devices where a planned copy still has to be loaded,
    least recently used first, as far as the planned models need (by their measured size; all of the
    device's unplanned copies when a size is not known yet). Elsewhere they stay: memory nobody needs."""
    out: list[CopyView] = []
    for device in sorted({c.devices[0] for c in unplanned}):
        wanted = [m for (first, m) in planned if first == device and (first, m) not in busy
                  and not view.holds(m, device)]
        if not wanted:
            continue
        here = {c.model: c for c in unplanned if c.devices[0] == device}
        sizes = [view.measured_bytes(m) for m in wanted]
        need = None if not all(sizes) else sum(sizes)
        d = view.device(device)
        idle = [IdleCopy(c.model, c.bytes, c.idle_since_s) for c in here.values()]
        chosen = victims(idle, d.free_bytes if d else 0, need, "keep-lru")
        if chosen is None:  # not enough even so: the plan wins, as under ``evict``
            chosen = [c.model for c in eviction_order(idle, "keep-lru")]
        out += [here[m] for m in chosen]
    return out
