"""Which active instance gets a request (docs/design.md, "Requests": least-loaded active instance)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.messages import CopyState, Outcome, WorkerState


@dataclass(frozen=True)
class Route:
    worker_id: str
    instance_id: str
    in_flight: int
    capacity: int = 32  # the worker's batch capacity B
    incarnation: float = 0.0  # the worker process's start time: a restarted worker is another one
    made: Outcome | None = None  # how the instance was made (cold or prewarm_hit), as its worker reports


def active_routes(model: str, workers: Iterable[WorkerState]) -> list[Route]:
    """Every active instance of ``model`` on the given (live) workers."""
    routes = []
    for w in workers:
        c = w.copy_of(model)
        if c is not None and c.state is CopyState.ACTIVE and c.instance_id:
            routes.append(Route(w.worker_id, c.instance_id, c.in_flight, w.batch_capacity, w.started_at_s, c.made))
    return routes


def pick_route(routes: Iterable[Route], pending: dict[str, int] | None = None) -> Route | None:
    """The route with the fewest in-flight requests below its instance's capacity.

    ``pending`` counts requests this router has sent since the worker last reported, so a burst
    between two heartbeats spreads out instead of piling onto one instance. Ties go to the
    lowest worker id, which keeps the choice deterministic.
    """
    pending = pending or {}
    best: tuple[int, str] | None = None
    chosen = None
    for r in routes:
        load = r.in_flight + pending.get(r.instance_id, 0)
        if load >= r.capacity:
            continue
        key = (load, r.worker_id)
        if best is None or key < best:
            best, chosen = key, r
    return chosen
