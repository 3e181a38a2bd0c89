"""The FastAPI application: OpenAI-compatible endpoints, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway import errors
from services.gateway.api_types import ChatCompletionRequest, CompletionRequest
from services.gateway.demand import DemandPublisher
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing import RoutingTable
from shared import bus
from shared.messages import InferChunk, InferRequest, ModelSpec, WorkerState, new_id
from shared.policy.routing import Route
from shared.settings import GatewaySettings
from shared.subjects import CATALOG_BUCKET, INFER, WORKERS_BUCKET

log = logging.getLogger("warmserve.gateway")
OUTCOME_HEADER = "x-warmserve-outcome"
DEFAULT_MAX_TOKENS = 256


class Gateway:
    """Everything a request handler needs, created in the app's lifespan."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.demand = DemandPublisher(settings.gateway_id, settings.demand_interval_s)
        self.tracer = trace.get_tracer("warmserve.gateway")

    async def start(self) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, f"gateway-{s.gateway_id}")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.catalog = bus.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        self.workers = bus.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
        self.table = RoutingTable(self.catalog, self.workers, s.heartbeat_timeout_s)
        self._demand_task = asyncio.create_task(self.demand.run(self.js))

    async def stop(self) -> None:
        self._demand_task.cancel()
        await asyncio.gather(self._demand_task, return_exceptions=True)
        await self.catalog.stop()
        await self.workers.stop()
        await bus.close(self.nc)

    def chunks(self, route: Route, infer: InferRequest) -> AsyncIterator[InferChunk]:
        return bus.request_stream(
            self.nc, INFER.format(worker=route.worker_id), infer, InferChunk,
            first_timeout=self.settings.first_token_timeout_s, idle_timeout=self.settings.inter_token_timeout_s,
            is_last=lambda c: c.last,
        )


