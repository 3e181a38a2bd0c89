"""The FastAPI application: OpenAI-compatible endpoints, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway import errors
from services.gateway.admission import Admission
from services.gateway.admission_core import AdmissionCore
from services.gateway.api_types import REMOVED_GUIDED_FIELDS, ChatCompletionRequest, CompletionRequest
from services.gateway.demand import DemandPublisher
from services.gateway.errors import ApiError
from services.gateway.limits import Guard, KeySlots, body_limit, check_request, prompt_param, too_large_for_bus
from services.gateway.metrics import GatewayMetrics
from services.gateway.recent import RecentRequests
from services.gateway.responses import ResponseBuilder
from services.gateway.routing import RoutingTable
from services.gateway.shared_limits import LocalRates
from services.gateway.shutdown import Drain
from shared import bus, watch
from shared.admin import GATEWAY_VERBS, Dispatcher, RequestIdArgs
from shared.apikeys import hash_key
from shared.messages import (
    ApiKeyRecord, CancelRequest, InferChunk, InferRequest, ModelSpec, Outcome, Ping, Pong, ScaleReply, ScaleRequest,
    WorkerState, new_id,
)
from shared.policy.routing import Route
from shared.service import freeze_gc_heap
from shared.settings import GatewaySettings
from shared.subjects import APIKEYS_BUCKET, CANCEL, CATALOG_BUCKET, GATEWAY_ADMIN, INFER, PING, SCALE, WORKERS_BUCKET

log = logging.getLogger("warmserve.gateway")
OUTCOME_HEADER = "x-warmserve-outcome"
REQUEST_ID_HEADER = "x-request-id"  # the response body's id: a client can quote it (`warmserve request ID`)
MAX_ROUTES = 3  # a request that no worker started is routed again, at most this often
CLIENT_CLOSED = 499  # nginx's "client closed request"
LOST_CHECK_S = 2.0  # a stream quiet this long asks its worker whether it has the request at all
SCALE_ASK_S = 5.0  # an unanswered ask for an instance is asked again after this (the wait goes on)
CUT_BEFORE_END_S = 1.0  # of the shutdown grace: time to send the errors and close before uvicorn cancels


class Gateway:
    """Everything a request handler needs, created in the app's lifespan."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.demand = DemandPublisher(settings.gateway_id, settings.demand_interval_s,
                                      buffer_max=settings.demand_buffer_samples, on_drop=self.metrics.demand_dropped.inc)
        self.metrics.demand_buffered.set_function(lambda: len(self.demand.pending))
        self.tracer = trace.get_tracer("warmserve.gateway")
        self.recent = RecentRequests(settings.recent_requests, settings.gateway_id)  # attached in start()
        self._admin = Dispatcher(GATEWAY_VERBS, {"request": self._request_story})  # warmserve.admin.gateway.*
        # per key; with several gateway processes main.py puts host-wide ones here (shared_limits.py)
        self.rates = LocalRates()
        self.key_slots = KeySlots(settings.key_max_concurrency, settings.gateways)
        self.drain = Drain()
        self._pinged: dict[str, tuple[float, float]] = {}  # worker -> (incarnation, confirmed until)

    async def start(self) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, f"gateway-{s.gateway_id}")
        if self.body_limit < s.max_body_bytes:
            log.warning("WARMSERVE_MAX_BODY_BYTES is %d, but NATS carries at most %d bytes a message: request "
                        "bodies are limited to %d bytes", s.max_body_bytes, self.nc.max_payload, self.body_limit)
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.catalog = watch.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        self.workers = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState, on_change=self._workers_changed).start()
        self.keys = watch.KvMirror(buckets[APIKEYS_BUCKET.name], ApiKeyRecord).start()
        core = AdmissionCore(s.queue_size)
        self.table = RoutingTable(self.catalog, self.workers, s.heartbeat_timeout_s, core)
        self.admission = Admission(self.table, self._scale, core, wait_s=s.queue_wait_s,
                                   on_queue_change=lambda m, n: self.metrics.queue_depth.labels(m).set(n))
        self._demand_task = asyncio.create_task(self.demand.run(self.js, lambda: self.nc.is_connected))
        self.recent.attach()  # the process's tracer provider (main.py set it up) keeps recent requests' spans
        # no queue group: every gateway process answers, `warmserve request` gathers their answers
        await self.nc.subscribe(GATEWAY_ADMIN.wildcard, cb=self._on_admin)
        freeze_gc_heap()  # started: what exists now is not garbage, and collections need not walk it

    @property
    def body_limit(self) -> int:
        """The largest request body: the setting, or less where NATS could not carry it to a worker."""
        nc = getattr(self, "nc", None)
        return body_limit(self.settings.max_body_bytes, nc.max_payload if nc is not None else None)

    async def stop(self) -> None:
        self._demand_task.cancel()
        await asyncio.wait([self._demand_task], timeout=3)
        await self.catalog.stop()
        await self.workers.stop()
        await self.keys.stop()
        await bus.close(self.nc)
        self.recent.close()

    async def _on_admin(self, msg) -> None:
        await self._admin.on_message(self.nc, msg)

    async def _request_story(self, args: RequestIdArgs) -> dict:
        """``warmserve.admin.gateway.request``: the request's spans as this process recorded them, or where
        it is not kept, how many are (the asker tells the operator how far back the gateways remember)."""
        kept = {"gateway": self.settings.gateway_id, "capacity": self.recent.capacity if self.recent.enabled else 0,
                "kept": len(self.recent)}
        story = self.recent.story(args.request_id)
        if story is None:
            return {"found": False, **kept}
        answer = {"found": True, **kept, **story}
        if len(json.dumps(answer, default=str)) > self.nc.max_payload - 4096:  # cannot travel: the request's own
            answer = {**answer, "spans": story["spans"][:1], "dropped_spans": story["dropped_spans"]
                      + len(story["spans"]) - 1}
        return answer

    def begin_drain(self) -> None:
        """Shutdown has begun: stop being ready, and end whatever is still running with a clear error
        shortly before the grace period is over (uvicorn would cut it without a word)."""
        if not self.drain.draining:
            cut_after = max(self.settings.shutdown_grace_s - CUT_BEFORE_END_S, 0.0)
            log.info("shutting down: requests in flight have %.0f s to finish", cut_after)
            self.drain.begin(cut_after)

    def authorize(self, authorization: str | None) -> ApiKeyRecord | None:
        """401 for a missing, unknown or disabled key; 429 when the key is over its rate.
        The key itself is never logged nor quoted in an answer, not even in part: only its name."""
        if not self.settings.require_api_key:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            log.debug("request without an API key refused")
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        record = self.keys.items.get(hash_key(key.strip()))
        if record is None:
            log.debug("request with an unknown API key refused")
            raise ApiError(401, "Incorrect API key", code="invalid_api_key")
        if record.disabled:
            log.debug("request with the disabled API key '%s' refused", record.name)
            raise ApiError(401, f"API key '{record.name}' is disabled", code="api_key_disabled")
        rate = (record.rate_limit_rps or self.settings.rate_limit_rps) / self.settings.gateways  # this one's share
        wait = self.rates.take(record.id, rate, max(1.0, 2 * rate), time.monotonic())
        if wait > 0:
            raise ApiError(429, f"Rate limit of {rate:g} requests/s reached for key '{record.name}'",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return record

    def _workers_changed(self) -> None:
        if hasattr(self, "admission"):
            self.admission.notify()

    async def _scale(self, req: ScaleRequest) -> ScaleReply:
        """Ask the orchestrator for an instance. The answer comes when the instance serves (a cold load takes
        a while), but an ask is given up after SCALE_ASK_S and asked again: an ask lost with the orchestrator
        leader that got it (its node died) would otherwise hold every waiting request for the whole queue
        wait. Asking again costs nothing: the orchestrator shares one scale-up per model among all asks."""
        return await bus.request(self.nc, SCALE.format(model=req.model), req, ScaleReply,
                                 timeout=min(self.settings.queue_wait_s, SCALE_ASK_S))

    def cancel(self, worker_id: str, request_id: str) -> None:
        async def send() -> None:
            try:
                await self.nc.publish(CANCEL.format(worker=worker_id), CancelRequest(request_id=request_id).encode())
            except Exception as exc:  # the worker's own checks end it eventually
                log.warning("could not cancel %s: %s", request_id, exc)

        asyncio.ensure_future(send())

    def chunks(self, route: Route, infer: InferRequest) -> AsyncIterator[InferChunk]:
        next_ask = [LOST_CHECK_S]

        async def alive(silent_s: float) -> bool:
            if silent_s < next_ask[0]:
                return await self.still_serving(route)
            next_ask[0] = silent_s + LOST_CHECK_S  # quiet this long: does the worker have the request at all?
            return await self.still_serving(route, infer.request_id)

        return bus.request_stream(
            self.nc, INFER.format(worker=route.worker_id), infer, InferChunk,
            first_timeout=self.settings.first_token_timeout_s, idle_timeout=self.settings.inter_token_timeout_s,
            is_last=lambda c: c.last, alive=alive,
        )

    async def still_serving(self, route: Route, request_id: str | None = None) -> bool:
        """Whether the worker process behind a silent stream is still there. A stale heartbeat alone does not
        end the stream: the heartbeat path (the worker's KV writes, JetStream, this gateway's mirror) can lag
        on a loaded host while the worker generates. The worker is asked directly: a reply within a heartbeat
        interval names the process that answers; NATS's no-responders status says its connection closed; no
        answer either means its loop is stuck (a stopped process), and the stream ends as lost.

        With ``request_id`` (a stream quiet for ``LOST_CHECK_S``) the worker is asked whatever its heartbeat
        says, and must also be serving that request: a request, or its last chunk, lost on the way (core NATS
        delivers at most once, and a NATS server that dies loses what it held) ends the stream as lost, so
        the gateway serves it elsewhere (nothing sent yet) or ends it with a clear error, instead of waiting
        out the token timeout."""
        if self.table.replaced(route):
            return False
        now = time.monotonic()
        if request_id is None:
            if self.table.alive(route):
                return True
            incarnation, until = self._pinged.get(route.worker_id, (None, 0.0))
            if incarnation == route.incarnation and now < until:  # answered a moment ago
                return True
        try:
            pong = await bus.request(self.nc, PING.format(worker=route.worker_id), Ping(request_id=request_id),
                                     Pong, timeout=self.settings.heartbeat_interval_s)
        except bus.BusError as exc:
            if request_id is not None and exc.code != "no_responders" and self.table.alive(route):
                return True  # a busy worker slow to answer, its heartbeat fresh: only a definite "no" ends it
            log.warning("worker %s is lost: a ping %s found %s", route.worker_id,
                        f"about request {request_id}" if request_id else "after its heartbeat went stale",
                        "nobody listening" if exc.code == "no_responders" else "no answer")
            return False
        if pong.started_at_s != route.incarnation:
            return False
        if request_id is not None:
            if pong.serving is False:
                log.warning("request %s is not on worker %s: it, or its end, was lost on the way", request_id,
                            route.worker_id)
                return False
            return True
        log.info("worker %s answers a ping, though its heartbeat is stale here", route.worker_id)
        self._pinged = {w: v for w, v in self._pinged.items() if v[1] > now}  # workers come and go: no pile-up
        self._pinged[route.worker_id] = (route.incarnation, now + self.settings.heartbeat_timeout_s)
        return True


def create_app(settings: GatewaySettings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        app.state.gateway = gw
        yield
        await gw.stop()

    app = FastAPI(title="WarmServe gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw  # started by the lifespan
    errors.install(app)
    app.add_middleware(Guard, gateway=gw)  # key, rate, concurrency, body size: before any parsing

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        checks = {"nats": gw.nc.is_connected, "routing_table": gw.table.ready, "api_keys": gw.keys.ready.is_set(),
                  "not_shutting_down": not gw.drain.draining}
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": gw.table.model_cards()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        request_id = f"chatcmpl-{new_id()}"
        return await _quoting(request_id, serve(body, body.infer(request_id)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        request_id = f"cmpl-{new_id()}"
        return await _quoting(request_id, serve(body, body.infer(request_id)))

    async def serve(body: ChatCompletionRequest | CompletionRequest, infer: InferRequest):
        log_ignored(infer.request_id, body.ignored_fields())
        spec = gw.table.model(body.model)  # 404 before anything else
        check_request(body, spec, gw.settings)  # 400 for what no worker would accept
        if infer.tools is not None and spec.tool_parser:  # the catalog's, newer than a running instance's spec
            infer = infer.model_copy(update={"tools": infer.tools.model_copy(update={"parser": spec.tool_parser})})
        pparam = prompt_param(body)
        built = ResponseBuilder(body, infer.request_id, body.model, int(time.time()))
        span = gw.tracer.start_span("gateway.request", attributes={
            "warmserve.model": body.model, "warmserve.request_id": infer.request_id, "warmserve.stream": body.stream,
            "warmserve.gateway": gw.settings.gateway_id})
        served = Served(gw, body.model, infer.request_id, span, choices=body.choices)
        tried: set[str] = set()
        try:
            for _attempt in range(MAX_ROUTES):
                with trace.use_span(span, end_on_exit=False):  # queueing, scale-up and worker spans join
                    route, outcome, waited = await gw.drain.unless_cut(gw.admission.admit(body.model, exclude=tried))
                served.route(route, outcome, waited)
                routed = infer.model_copy(update={"instance_id": route.instance_id})
                stream = gw.chunks(route, routed)
                try:
                    with trace.use_span(span, end_on_exit=False):
                        first = await gw.drain.unless_cut(_first(stream, pparam))
                    break
                except _NotStarted as exc:  # nothing was generated yet: another instance may serve it
                    await stream.aclose()
                    gw.cancel(route.worker_id, infer.request_id)  # in case it starts after all
                    served.unroute()
                    tried.add(route.instance_id)
                    span.add_event("reroute", {"instance": route.instance_id, "reason": str(exc)})
                    log.warning("request %s not started on %s (%s); routing it again", infer.request_id,
                                route.instance_id, exc)
                except BaseException:
                    await stream.aclose()
                    raise
            else:
                raise ApiError(503, f"No instance of '{body.model}' could start the request", code="no_capacity",
                               headers={"Retry-After": "2"}, detail=f"not started on {', '.join(sorted(tried))}")
        except BaseException as exc:
            served.failed(exc)
            served.done(_status_of(exc))
            raise
        infer = routed
        served.first_token()
        headers = {OUTCOME_HEADER: served.outcome, REQUEST_ID_HEADER: infer.request_id}
        built.take(first)

        if not body.stream:
            try:
                last = await gw.drain.unless_cut(_collect(first, stream, pparam, built))
            except BaseException as exc:
                served.failed(exc)
                served.done(_status_of(exc))
                raise
            finally:
                await stream.aclose()
            served.done(200, last)
            return JSONResponse(built.response(), headers=headers)

        async def sse() -> AsyncIterator[str]:
            # the events of one bus chunk go out in one write (the role event with the first token's, the
            # end's with the last): a write per event cost about 25 us each
            status, last, chunk = 200, first, first
            events = [_sse(event) for event in built.start_events()]
            try:
                while True:
                    if chunk.error:
                        err = errors.from_worker(chunk.error.code, chunk.error.message, pparam)
                        status = err.status
                        served.failed(err)
                        events.append(_sse(err.body()))
                        break
                    events.extend(_sse(event) for event in built.events(chunk))
                    last = chunk
                    if chunk.last:
                        events.extend(_sse(event) for event in built.end_events())
                        break
                    if events:
                        yield "".join(events)
                        events = []
                    chunk = await gw.drain.unless_cut(_next(stream))
            except bus.BusError as exc:
                err = errors.from_bus(exc)
                status = err.status
                served.failed(err)
                events.append(_sse(err.body()))
            except ApiError as exc:  # the gateway is shutting down
                status = exc.status
                served.failed(exc)
                events.append(_sse(exc.body()))
            except (GeneratorExit, asyncio.CancelledError):
                status = CLIENT_CLOSED
                raise
            except Exception as exc:
                status = 500
                log.exception("stream %s failed", infer.request_id)
                err = errors.internal(repr(exc))
                served.failed(err, logged=True)
                events.append(_sse(err.body()))
            finally:
                served.done(status, last if status == 200 else None)
                await stream.aclose()
            yield "".join(events) + "data: [DONE]\n\n"

        async def closed() -> None:  # also when the client left before the first byte was sent
            served.done(CLIENT_CLOSED)
            await stream.aclose()

        return _ClosingStream(sse(), on_close=closed, media_type="text/event-stream", headers=headers)

    return app


# ---------------------------------------------------------------------- helpers


async def _quoting(request_id: str, answer: Awaitable[Response]) -> Response:
    """``answer``, or the error response it ends in, with the request's id in ``x-request-id`` (the answer's own
    headers have it already): whatever the client got, it can quote the id to an operator."""
    try:
        return await answer
    except ApiError as exc:
        exc.headers = {**exc.headers, REQUEST_ID_HEADER: request_id}
        raise
    except Exception as exc:  # answered with errors.install's 500, which adds these
        errors.quote_in_response(exc, {REQUEST_ID_HEADER: request_id})
        raise


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however the response ends.

    It streams in the request's own task: Guard (limits.py) cancels that task when the client disconnects,
    so starlette's listener for the disconnect (a task group and a task per response) is not needed."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.stream_response(send)
        finally:
            await self._on_close()


LOGGED_DETAIL_CHARS = 300


def shorten(text: str, limit: int = LOGGED_DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out (the full text is in the trace)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class Served:
    """Bookkeeping of one request, closed exactly once whatever way it ends."""

    def __init__(self, gw: Gateway, model: str, request_id: str, span, choices: int = 1):
        self.gw, self.model, self.request_id, self.span = gw, model, request_id, span
        self.choices = choices
        self.route_: Route | None = None
        self.outcome = "none"
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self._done = False
        gw.demand.arrive(model)
        gw.metrics.in_flight.labels(model).inc()

    def route(self, route: Route, outcome: Outcome, waited_s: float) -> None:
        """Record the route admission reserved (its slot is already counted as pending)."""
        self.route_, self.outcome = route, outcome.value
        self.span.set_attribute("warmserve.outcome", outcome.value)
        self.span.set_attribute("warmserve.worker", route.worker_id)
        self.span.set_attribute("warmserve.instance", route.instance_id)
        self.span.set_attribute("warmserve.queue_wait_s", waited_s)
        self.gw.metrics.queue_wait.labels(self.model, self.outcome).observe(waited_s)

    def unroute(self) -> None:
        if self.route_ is not None:
            self.gw.table.finished(self.route_)
            self.route_ = None
            self.gw.admission.notify()

    def first_token(self) -> None:
        self.ttft = time.perf_counter() - self.started
        self.gw.metrics.ttft.labels(self.model, self.outcome).observe(self.ttft)
        self.span.add_event("first_token", {"ttft_s": self.ttft})

    def failed(self, exc: BaseException, logged: bool = False) -> None:
        """What the client is not told about its error (which worker, what failed inside) goes to the log
        and the request's span; the client has the error's stable code and sentence."""
        if isinstance(exc, ApiError) and not self._done:
            errors.record(self.span, exc)
            if exc.detail and not logged:  # shortened: a worker's message may quote the prompt
                log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "request %s failed with %s %s: %s",
                        self.request_id, exc.status, exc.code, shorten(exc.detail))

    def done(self, status: int, last: InferChunk | None = None) -> None:
        if self._done:
            return
        self._done = True
        gw = self.gw
        if status != 200 and self.route_ is not None:  # stop the worker generating for nobody
            gw.cancel(self.route_.worker_id, self.request_id)
        self.unroute()
        gw.demand.complete(self.model)
        gw.metrics.in_flight.labels(self.model).dec()
        gw.metrics.requests.labels(self.model, self.outcome, str(status)).inc()
        # time per output token of one sequence: several choices' tokens come in parallel, so not counted then
        if last is not None and last.usage and last.usage.completion_tokens > 1 and self.ttft is not None \
                and self.choices == 1:
            decode_s = time.perf_counter() - self.started - self.ttft
            gw.metrics.tpot.labels(self.model).observe(decode_s / (last.usage.completion_tokens - 1))
        _record_usage(self.span, last)
        _end_span(self.span, status)


class _NotStarted(Exception):
    """The worker could not start the request (gone, or the instance is no longer active)."""


def _status_of(exc: BaseException) -> int:
    """The status a request that ended with ``exc`` is counted under."""
    if isinstance(exc, ApiError):
        return exc.status
    return CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError) else 500


def _record_usage(span, last: InferChunk | None) -> None:
    """The tokens the worker reported on its last chunk (the gateway knows no timings of the worker's own)."""
    if last is not None and last.usage is not None:
        span.set_attribute("warmserve.prompt_tokens", last.usage.prompt_tokens)
        span.set_attribute("warmserve.completion_tokens", last.usage.completion_tokens)


def _end_span(span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    span.end()


async def _first(stream: AsyncIterator[InferChunk], prompt_param: str) -> InferChunk:
    """The first chunk. Errors before it become HTTP errors, or _NotStarted when another instance
    could still serve the request."""
    try:
        first = await anext(stream)
    except bus.BusError as exc:
        if exc.code in ("no_responders", "responder_lost"):
            raise _NotStarted(str(exc)) from None
        if exc.code == "too_large":  # refused before sending: nothing reached the worker
            raise too_large_for_bus(str(exc)) from None
        raise errors.from_bus(exc) from None
    if first.error:
        if first.error.code in ("not_active", "aborted", "engine_dead", "overloaded"):
            raise _NotStarted(first.error.message)
        raise errors.from_worker(first.error.code, first.error.message, prompt_param)
    return first


async def _next(stream: AsyncIterator[InferChunk]) -> InferChunk:
    return await anext(stream)


async def _collect(first: InferChunk, stream: AsyncIterator[InferChunk], prompt_param: str,
                   built: ResponseBuilder) -> InferChunk:
    """The whole answer of a non-streaming request, collected per choice into ``built``; the last chunk."""
    built.add(first)
    last = first
    try:
        while not last.last:
            chunk = await anext(stream)
            if chunk.error:
                raise errors.from_worker(chunk.error.code, chunk.error.message, prompt_param)
            built.add(chunk)
            last = chunk
    except bus.BusError as exc:
        raise errors.from_bus(exc) from None
    return last


IGNORED_NAMES_LOGGED = 20


def log_ignored(request_id: str, names: list[str]) -> None:
    """Parameters nothing here defines are ignored, as vLLM's server ignores them: logged once per request by
    name (never their values; names cut short and ASCII-escaped, since a client chooses them)."""
    if not names:
        return
    shown = ", ".join(ascii(n[:64])[1:-1] for n in names[:IGNORED_NAMES_LOGGED])
    more = f" and {len(names) - IGNORED_NAMES_LOGGED} more" if len(names) > IGNORED_NAMES_LOGGED else ""
    removed = sorted(REMOVED_GUIDED_FIELDS.intersection(names))
    note = f" ({', '.join(removed)}: removed from vLLM, the answer is not constrained)" if removed else ""
    log.info("request %s: ignored unknown parameters %s%s%s", request_id, shown, more, note)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
