"""What the orchestrator must do to turn reality into the plan (DESIGN 2.4)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.messages import CommandKind, CopyState, PlannedCopy, WorkerState


@dataclass(frozen=True)
class Action:
    kind: CommandKind
    worker_id: str
    model: str


def reconcile(plan: Sequence[PlannedCopy], workers: Sequence[WorkerState], *, min_active: int,
              busy: Collection[tuple[str, str]] = ()) -> list[Action]:
    """Commands that move ``workers`` toward ``plan``.

    - a planned copy that is absent is prewarmed;
    - a prewarmed copy that is no longer planned is evicted (active ones are left to scaling);
    - a planned model with fewer than ``min_active`` active instances is activated on a worker
      that holds it prewarmed and serves nothing else (one instance per worker).
    ``busy`` holds (worker, model) pairs with a command in flight; they are left alone.
    """
    by_id = {w.worker_id: w for w in workers}
    planned = {(c.worker_id, c.model) for c in plan if c.worker_id in by_id}
    actions: list[Action] = []

    for worker_id, model in sorted(planned):
        if (worker_id, model) not in busy and by_id[worker_id].copy_of(model) is None:
            actions.append(Action(CommandKind.PREWARM, worker_id, model))

    for w in workers:
        for c in w.copies:
            if c.state is CopyState.PREWARMED and (w.worker_id, c.model) not in planned \
                    and (w.worker_id, c.model) not in busy:
                actions.append(Action(CommandKind.EVICT, w.worker_id, c.model))

    serving = {w.worker_id for w in workers if any(c.state is CopyState.ACTIVE for c in w.copies)}
    serving |= {wid for wid, _ in busy}
    for model in sorted({m for _, m in planned}):
        active = sum(1 for w in workers if (c := w.copy_of(model)) and c.state is CopyState.ACTIVE)
        for w in workers:
            if active >= min_active:
                break
            c = w.copy_of(model)
            if c is not None and c.state is CopyState.PREWARMED and w.worker_id not in serving:
                actions.append(Action(CommandKind.ACTIVATE, w.worker_id, model))
                serving.add(w.worker_id)
                active += 1
    return actions
