"""Orchestrator process: reconciles workers with the placement plan and persists their history."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.api import DeliverPolicy
from sqlalchemy.exc import IntegrityError

from services.prewarm_orchestrator.autoscaler import AutoscalerState, GatewayLoad
from shared import bus
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import (
    CommandKind, CommandResult, CopyState, DemandSample, ErrorInfo, ModelSpec, OperatorHold, Outcome, PlacementPlan, ScaleReply,
    ScaleRequest, WorkerCommand, WorkerEvent, WorkerState,
)
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.cluster import live_workers
from shared.policy.reconcile import Action, reconcile
from shared.policy.scaleup import choose_worker
from shared.service import brief, pause, run_service
from shared.settings import OrchestratorSettings, load_settings
from shared.subjects import (
    CATALOG_BUCKET, DEMAND, OPERATOR_BUCKET, PLACEMENT_BUCKET, PLACEMENT_KEY, SCALE, WORKER_CMD, WORKER_EVENT, WORKERS_BUCKET,
)
from shared.telemetry import extract_context, tracer

log = logging.getLogger("warmserve.orchestrator")


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings):
        self.settings = settings
        self.busy: set[tuple[str, str]] = set()  # (worker, model) with a lifecycle command in flight
        self.kv_busy: set[tuple[str, str]] = set()  # (worker, model) with a KV target in flight
        self.retry_at: dict[tuple, tuple[float, float]] = {}  # (worker, model, kind) -> (not before, last delay)
        self.gateway_load = GatewayLoad()
        self.autoscaler = AutoscalerState(AutoscaleConfig(
            window_s=settings.autoscale_window_s, up=settings.scale_up_threshold,
            down=settings.scale_down_threshold, min_lifetime_s=settings.min_instance_lifetime_s,
            batch_capacity=settings.batch_capacity, min_instances=settings.min_active_per_model),
            kv_reservation=settings.kv_reservation)
        self._tasks: set[asyncio.Task] = set()
        self._scaling: dict[str, asyncio.Task] = {}
        self.tracer = tracer("warmserve.orchestrator")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def live(self) -> list[WorkerState]:
        return live_workers(self.workers.items.values(), time.time(), self.settings.heartbeat_timeout_s)

    async def reconcile_once(self) -> None:
        plan = self.plan.items.get(PLACEMENT_KEY)
        actions = reconcile(plan.copies if plan else [], self.live(),
                            min_active=self.settings.min_active_per_model, busy=self.busy)
        for action in actions:
            key = (action.worker_id, action.model)
            if self._backing_off(action.worker_id, action.model, action.kind):
                continue
            spec = self.catalog.items.get(action.model)
            self.busy.add(key)
            self._spawn(self.execute(action, spec))

    async def execute(self, action: Action, spec: ModelSpec | None) -> None:
        cmd = WorkerCommand(kind=action.kind, model=action.model, spec=spec, reason="placement plan")
        await self.command(action.worker_id, cmd, busy=self.busy)

    async def command(self, worker_id: str, cmd: WorkerCommand, busy: set) -> CommandResult | None:
        """Send one command; on failure back off for that (worker, model, kind) before trying again.
        The caller put the key in ``busy``; it is released here."""
        key = (worker_id, cmd.model)
        retry_key = (worker_id, cmd.model, cmd.kind)
        result = None
        try:
            result = await bus.request(self.nc, WORKER_CMD.format(worker=worker_id), cmd, CommandResult,
                                       timeout=self.settings.command_timeout_s)
            ok, why = result.ok, (result.error.message if result.error else "")
        except Exception as exc:  # bus errors, a reply that does not decode: retry later
            ok, why = False, brief(exc)
        finally:
            busy.discard(key)
        if ok:
            self.retry_at.pop(retry_key, None)
            log.info("%s %s on %s: done (%s)", cmd.kind.value, cmd.model, worker_id, cmd.reason)
        else:
            if result is not None and result.error and result.error.code == "unsupported" \
                    and cmd.kind is CommandKind.SET_KV_TARGET:
                self.autoscaler.kv_unsupported.add(worker_id)  # vLLM: KV is fixed; stop asking
            delay = min(self.retry_at.get(retry_key, (0.0, 0.5))[1] * 2, 30.0)
            self.retry_at[retry_key] = (time.monotonic() + delay, delay)
            log.warning("%s %s on %s failed: %s (retry in %.0f s)", cmd.kind.value, cmd.model, worker_id, why, delay)
        return result

    def _backing_off(self, worker_id: str, model: str, kind: CommandKind) -> bool:
        return self.retry_at.get((worker_id, model, kind), (0.0, 0.0))[0] > time.monotonic()

    async def on_demand(self, msg) -> None:
        """Gateways' per-second demand (in flight and queued): the autoscaler's view of waiting requests."""
        try:
            sample = DemandSample.decode(msg.data)
        except ValueError:
            return
        self.gateway_load.add(sample.model, sample.gateway_id, sample.start_s + sample.interval_s,
                              sample.concurrency_avg)

    def drained(self) -> set[str]:
        return {h.target for h in self.operator.items.values() if h.kind == "drain"}

    async def autoscale_once(self) -> None:
        """Scale models to their load, stop idle or drained instances (drained first), push KV targets."""
        now = time.time()
        r = self.autoscaler.step(self.live(), now, drained=self.drained(),
                                 busy_models={m for _, m in self.busy} | set(self._scaling),
                                 gateway_load=self.gateway_load.current(now))
        for model, n in r.scale_up.items():
            if model not in self._scaling:
                log.info("autoscaler: %s load %.2f, adding %d instance(s)", model, r.loads.get(model, 0.0), n)
                task = asyncio.create_task(self.scale_up(ScaleRequest(model=model, reason="at_capacity", waiting=0)))
                self._scaling[model] = task
                task.add_done_callback(lambda _t, m=model: self._scaling.pop(m, None))
        for stop in r.stops:
            key = (stop.worker_id, stop.model)
            if key in self.busy or self._backing_off(stop.worker_id, stop.model, CommandKind.DEACTIVATE):
                continue
            self.busy.add(key)
            self._spawn(self.command(stop.worker_id, WorkerCommand(
                kind=CommandKind.DEACTIVATE, model=stop.model, instance_id=stop.instance_id, drain=True,
                reason=stop.reason), busy=self.busy))
        for t in r.kv_targets:
            key = (t.worker_id, t.model)
            if key in self.kv_busy or self._backing_off(t.worker_id, t.model, CommandKind.SET_KV_TARGET):
                continue
            self.kv_busy.add(key)
            self._spawn(self.command(t.worker_id, WorkerCommand(
                kind=CommandKind.SET_KV_TARGET, model=t.model, kv_free_blocks=t.free_blocks,
                reason="kv reservation"), busy=self.kv_busy))

    async def on_scale(self, msg) -> None:
        """A gateway needs an instance: one scale-up per model at a time, shared by every asker."""
        try:
            req = ScaleRequest.decode(msg.data)
        except ValueError as exc:
            await bus.reply(self.nc, msg, ScaleReply(ok=False, error=ErrorInfo(code="bad_request", message=brief(exc))))
            return
        with self.tracer.start_as_current_span("orchestrator.scale_up", context=extract_context(msg.headers),
                                               attributes={"warmserve.model": req.model,
                                                           "warmserve.reason": req.reason}) as span:
            task = self._scaling.get(req.model)
            if task is None:
                task = asyncio.create_task(self.scale_up(req))
                self._scaling[req.model] = task
                task.add_done_callback(lambda _t, m=req.model: self._scaling.pop(m, None))
            reply = await asyncio.shield(task)
            span.set_attribute("warmserve.outcome", reply.outcome.value if reply.outcome else "none")
        await bus.reply(self.nc, msg, reply)

    async def scale_up(self, req: ScaleRequest) -> ScaleReply:
        try:
            return await self._scale_up(req)
        except Exception as exc:  # every asker must hear back, never wait out its budget
            log.exception("scale-up of %s failed", req.model)
            return ScaleReply(ok=False, error=ErrorInfo(code="internal", message=f"scale-up failed: {brief(exc)}"))

    async def _scale_up(self, req: ScaleRequest) -> ScaleReply:
        started = time.monotonic()
        spec = self.catalog.items.get(req.model)
        if spec is None:
            return ScaleReply(ok=False, error=ErrorInfo(code="not_found", message=f"no model {req.model!r}"))
        live = self.live()
        if req.reason == "no_instance":  # someone else's scale-up may have landed meanwhile
            for w in live:
                c = w.copy_of(req.model)
                if c is not None and c.state is CopyState.ACTIVE:
                    return ScaleReply(ok=True, outcome=Outcome.WARM, worker_id=w.worker_id, instance_id=c.instance_id)
        # a worker busy with this model (a prewarm in flight) may still be the best choice
        choice = choose_worker(spec, live, busy={wid for wid, m in self.busy if m != req.model} | self.drained())
        if choice is None:
            return ScaleReply(ok=False, error=ErrorInfo(
                code="no_capacity", message=f"no worker can take another instance of {req.model} now"))
        key = (choice.worker_id, req.model)
        self.busy.add(key)
        try:
            cmd = WorkerCommand(kind=CommandKind.ACTIVATE, model=req.model, spec=spec,
                                reason=f"scale-up ({req.reason}, {req.waiting} waiting)")
            result = await bus.request(self.nc, WORKER_CMD.format(worker=choice.worker_id), cmd, CommandResult,
                                       timeout=self.settings.command_timeout_s)
        except bus.BusError as exc:
            return ScaleReply(ok=False, error=ErrorInfo(code=exc.code, message=str(exc)))
        finally:
            self.busy.discard(key)
        log.info("scale-up %s on %s: %s (%s, %.2f s)", req.model, choice.worker_id,
                 "ok" if result.ok else (result.error.message if result.error else "failed"),
                 choice.outcome.value, time.monotonic() - started)
        if not result.ok:
            return ScaleReply(ok=False, error=result.error)
        return ScaleReply(ok=True, outcome=choice.outcome, worker_id=choice.worker_id,
                          instance_id=result.instance_id, seconds=time.monotonic() - started)

    async def on_event(self, event: WorkerEvent, msg) -> None:
        """Worker events -> Postgres, acknowledged only once stored."""
        try:
            async with self.sessions() as session:
                await repo.record_event(session, event)
                await session.commit()
            await msg.ack()
        except IntegrityError:  # the model left the catalog since
            await msg.term()
        except Exception as exc:  # Postgres away: leave it unacked, JetStream redelivers
            log.warning("could not store event (%s); will retry", brief(exc))
            await msg.nak(delay=2.0)

    async def touch_workers(self) -> None:
        while True:
            try:
                async with self.sessions() as session:
                    for w in self.live():
                        await repo.touch_worker(session, w)
                    await session.commit()
            except Exception as exc:
                log.warning("could not record worker liveness: %s", brief(exc))
            await asyncio.sleep(10.0)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, "prewarm-orchestrator")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.workers = bus.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
        self.plan = bus.KvMirror(buckets[PLACEMENT_BUCKET.name], PlacementPlan).start()
        self.catalog = bus.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        self.operator = bus.KvMirror(buckets[OPERATOR_BUCKET.name], OperatorHold).start()
        engine = create_engine(s.database_url)
        self.sessions = sessionmaker(engine)
        loops = [asyncio.create_task(bus.consume(self.js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                             self.on_event)),
                 asyncio.create_task(self.touch_workers())]
        async def on_scale(msg) -> None:  # handle each in its own task: a scale-up takes seconds
            self._spawn(self.on_scale(msg))

        scale_sub = await self.nc.subscribe(SCALE.wildcard, queue="orchestrator", cb=on_scale)
        demand_sub = await self.js.subscribe(DEMAND.wildcard, ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.NEW, cb=self.on_demand)
        log.info("orchestrator up: reconciling every %.1f s", s.reconcile_interval_s)
        while not stop.is_set():
            if all(m.ready.is_set() for m in (self.workers, self.plan, self.catalog, self.operator)):
                try:
                    await self.reconcile_once()
                    await self.autoscale_once()
                except Exception as exc:
                    log.warning("reconcile round failed: %s", brief(exc))
            await pause(stop, s.reconcile_interval_s)
        await scale_sub.unsubscribe()
        await demand_sub.unsubscribe()
        for t in loops + list(self._tasks):
            t.cancel()
        await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
        for mirror in (self.workers, self.plan, self.catalog, self.operator):
            await mirror.stop()
        await engine.dispose()
        await bus.close(self.nc)


def main() -> None:
    settings = load_settings(OrchestratorSettings)
    run_service(Orchestrator(settings).run, "prewarm-orchestrator", settings)
