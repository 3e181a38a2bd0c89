"""The gateway's live routing table, mirrored from NATS KV (no database on the request path)."""

from __future__ import annotations

import time
from collections.abc import Collection

from services.gateway.admission_core import AdmissionCore
from services.gateway.errors import ApiError
from shared.watch import KvMirror
from shared.messages import CopyState, ModelSpec, ModelStatus, WorkerState
from shared.policy.cluster import live_workers
from shared.policy.routing import Route, active_routes


class RoutingTable:
    def __init__(self, catalog: KvMirror[ModelSpec], workers: KvMirror[WorkerState], heartbeat_timeout_s: float,
                 core: AdmissionCore):
        self.catalog = catalog
        self.workers = workers
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.core = core  # the routing decision and this gateway's pending requests

    @property
    def ready(self) -> bool:
        return self.catalog.ready.is_set() and self.workers.ready.is_set()

    def live(self) -> list[WorkerState]:
        # silence counted from when this gateway saw each state, never from the worker's clock
        return live_workers(self.workers.items.values(), time.time(), self.heartbeat_timeout_s,
                            seen_at=self.workers.seen_at)

    def model(self, slug: str) -> ModelSpec:
        spec = self.catalog.items.get(slug)
        if spec is None or spec.status is not ModelStatus.ACTIVE:
            raise ApiError(404, f"The model '{slug}' does not exist", code="model_not_found", param="model")
        return spec

    def routes(self, slug: str) -> list[Route]:
        return active_routes(slug, self.live())

    def known_instances(self, slug: str) -> set[str]:
        """Every active instance of ``slug`` this gateway knows of, on live workers and on workers whose
        heartbeat is stale here: a request that waits while a worker's heartbeat lags and is then served by
        the same instance found it warm, not made for it."""
        return {r.instance_id for r in active_routes(slug, self.workers.items.values())}

    def has_instance(self, slug: str) -> bool:
        return bool(self.routes(slug))

    def try_route(self, slug: str, exclude: Collection[str] = ()) -> Route | None:
        """The least-loaded active instance of ``slug`` with room, or None."""
        return self.core.choose_route(self.routes(slug), exclude)

    def alive(self, route: Route) -> bool:
        """Whether the worker process that holds ``route`` still heart-beats (a restart is a new one)."""
        return any(w.worker_id == route.worker_id and w.started_at_s == route.incarnation for w in self.live())

    def replaced(self, route: Route) -> bool:
        """Whether another process of ``route``'s worker heart-beats: the one that held it is gone for sure."""
        return any(w.worker_id == route.worker_id and w.started_at_s != route.incarnation for w in self.live())

    def started(self, route: Route) -> None:
        self.core.started(route)

    def finished(self, route: Route) -> None:
        self.core.finished(route)

    def model_cards(self) -> list[dict]:
        workers = self.live()
        cards = []
        for slug, spec in sorted(self.catalog.items.items()):
            if spec.status is not ModelStatus.ACTIVE:
                continue
            states = [c.state for w in workers if (c := w.copy_of(slug)) is not None]
            cards.append({
                "id": slug, "object": "model", "created": 0, "owned_by": "warmserve",
                "max_context_tokens": spec.max_context_tokens,
                "active_instances": sum(s is CopyState.ACTIVE for s in states),
                "prewarmed_copies": sum(s is CopyState.PREWARMED for s in states),
                "loading_copies": sum(s is CopyState.LOADING for s in states),
            })
        return cards
