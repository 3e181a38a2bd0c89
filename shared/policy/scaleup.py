"""Where a new instance of a model goes (DESIGN 2.4), in order of preference:
a completed prewarmed copy on a worker that serves nothing (a prewarm hit); a copy still loading
there; otherwise a free worker with room, holding the fewest prewarmed copies (a cold load)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.messages import CopyState, ModelSpec, Outcome, WorkerState


@dataclass(frozen=True)
class Placement:
    worker_id: str
    outcome: Outcome


def serving(w: WorkerState) -> bool:
    return any(c.state in (CopyState.ACTIVE, CopyState.DRAINING) for c in w.copies)


def choose_worker(spec: ModelSpec, workers: Sequence[WorkerState], busy: Collection[str] = ()) -> Placement | None:
    """``workers`` are the live ones; ``busy`` are workers with a command in flight."""
    idle = [w for w in workers if not serving(w) and w.worker_id not in busy]
    for state, outcome in ((CopyState.PREWARMED, Outcome.PREWARM_HIT), (CopyState.LOADING, Outcome.COLD)):
        holders = [w for w in idle if (c := w.copy_of(spec.slug)) is not None and c.state is state]
        if holders:
            return Placement(min(holders, key=lambda w: w.worker_id).worker_id, outcome)

    def room(w: WorkerState) -> int:  # free memory plus what evicting its prewarmed copies would free
        return w.free_bytes + sum(c.weight_bytes for c in w.copies if c.state is CopyState.PREWARMED)

    fitting = [w for w in idle if room(w) >= spec.parameter_bytes + w.kv_cache_bytes and w.copy_of(spec.slug) is None]
    if not fitting:
        return None
    best = min(fitting, key=lambda w: (sum(c.state is CopyState.PREWARMED for c in w.copies), -w.free_bytes,
                                       w.worker_id))
    return Placement(best.worker_id, Outcome.COLD)
