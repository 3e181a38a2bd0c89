"""Views of the cluster that every policy needs."""

from __future__ import annotations

from collections.abc import Iterable

from shared.messages import CopyState, WorkerState


def live_workers(states: Iterable[WorkerState], now_s: float, timeout_s: float) -> list[WorkerState]:
    """Workers whose last heartbeat is recent enough to trust, sorted by id for determinism."""
    return sorted((w for w in states if now_s - w.heartbeat_at_s <= timeout_s), key=lambda w: w.worker_id)


def copies_in(workers: Iterable[WorkerState], model: str, *states: CopyState) -> list[tuple[WorkerState, str]]:
    """(worker, model) pairs where ``model`` has a copy in one of ``states``."""
    out = []
    for w in workers:
        c = w.copy_of(model)
        if c is not None and c.state in states:
            out.append((w, model))
    return out
