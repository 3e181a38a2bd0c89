"""Finding an instance for a request.

At once if an active instance has room (``warm``). Otherwise the request waits in a bounded per-model
queue while the orchestrator is asked, once per model at a time, for another instance; it is served as
soon as one is ready, tagged ``prewarm_hit`` or ``cold`` by how that instance was made, and refused
with 503 and ``Retry-After`` when the wait budget runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

from opentelemetry import trace

from services.gateway.errors import ApiError
from services.gateway.routing import RoutingTable
from shared.messages import Outcome, ScaleReply, ScaleRequest
from shared.policy.routing import Route

log = logging.getLogger("warmserve.gateway")
_tracer = trace.get_tracer("warmserve.gateway")
Scaler = Callable[[ScaleRequest], Awaitable[ScaleReply]]


class Admission:
    def __init__(self, table: RoutingTable, scaler: Scaler, *, wait_s: float, queue_size: int,
                 on_queue_change: Callable[[str, int], None] = lambda m, n: None):
        self.table = table
        self.scaler = scaler
        self.wait_s = wait_s
        self.queue_size = queue_size
        self.waiting: dict[str, int] = {}
        self.created: dict[str, Outcome] = {}  # instance -> how it was made (for the requests that waited)
        self._scaling: dict[str, asyncio.Task[ScaleReply]] = {}
        self._changed = asyncio.Event()
        self._on_queue_change = on_queue_change

    def notify(self) -> None:
        """The routing table changed or an instance freed a slot: waiters look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _scale(self, model: str, reason: str) -> asyncio.Task[ScaleReply]:
        task = self._scaling.get(model)
        if task is None or task.done():
            task = asyncio.ensure_future(self._ask(ScaleRequest(model=model, reason=reason,
                                                                waiting=self.waiting.get(model, 1))))
            self._scaling[model] = task
        return task

    async def _ask(self, req: ScaleRequest) -> ScaleReply:
        try:
            reply = await self.scaler(req)
        except Exception as exc:  # no orchestrator, NATS away: the wait loop retries
            return ScaleReply(ok=False, error={"code": "scale_failed", "message": str(exc)})
        if reply.ok and reply.instance_id and reply.outcome:
            self.created[reply.instance_id] = reply.outcome
            while len(self.created) > 4096:
                self.created.pop(next(iter(self.created)))
        self.notify()
        return reply

    async def admit(self, model: str, exclude: Collection[str] = ()) -> tuple[Route, Outcome, float]:
        """An instance for one request of ``model``: (route, outcome, seconds waited)."""
        route = self.table.try_route(model, exclude)
        if route is not None:
            return route, Outcome.WARM, 0.0
        if self.waiting.get(model, 0) >= self.queue_size:
            raise ApiError(503, f"Model '{model}' has {self.queue_size} requests waiting already; retry shortly",
                           code="queue_full", headers={"Retry-After": "2"})
        started = time.monotonic()
        deadline = started + self.wait_s
        self._enter(model, +1)
        reason = "at_capacity" if self.table.has_instance(model) else "no_instance"
        with _tracer.start_as_current_span("gateway.queue", attributes={
                "warmserve.model": model, "warmserve.reason": reason,
                "warmserve.queue_depth": self.waiting.get(model, 0)}) as span:
            try:
                route, outcome = await self._wait(model, exclude, reason, started, deadline)
            except ApiError as exc:
                span.set_attribute("warmserve.error", exc.code or "")
                raise
            finally:
                self._enter(model, -1)
            span.set_attribute("warmserve.outcome", outcome.value)
            span.set_attribute("warmserve.instance", route.instance_id)
            return route, outcome, time.monotonic() - started

    async def _wait(self, model: str, exclude: Collection[str], reason: str, started: float,
                    deadline: float) -> tuple[Route, Outcome]:
        """Ask for an instance and wait until one has room or the deadline passes."""
        scale = self._scale(model, reason)
        last_error = "no instance became ready"
        while True:
            changed = self._changed
            route = self.table.try_route(model, exclude)
            if route is not None:
                if not scale.done():  # the instance may be the one being made: learn how
                    await asyncio.wait([scale], timeout=1.0)
                return route, self.created.get(route.instance_id, Outcome.WARM)
            if scale.done():
                reply = scale.result()
                if not reply.ok and reply.error:
                    last_error = reply.error.message
                if not reply.ok or reply.instance_id not in {r.instance_id for r in self.table.routes(model)}:
                    if time.monotonic() - started > 0.5:  # an instance was not made or is gone again: ask anew
                        scale = self._scale(model, reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(503, f"No instance of '{model}' within {self.wait_s:.0f} s: {last_error}",
                               code="no_capacity", headers={"Retry-After": "5"})
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    def _enter(self, model: str, delta: int) -> None:
        n = self.waiting.get(model, 0) + delta
        if n:
            self.waiting[model] = n
        else:
            self.waiting.pop(model, None)
        self._on_queue_change(model, n)
