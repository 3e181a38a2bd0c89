"""Which prewarmed copies should exist where.

First version: every servable single-device model gets one copy; a model keeps the worker it
already occupies (no churn); new copies go, busiest model first, to the live worker with the most
room. The paper's evict-aware algorithm (DESIGN 2.3) replaces this behind the same signature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shared.messages import CopyState, ModelSpec, ModelStatus, PlannedCopy, WorkerState

RESIDENT = (CopyState.LOADING, CopyState.PREWARMED, CopyState.ACTIVE, CopyState.DRAINING)


@dataclass(frozen=True)
class PlacementResult:
    copies: list[PlannedCopy]
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it has no copy


def plan_prewarm(models: Sequence[ModelSpec], workers: Sequence[WorkerState],
                 predicted_peak: Mapping[str, float]) -> PlacementResult:
    servable = [m for m in models if m.status is ModelStatus.ACTIVE]
    room = {w.worker_id: w.memory_budget_bytes - w.kv_bytes for w in workers}
    copies: list[PlannedCopy] = []
    skipped: dict[str, str] = {}
    placed: set[str] = set()

    for m in servable:  # keep what is already resident
        for w in workers:
            c = w.copy_of(m.slug)
            if c is not None and c.state in RESIDENT and m.slug not in placed:
                copies.append(PlannedCopy(model=m.slug, worker_id=w.worker_id))
                room[w.worker_id] -= m.parameter_bytes
                placed.add(m.slug)

    pending = sorted((m for m in servable if m.slug not in placed),
                     key=lambda m: (-predicted_peak.get(m.slug, 0.0), -m.parameter_bytes, m.slug))
    for m in pending:
        if m.tensor_parallel_size > 1:
            skipped[m.slug] = f"tensor parallel size {m.tensor_parallel_size} needs a multi-device group"
            continue
        best = max(workers, key=lambda w: (room[w.worker_id], w.worker_id), default=None)
        if best is None or room[best.worker_id] < m.parameter_bytes:
            skipped[m.slug] = "no worker has room for its weights"
            continue
        copies.append(PlannedCopy(model=m.slug, worker_id=best.worker_id))
        room[best.worker_id] -= m.parameter_bytes
    return PlacementResult(copies=copies, skipped=skipped)