def create_app(settings: GatewaySettings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        app.state.gateway = gw
        yield
        await gw.stop()

    app = FastAPI(title="WarmServe gateway", version="0.1.0", lifespan=lifespan)
    errors.install(app)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        checks = {"nats": gw.nc.is_connected, "routing_table": gw.table.ready}
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
        infer = InferRequest(request_id=f"chatcmpl-{new_id()}", model=body.model, messages=body.messages,
                             sampling=body.sampling(DEFAULT_MAX_TOKENS))
        return await serve(body, infer, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        infer = InferRequest(request_id=f"cmpl-{new_id()}", model=body.model, prompt=body.prompt,
                             sampling=body.sampling(DEFAULT_MAX_TOKENS))
        return await serve(body, infer, chat=False)

    async def serve(body, infer: InferRequest, chat: bool):
        gw.table.model(body.model)  # 404 before anything else
        span = gw.tracer.start_span("gateway.request", attributes={
            "warmserve.model": body.model, "warmserve.request_id": infer.request_id, "warmserve.stream": body.stream})
        try:
            route = gw.table.route(body.model)
        except ApiError as exc:
            _end_span(span, exc.status)
            gw.metrics.requests.labels(body.model, "none", str(exc.status)).inc()
            raise
        served = Served(gw, body.model, route, span, outcome="warm")
        infer = infer.model_copy(update={"instance_id": route.instance_id})
        stream = gw.chunks(route, infer)
        try:
            with trace.use_span(span, end_on_exit=False):  # the worker's spans join this trace
                first = await _first(stream)
        except BaseException as exc:
            served.done(exc.status if isinstance(exc, ApiError) else 500)
            await stream.aclose()
            raise
        served.first_token()
        headers = {OUTCOME_HEADER: served.outcome}
        created = int(time.time())

        if not body.stream:
            try:
                text, last = await _collect(first, stream)
            except BaseException as exc:
                served.done(exc.status if isinstance(exc, ApiError) else 500)
                raise
            finally:
                await stream.aclose()
            served.done(200, last)
            return JSONResponse(_full_response(infer, body.model, chat, created, text, last), headers=headers)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            status, last, chunk = 200, first, first
            try:
                if chat:
                    yield _sse(_chunk(infer, body.model, chat, created, role=True))
                while True:
                    if chunk.error:
                        err = errors.from_worker(chunk.error.code, chunk.error.message)
                        status = err.status
                        yield _sse(err.body())
                        break
                    if chunk.text or chunk.finish_reason:
                        yield _sse(_chunk(infer, body.model, chat, created, text=chunk.text,
                                          finish_reason=chunk.finish_reason))
                    last = chunk
                    if chunk.last:
                        if include_usage and chunk.usage:
                            yield _sse(_chunk(infer, body.model, chat, created, usage=chunk.usage, empty=True))
                        break
                    chunk = await anext(stream)
            except bus.BusError as exc:
                status = 504
                yield _sse(ApiError(504, f"worker stopped answering: {exc}", code=exc.code).body())
            except (GeneratorExit, asyncio.CancelledError):
                status = 499  # the client went away (nginx's "client closed request")
                raise
            except Exception as exc:
                status = 500
                log.exception("stream %s failed", infer.request_id)
                yield _sse(ApiError(500, f"internal error: {exc!r}", code="internal").body())
            finally:
                served.done(status, last if status == 200 else None)
                await stream.aclose()
            yield "data: [DONE]\n\n"

        async def closed() -> None:  # also when the client left before the first byte was sent
            served.done(499)
            await stream.aclose()

        return _ClosingStream(sse(), on_close=closed, media_type="text/event-stream", headers=headers)

    return app


# ---------------------------------------------------------------------- helpers


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however the response ends."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class Served:
    """Bookkeeping of one routed request, closed exactly once whatever way it ends."""

    def __init__(self, gw: Gateway, model: str, route: Route, span, outcome: str):
        self.gw, self.model, self.route, self.span, self.outcome = gw, model, route, span, outcome
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self._done = False
        span.set_attribute("warmserve.outcome", outcome)
        span.set_attribute("warmserve.worker", route.worker_id)
        gw.table.started(route)
        gw.demand.arrive(model)
        gw.metrics.in_flight.labels(model).inc()

    def first_token(self) -> None:
        self.ttft = time.perf_counter() - self.started
        self.gw.metrics.ttft.labels(self.model, self.outcome).observe(self.ttft)
        self.span.add_event("first_token", {"ttft_s": self.ttft})

    def done(self, status: int, last: InferChunk | None = None) -> None:
        if self._done:
            return
        self._done = True
        gw = self.gw
        gw.table.finished(self.route)
        gw.demand.complete(self.model)
        gw.metrics.in_flight.labels(self.model).dec()
        gw.metrics.requests.labels(self.model, self.outcome, str(status)).inc()
        if last is not None and last.usage and last.usage.completion_tokens > 1 and self.ttft is not None:
            decode_s = time.perf_counter() - self.started - self.ttft
            gw.metrics.tpot.labels(self.model).observe(decode_s / (last.usage.completion_tokens - 1))
        _end_span(self.span, status)


def _end_span(span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    span.end()


async def _first(stream: AsyncIterator[InferChunk]) -> InferChunk:
    """The first chunk; errors before it become HTTP errors."""
    try:
        first = await anext(stream)
    except bus.BusError as exc:
        status = 503 if exc.code == "no_responders" else 504
        raise ApiError(status, f"worker unavailable: {exc}", code=exc.code,
                       headers={"Retry-After": "1"} if status == 503 else None) from None
    if first.error:
        raise errors.from_worker(first.error.code, first.error.message)
    return first


async def _collect(first: InferChunk, stream: AsyncIterator[InferChunk]) -> tuple[str, InferChunk]:
    """The whole answer of a non-streaming request."""
    text, last = first.text, first
    try:
        while not last.last:
            chunk = await anext(stream)
            if chunk.error:
                raise errors.from_worker(chunk.error.code, chunk.error.message)
            text += chunk.text
            last = chunk
    except bus.BusError as exc:
        raise ApiError(504, f"worker stopped answering: {exc}", code=exc.code) from None
    return text, last


def _usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _full_response(infer: InferRequest, model: str, chat: bool, created: int, text: str, last: InferChunk) -> dict:
    choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": infer.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": _usage(last.usage) if last.usage else None}


def _chunk(infer: InferRequest, model: str, chat: bool, created: int, *, text: str = "", role: bool = False,
           finish_reason: str | None = None, usage=None, empty: bool = False) -> dict:
    if empty:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": infer.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = _usage(usage)
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
