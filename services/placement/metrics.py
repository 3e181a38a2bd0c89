"""Prometheus metrics of placement (on ``WARMSERVE_METRICS_PORT``)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import PlacementPlan
from shared.metrics import REGISTRY

ROUNDS = Counter("warmserve:placement_rounds", "Planning rounds, by result: published (a new plan), unchanged, "
                 "not_written (a later term's plan was in force)", ["result"], registry=REGISTRY)
ROUND_SECONDS = Histogram("warmserve:placement_round_seconds", "Time to compute a plan",
                          buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY)
COPIES_PLANNED = Gauge("warmserve:placement_copies_planned", "Prewarmed copies the plan in force keeps, by model",
                       ["model"], registry=REGISTRY)
_planned: set[str] = set()
COPIES_EVICTED = Counter("warmserve:placement_copies_evicted", "Copies a new plan dropped from the previous one "
                         "(each an eviction on its worker), by model", ["model"], registry=REGISTRY)


def published(plan: PlacementPlan, previous: PlacementPlan | None) -> None:
    """Count a plan now in force: its copies per model, and those of ``previous`` it no longer keeps."""
    ROUNDS.labels("published").inc()
    kept = Tally(c.model for c in plan.copies)
    _planned.update(kept)
    for model in _planned:  # a model gone from the plan reads 0, not its last count
        COPIES_PLANNED.labels(model).set(kept.get(model, 0))
    now = {(c.model, c.worker_id, tuple(c.devices)) for c in plan.copies}
    for c in previous.copies if previous else []:
        if (c.model, c.worker_id, tuple(c.devices)) not in now:
            COPIES_EVICTED.labels(c.model).inc()
