"""Views of the cluster that every policy needs."""

from __future__ import annotations

from collections.abc import Iterable

from shared.messages import WorkerState


def live_workers(states: Iterable[WorkerState], now_s: float, timeout_s: float) -> list[WorkerState]:
    """Workers whose last heartbeat is recent enough to trust, sorted by id for determinism."""
    return sorted((w for w in states if now_s - w.heartbeat_at_s <= timeout_s), key=lambda w: w.worker_id)
