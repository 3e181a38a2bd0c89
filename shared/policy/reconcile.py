"""What the orchestrator must do to turn the cluster into the placement plan (docs/design.md, "Prewarming and scaling")."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.messages import CommandKind, PlannedCopy
from shared.policy.cluster import ClusterView


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
              busy: Collection[tuple[str, str]] = ()) -> list[Action]:
    """Commands that move the cluster in ``view`` toward ``plan``.

    - a planned copy whose model the group's first device does not hold is prewarmed;
    - a prewarmed copy that is no longer planned is evicted (copies still loading finish first; instances
      are left to scaling);
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

    for c in view.copies:
        key = (c.devices[0], c.model)
        if c.ready and key not in planned and key not in busy:
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
