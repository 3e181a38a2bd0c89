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

from services.gateway.admission_core import AdmissionCore
from services.gateway.errors import ApiError
from services.gateway.routing import RoutingTable
from shared.messages import Outcome, ScaleReply, ScaleRequest
from shared.policy.routing import Route

log = logging.getLogger("warmserve.gateway")
_tracer = trace.get_tracer("warmserve.gateway")
RETRY_EXCLUDED_S = 2.0  # an instance a request could not start on is avoided this long while it waits
Scaler = Callable[[ScaleRequest], Awaitable[ScaleReply]]


class Admission:
    """The shell around ``AdmissionCore``: waits on the routing table, runs the asks, traces the wait."""

    def __init__(self, table: RoutingTable, scaler: Scaler, core: AdmissionCore, *, wait_s: float,
                 on_queue_change: Callable[[str, int], None] = lambda m, n: None):
        self.table = table
        self.scaler = scaler
        self.core = core  # shared with the routing table: routes, queue, asks and labels
        self.wait_s = wait_s
        self._scaling: dict[str, asyncio.Task[ScaleReply]] = {}  # model -> the latest ask
        self._changed = asyncio.Event()
        self._on_queue_change = on_queue_change

    def notify(self) -> None:
        """The routing table changed or an instance freed a slot: waiters look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _scale(self, model: str, reason: str) -> asyncio.Task[ScaleReply] | None:
        """The ask for ``model`` that is out, a new one if the core says so, or the last (finished) one."""
        if self.core.should_ask(model, time.monotonic()):
            waiting = self.core.waiting.get(model, 1)
            trace.get_current_span().add_event("scale_up.asked", {"reason": reason, "waiting": waiting})
            task = asyncio.ensure_future(self._ask(ScaleRequest(model=model, reason=reason, waiting=waiting)))
            # an ask cancelled before it ran never reaches its ``finally``: the model may ask again
            task.add_done_callback(lambda t, m=model: self.core.asking.discard(m) if t.cancelled() else None)
            self._scaling[model] = task
        return self._scaling.get(model)

    async def _ask(self, req: ScaleRequest) -> ScaleReply:
        reply = ScaleReply(ok=False, error={"code": "scale_failed", "message": "the ask was cancelled"})
        try:
            reply = await self.scaler(req)
        except Exception as exc:  # no orchestrator, NATS away: the wait loop asks again later
            reply = ScaleReply(ok=False, error={"code": "scale_failed", "message": str(exc)})
        finally:
            self.core.on_reply(req.model, reply.ok, reply.instance_id, reply.outcome)
        span = trace.get_current_span()  # the queue span of the request that asked, unless it is over
        if span.is_recording():
            # scale_up_s: the orchestrator's own count, from its receipt of the ask to the instance serving
            span.add_event("scale_up.answered", {"ok": reply.ok, "worker": reply.worker_id or "",
                                                  "instance": reply.instance_id or "",
                                                  "outcome": reply.outcome.value if reply.outcome else "",
                                                  "scale_up_s": reply.seconds,
                                                  "error": reply.error.code if reply.error else ""})
        if reply.ok and reply.instance_id and reply.outcome:
            self.notify()
        return reply

    async def admit(self, model: str, exclude: Collection[str] = ()) -> tuple[Route, Outcome, float]:
        """An instance for one request of ``model``: (route, outcome, seconds waited). The route's slot
        is reserved (``table.started``) before this returns; the caller releases it."""
        route = self.table.try_route(model, exclude)
        if route is not None:
            self.table.started(route)
            return route, Outcome.WARM, 0.0
        if self.core.queue_full(model):
            raise ApiError(503, f"Model '{model}' has {self.core.queue_size} requests waiting already; retry shortly",
                           code="queue_full", headers={"Retry-After": "2"})
        started = time.monotonic()
        deadline = started + self.wait_s
        self._enter(model, +1)
        reason = "at_capacity" if self.table.has_instance(model) else "no_instance"
        with _tracer.start_as_current_span("gateway.queue", attributes={
                "warmserve.model": model, "warmserve.reason": reason,
                "warmserve.queue_depth": self.core.waiting.get(model, 0)}) as span:
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
        existing = self.table.known_instances(model)  # slots freeing up there are `warm`
        last_error = "no instance became ready"
        began = time.monotonic()
        while True:
            changed = self._changed
            # an instance that could not start the request is avoided, but not for good: when it is the only
            # one (a reroute after a NATS failover cut the gateway or the worker off for a moment), it is
            # tried again after RETRY_EXCLUDED_S rather than waiting for a scale-up its load does not justify
            avoid = exclude if time.monotonic() - began < RETRY_EXCLUDED_S else ()
            route = self.table.try_route(model, avoid)
            if route is not None:
                self.table.started(route)  # reserve the slot before anything else can take it
                outcome = self.core.label(model, route.instance_id, existing, route.made)
                if outcome is None:  # a new instance while our ask is out: its reply says how it was made
                    try:
                        await asyncio.wait([self._scaling[model]], timeout=1.0)
                    except BaseException:  # the client left meanwhile: the slot is not the caller's yet
                        self.table.finished(route)
                        raise
                    outcome = self.core.label(model, route.instance_id, existing, route.made, waited_for_reply=True)
                return route, outcome
            task = self._scale(model, reason)  # again whenever the last ask is over and nothing has room
            if task is not None and task.done() and not task.result().ok and task.result().error:
                last_error = task.result().error.message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(503, f"No instance of '{model}' within {self.wait_s:.0f} s; retry shortly",
                               code="no_capacity", headers={"Retry-After": "5"}, detail=last_error)
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def _enter(self, model: str, delta: int) -> None:
        self._on_queue_change(model, self.core.enter(model, delta))
