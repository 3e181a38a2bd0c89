"""Worker process: wires settings, NATS, the engine and the state machine together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from pydantic import ValidationError

from services.gpu_worker.engines import EngineError, make_engine
from services.gpu_worker.gpu import Gpu
from services.gpu_worker.memory import MemoryPool
from services.gpu_worker.streaming import ChunkCoalescer, RequesterWatch, merge_deltas
from services.gpu_worker.worker import Worker
from shared import bus
from shared.messages import (
    CancelRequest, ChoiceDelta, CommandResult, ErrorInfo, InferChunk, InferRequest, Ping, Pong, Usage, WorkerCommand,
    WorkerEvent, WorkerState,
)
from shared.settings import WorkerSettings, load_settings
from shared.subjects import CANCEL, INFER, PING, WORKER_CMD, WORKER_EVENT, WORKERS_BUCKET
from services.gpu_worker import metrics as worker_metrics
from shared.service import brief, freeze_gc_heap, run_service
from shared.tasks import cancel_and_wait
from shared.telemetry import extract_context, tracer

log = logging.getLogger("warmserve.gpu_worker")


class WorkerService:
    def __init__(self, settings: WorkerSettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self._clock = clock  # this machine's wall clock (readers judge liveness on their own clocks, not this)
        self.gpu = Gpu(settings.device)
        budget = settings.memory_budget_bytes
        if self.gpu.present:
            budget = min(budget, int(self.gpu.total_bytes() * 0.92))
        self.events: asyncio.Queue[WorkerEvent] = asyncio.Queue()
        engine = make_engine(settings.engine, device=settings.device, kv_cache_bytes=settings.kv_cache_bytes,
                             sim_profile=settings.sim_profile, sim_engine_start_s=settings.sim_engine_start_s,
                             gpu=self.gpu, batch_capacity=settings.batch_capacity)
        self.worker = Worker(settings.worker_id, engine, MemoryPool(budget),
                             batch_capacity=settings.batch_capacity,
                             kv_bytes_per_instance=settings.kv_cache_bytes, emit=self.events.put_nowait, clock=clock,
                             idle_copy_policy=settings.idle_copy_policy)
        self.started_at = clock()
        self.tracer = tracer("warmserve.gpu_worker")
        self._tasks: set[asyncio.Task] = set()
        self._requests: dict[str, asyncio.Task] = {}  # request id -> the task generating it
        self._stopping = False  # the loops end at their next turn even if a cancellation was swallowed

    def state(self) -> WorkerState:
        w, mem = self.worker, self.worker.memory
        return WorkerState(
            worker_id=w.worker_id, node=self.settings.node, device=self.settings.device,
            engine=self.settings.engine, memory_budget_bytes=mem.budget_bytes,
            # memory an engine failed to release counts as weights: it is not free for placement either
            weight_bytes=mem.bytes_of(mem.weights) + mem.bytes_of(mem.stranded), kv_bytes=mem.bytes_of(mem.kv),
            batch_capacity=w.batch_capacity, copies=w.snapshot(), gpu=self.gpu.stats(),
            heartbeat_at_s=self._clock(), started_at_s=self.started_at,
            reclaimable_bytes=w.reclaimable_bytes(), in_flight=w.in_flight,
            kv_cache_bytes=0 if getattr(w.engine, "kv_allocated_at_load", False) else (w.kv_bytes_per_instance or 0),
        )

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ handlers

    async def on_command(self, msg: Msg) -> None:
        try:
            cmd = WorkerCommand.decode(msg.data)
        except ValidationError as exc:
            await bus.reply(self.nc, msg, CommandResult(command_id="", ok=False, error=ErrorInfo(
                code="bad_request", message=f"malformed command: {exc.errors()[0]['msg']}")))
            return
        with self.tracer.start_as_current_span(f"worker.{cmd.kind.value}", context=extract_context(msg.headers),
                                               attributes={"warmserve.model": cmd.model}):
            result = await self.worker.handle(cmd)
        await bus.reply(self.nc, msg, result)
        await self.publish_state()

    async def on_infer(self, msg: Msg) -> None:
        try:
            req = InferRequest.decode(msg.data)
        except ValidationError as exc:
            await bus.reply(self.nc, msg, InferChunk(request_id="", seq=0, error=ErrorInfo(
                code="bad_request", message=f"malformed request: {exc.errors()[0]['msg']}")))
            return
        seq = 0
        task = asyncio.current_task()
        self._requests[req.request_id] = task
        token = self.requesters.start(req.request_id)
        try:
            await self._generate(msg, req, seq, token)
        finally:
            self.requesters.end(token)
            if self._requests.get(req.request_id) is task:
                del self._requests[req.request_id]

    async def on_cancel(self, msg: Msg) -> None:
        try:
            req = CancelRequest.decode(msg.data)
        except ValidationError:
            return
        task = self._requests.get(req.request_id)
        if task is not None:
            log.info("cancelling %s: its client went away", req.request_id)
            task.cancel()

    async def on_ping(self, msg: Msg) -> None:
        """Answered in the subscription's callback, before any work: a reply proves this process is connected
        and its loop runs, whatever the heartbeat path says."""
        try:
            asked = Ping.decode(msg.data).request_id if msg.data else None
        except ValueError:
            asked = None
        await bus.reply(self.nc, msg, Pong(worker_id=self.settings.worker_id, started_at_s=self.started_at,
                                           serving=(asked in self._requests) if asked else None))

    async def on_probe_answer(self, msg: Msg) -> None:
        """NATS's no-responders answer to a probing chunk: nobody listens for that stream any more."""
        if not msg.headers or msg.headers.get(bus.STATUS_HEADER) != "503":
            return
        request_id = self.requesters.on_no_responders(msg.subject)
        task = self._requests.get(request_id) if request_id else None
        if task is not None:
            log.info("stopping %s: nobody listens for its output any more (a lost cancel, or its gateway is gone)",
                     request_id)
            task.cancel()

    async def _send(self, msg: Msg, chunk: InferChunk, token: str) -> None:
        """One chunk to the requester; now and then as a probe whether it still listens (``RequesterWatch``)."""
        await bus.reply(self.nc, msg, chunk, reply_to=self.requesters.reply_for(token) or "")

    async def _generate(self, msg: Msg, req: InferRequest, seq: int, token: str) -> None:
        """One chunk per engine step (steps are merged only with ``chunk_interval_s`` > 0); the last chunk
        has the stream's finish reason and the usage (every chunk has the running usage when asked)."""
        with self.tracer.start_as_current_span("worker.generate", context=extract_context(msg.headers),
                                               attributes={"warmserve.model": req.model,
                                                           "warmserve.request_id": req.request_id}) as span:
            try:
                final = None
                coalescer = ChunkCoalescer(self.settings.chunk_interval_s)
                every = req.usage_every_chunk
                per_step = self.settings.chunk_interval_s <= 0
                counted = 0  # tokens produced by the steps already looked at
                prompt_texts = None  # echo: goes out with the first chunk
                started, first = time.perf_counter(), True
                async for delta in self.worker.generate(req):
                    if first and (delta.text or delta.finish_reason or delta.choices):  # prefill ends here
                        first = False
                        span.add_event("first_token", {"prefill_s": time.perf_counter() - started,
                                                        "prompt_tokens": delta.prompt_tokens})
                    if delta.prompt_texts is not None:
                        prompt_texts = delta.prompt_texts
                    usage = (Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)
                             if every or delta.finish_reason else None)
                    if delta.finish_reason:
                        text, deltas = coalescer.flush() + delta.text, coalescer.flush_deltas()
                        if delta.choices:  # a plain stream's last step may say which stop string ended it
                            held = [ChoiceDelta(text=text)] if text else []
                            text, deltas = "", merge_deltas(deltas + held, delta.choices)
                        final = InferChunk(request_id=req.request_id, seq=seq, text=text, deltas=deltas,
                                           finish_reason=delta.finish_reason, usage=usage, prompt_texts=prompt_texts)
                        break
                    if delta.choices:
                        deltas, text = coalescer.add_deltas(delta.choices), None
                    else:
                        deltas, text = None, coalescer.add(delta.text)
                    # a step whose token made no text yet (part of a character, a held-back stop) is still an
                    # event of its own, as vLLM's server streams it
                    step = per_step and delta.completion_tokens > counted and not delta.choices
                    counted = delta.completion_tokens
                    if deltas or text or step or prompt_texts is not None:
                        await self._send(msg, InferChunk(request_id=req.request_id, seq=seq, text=text or "",
                                                         deltas=deltas or [], usage=usage,
                                                         prompt_texts=prompt_texts), token)
                        seq += 1
                        prompt_texts = None
                if final is None:  # the engine ended without saying why
                    final = InferChunk(request_id=req.request_id, seq=seq, text=coalescer.flush(),
                                       deltas=coalescer.flush_deltas(), finish_reason="length",
                                       usage=Usage(prompt_tokens=0, completion_tokens=0), prompt_texts=prompt_texts)
                span.set_attribute("warmserve.completion_tokens", final.usage.completion_tokens)
                await bus.reply(self.nc, msg, final)
            except asyncio.CancelledError:  # deactivated without draining, or the worker is stopping
                span.set_attribute("error.type", "aborted")
                await self._reply_error(msg, req.request_id, seq, "aborted", "the instance stopped serving")
                raise
            except EngineError as exc:
                span.set_attribute("error.type", exc.code)
                await self._reply_error(msg, req.request_id, seq, exc.code, str(exc))
            except Exception as exc:  # the client must hear the request ended, not wait for a timeout
                log.exception("request %s failed", req.request_id)
                span.set_attribute("error.type", "internal")
                await self._reply_error(msg, req.request_id, seq, "internal", f"generation failed: {exc!r}")

    async def _reply_error(self, msg: Msg, request_id: str, seq: int, code: str, message: str) -> None:
        try:
            await bus.reply(self.nc, msg, InferChunk(request_id=request_id, seq=seq,
                                                     error=ErrorInfo(code=code, message=message)))
        except Exception as exc:  # NATS down: the gateway's timeout ends the request
            log.warning("could not report the failure of %s: %s", request_id, brief(exc))

    # ------------------------------------------------------------------ loops

    async def publish_state(self) -> None:
        try:
            await self.kv.put(self.settings.worker_id, self.state().encode())
        except Exception as exc:
            log.warning("heartbeat failed: %s", brief(exc))

    async def heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stopping:
            started = time.monotonic()
            await self.publish_state()
            await asyncio.sleep(interval)
            late = time.monotonic() - started - interval
            if late > interval:  # readers call a worker gone after heartbeat_timeout_s of this
                log.warning("heartbeat %.1f s late: this worker's event loop or its NATS writes were held up", late)

    async def forward_events(self) -> None:
        subject = WORKER_EVENT.format(worker=self.settings.worker_id)
        while not self._stopping:
            event = await self.events.get()
            while True:
                try:
                    await bus.js_publish(self.js, subject, event, msg_id=event.event_id)
                    break
                except Exception as exc:  # NATS restarting (or a cancel nats-py turned into an error): retry
                    if self._stopping:
                        return
                    log.warning("event publish failed (%s); retrying", brief(exc))
                    await asyncio.sleep(1.0)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, f"gpu-worker-{s.worker_id}")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.kv = buckets[WORKERS_BUCKET.name]
        self.requesters = RequesterWatch(self.nc.new_inbox())
        loops = [asyncio.create_task(self.heartbeat()), asyncio.create_task(self.forward_events())]

        async def on_command(msg: Msg) -> None:
            self._spawn(self.on_command(msg))

        async def on_infer(msg: Msg) -> None:
            self._spawn(self.on_infer(msg))

        subs = [await self.nc.subscribe(WORKER_CMD.format(worker=s.worker_id), cb=on_command),
                await self.nc.subscribe(INFER.format(worker=s.worker_id), cb=on_infer),
                await self.nc.subscribe(CANCEL.format(worker=s.worker_id), cb=self.on_cancel),
                await self.nc.subscribe(PING.format(worker=s.worker_id), cb=self.on_ping),
                await self.nc.subscribe(f"{self.requesters.prefix}.*", cb=self.on_probe_answer)]
        worker_metrics.STATE.states[s.worker_id] = self.state
        freeze_gc_heap()  # started: what exists now is not garbage, and collections need not walk it
        log.info("worker %s up: engine=%s device=%s budget=%d bytes", s.worker_id, s.engine, s.device,
                 self.worker.memory.budget_bytes)
        await stop.wait()
        log.info("worker %s stopping: draining %d in-flight requests", s.worker_id, self.worker.in_flight)
        for sub in subs:
            await sub.unsubscribe()
        deadline = time.monotonic() + 10
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # requests that outlived the grace period end with 'aborted'; then the heartbeat and event loops
        stuck = await cancel_and_wait(list(self._tasks), every_s=1.0)  # room for each one's abort reply
        self._stopping = True
        stuck += await cancel_and_wait(loops, timeout_s=5.0)
        if stuck:
            log.warning("%d tasks did not stop when cancelled; stopping without them", len(stuck))
        try:
            await self.kv.delete(s.worker_id)
        except Exception as exc:  # readers drop it once its heartbeat is stale
            log.warning("could not remove %s from the workers bucket: %s", s.worker_id, brief(exc))
        worker_metrics.STATE.states.pop(s.worker_id, None)
        await self.worker.engine.close()
        await bus.close(self.nc)


def main() -> None:
    settings = load_settings(WorkerSettings)
    run_service(WorkerService(settings).run, "gpu-worker", settings)
