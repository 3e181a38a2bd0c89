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
ASK_DELAY_MIN_S, ASK_DELAY_MAX_S = 0.5, 8.0


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
        self._next_ask: dict[str, float] = {}
        self._ask_delay: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._on_queue_change = on_queue_change

    def notify(self) -> None:
        """The routing table changed or an instance freed a slot: waiters look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _scale(self, model: str, reason: str) -> asyncio.Task[ScaleReply] | None:
        """Ask the orchestrator for an instance: one ask per model at a time, and after a failed ask
        not again before a growing delay (0.5 s doubling to 8 s), so waiters cannot storm it."""
        task = self._scaling.get(model)
        if task is not None and not task.done():
            return task
        now = time.monotonic()
        if now < self._next_ask.get(model, 0.0):
            return task
        task = asyncio.ensure_future(self._ask(ScaleRequest(model=model, reason=reason,
                                                            waiting=self.waiting.get(model, 1))))
        self._scaling[model] = task
        self._next_ask[model] = now + self._ask_delay.get(model, ASK_DELAY_MIN_S)
        return task

    async def _ask(self, req: ScaleRequest) -> ScaleReply:
        try:
            reply = await self.scaler(req)
        except Exception as exc:  # no orchestrator, NATS away: the wait loop asks again later
            reply = ScaleReply(ok=False, error={"code": "scale_failed", "message": str(exc)})
        delay = self._ask_delay.get(req.model, ASK_DELAY_MIN_S)
        self._ask_delay[req.model] = ASK_DELAY_MIN_S if reply.ok else min(delay * 2, ASK_DELAY_MAX_S)
        if reply.ok and reply.instance_id and reply.outcome:
            self.created[reply.instance_id] = reply.outcome
            while len(self.created) > 4096:
                self.created.pop(next(iter(self.created)))
            self.notify()
        return reply

    async def admit(self, model: str, exclude: Collection[str] = ()) -> tuple[Route, Outcome, float]:
        """An instance for one request of ``model``: (route, outcome, seconds waited). The route's slot
        is reserved (``table.started``) before this returns; the caller releases it."""
        route = self.table.try_route(model, exclude)
        if route is not None:
            self.table.started(route)
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
                route, outcome = await self._wait(model, exclude, reason, deadline)
            except ApiError as exc:
                span.set_attribute("warmserve.error", exc.code or "")
                raise
            finally:
                self._enter(model, -1)
            span.set_attribute("warmserve.outcome", outcome.value)
            span.set_attribute("warmserve.instance", route.instance_id)
            return route, outcome, time.monotonic() - started

    async def _wait(self, model: str, exclude: Collection[str], reason: str, deadline: float) -> tuple[Route, Outcome]:
        """Ask for an instance and wait until one has room or the deadline passes."""
        existing = {r.instance_id for r in self.table.routes(model)}  # slots freeing up here are `warm`
        last_error = "no instance became ready"
        while True:
            changed = self._changed
            route = self.table.try_route(model, exclude)
            if route is not None:
                self.table.started(route)  # reserve the slot before anything else can take it
                if route.instance_id in existing:
                    return route, Outcome.WARM
                # a new instance (ours, or the autoscaler's that our wait caused): cold or a prewarm hit
                made = self.created.get(route.instance_id) or route.made
                task = self._scaling.get(model)
                if made is None and task is not None and not task.done():
                    try:
                        await asyncio.wait([task], timeout=1.0)  # its reply says how it was made
                    except BaseException:  # the client left meanwhile: the slot is not the caller's yet
                        self.table.finished(route)
                        raise
                    made = self.created.get(route.instance_id)
                return route, made or Outcome.WARM
            task = self._scale(model, reason)  # again whenever the last ask is over and nothing has room
            if task is not None and task.done() and not task.result().ok and task.result().error:
                last_error = task.result().error.message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(503, f"No instance of '{model}' within {self.wait_s:.0f} s: {last_error}",
                               code="no_capacity", headers={"Retry-After": "5"})
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def _enter(self, model: str, delta: int) -> None:
        n = self.waiting.get(model, 0) + delta
        if n:
            self.waiting[model] = n
        else:
            self.waiting.pop(model, None)
        self._on_queue_change(model, n)
