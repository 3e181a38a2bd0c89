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


@dataclass(frozen=True)
class GpuView:
    """One GPU as the group chooser sees it (the simulator builds these; a worker is one GPU)."""

    gpu_id: str
    node: str
    index: int
    serving: bool  # an instance runs on it
    free_bytes: int  # memory not held by anything
    copies: tuple[tuple[str, int, bool], ...] = ()  # prewarmed copies on it: (model, shard bytes, ready)


def choose_group(model: str, tp: int, shard_bytes: int, gpus: Sequence[GpuView],
                 copy_groups: Sequence[tuple[str, tuple[str, ...], bool]]) -> tuple[tuple[str, ...], Outcome] | None:
    """Where a new TP-``tp`` instance of ``model`` goes, in the order of DESIGN 2.4: a completed prewarmed copy
    whose GPUs all serve nothing (a prewarm hit); a copy still loading there (it waits for it); otherwise
    the ``tp`` idle GPUs of one node with room (other models' prewarmed copies count as room: they are
    evicted) holding the fewest prewarmed copies (a cold load). ``copy_groups``: (model, gpus, ready)."""
    by_id = {g.gpu_id: g for g in gpus}
    for want_ready, outcome in ((True, Outcome.PREWARM_HIT), (False, Outcome.COLD)):
        for m, group, ready in sorted(copy_groups, key=lambda c: [(by_id[g].node, by_id[g].index) for g in c[1]]):
            if m == model and ready is want_ready and all(not by_id[g].serving for g in group):
                return tuple(group), outcome
    best = None
    nodes: dict[str, list[GpuView]] = {}
    for g in gpus:
        room = g.free_bytes + sum(b for m, b, _ in g.copies if m != model)
        if not g.serving and room >= shard_bytes:
            nodes.setdefault(g.node, []).append(g)
    for node, idle in sorted(nodes.items()):
        if len(idle) < tp:
            continue
        idle.sort(key=lambda g: (len(g.copies), -g.free_bytes, g.index))
        group = idle[:tp]
        key = (sum(len(g.copies) for g in group), -sum(g.free_bytes for g in group), node)
        if best is None or key < best[0]:
            best = (key, tuple(g.gpu_id for g in sorted(group, key=lambda g: g.index)))
    return (best[1], Outcome.COLD) if best else None
