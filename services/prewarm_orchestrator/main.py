"""Orchestrator process: reconciles workers with the placement plan and persists their history."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.api import DeliverPolicy
from psycopg.errors import ForeignKeyViolation
from sqlalchemy.exc import IntegrityError

from services.prewarm_orchestrator.core import WORKER_LOST, Command, OrchestratorConfig, OrchestratorCore
from services.prewarm_orchestrator import metrics as orchestrator_metrics
from shared import bus, watch
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import (
    FENCED, CommandResult, DemandSample, ErrorInfo, Forecast, ModelSpec, OperatorHold, PlacementPlan, ScaleReply, ScaleRequest, WorkerCommand,
    WorkerEvent, WorkerState,
)
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.cluster import ClusterView
from shared.leader import Term, elected
from shared.service import brief, pause, run_service, seen_workers
from shared.settings import OrchestratorSettings, load_settings
from shared.tasks import cancel_and_wait
from shared.subjects import (
    CATALOG_BUCKET, DEMAND, FORECAST, OPERATOR_BUCKET, PLACEMENT_BUCKET, PLACEMENT_KEY, SCALE, WORKER_CMD, WORKER_EVENT, WORKERS_BUCKET,
)
from shared.telemetry import extract_context, tracer

log = logging.getLogger("warmserve.orchestrator")
NOT_LEADER = "not_leader"  # a command or scale-up refused here: this replica's term is suspended
LIVENESS_CHECK_S = 0.5  # how often a command's worker is checked while its answer is awaited
MAX_PLACEMENTS = 3  # a scale-up whose worker dies is placed again, at most this many times in all


class Orchestrator:
    """The shell: reads the cluster, plan and demand from NATS, asks the core, sends its commands."""

    def __init__(self, settings: OrchestratorSettings, term: Term | None = None):
        self.settings = settings
        self.term = term or Term("orchestrator", settings.replica_id, None)
        self.core = OrchestratorCore(OrchestratorConfig(
            autoscale=AutoscaleConfig(
                window_s=settings.autoscale_window_s, up=settings.scale_up_threshold,
                down=settings.scale_down_threshold, min_lifetime_s=settings.min_instance_lifetime_s,
                batch_capacity=settings.batch_capacity, min_instances=settings.min_active_per_model),
            kv_reservation=settings.kv_reservation, min_active=settings.min_active_per_model,
            forecast_scale_down=settings.forecast_scale_down, handover=settings.handover,
            handover_margin=settings.handover_margin, shared_tier=settings.shared_tier,
            shared_quiet=settings.shared_quiet, shared_max_instances=settings.shared_max_instances,
            idle_copy_policy=settings.idle_copy_policy, lost_hold_s=2 * settings.heartbeat_timeout_s))
        self._tasks: set[asyncio.Task] = set()
        self._scaling: dict[str, asyncio.Task] = {}  # model -> the scale-up every asker awaits
        self.tracer = tracer("warmserve.orchestrator")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def view(self) -> ClusterView:
        """Workers a command can reach: after a NATS restart, a worker is left alone until it is heard
        again (before that its command subscription may not be back, and a command would be lost)."""
        return ClusterView.from_workers(seen_workers(self.workers, self.settings.heartbeat_timeout_s, reachable=True))

    def drained(self) -> set[str]:
        return {h.target for h in self.operator.items.values() if h.kind == "drain"}

    async def round_once(self) -> None:
        """One round of the core: reconcile, autoscale, KV targets; commands run in their own tasks."""
        if not self.term.acting:  # suspended: the lease went unrenewed; another replica may be commanding
            return
        plan = self.plan.items.get(PLACEMENT_KEY)
        r = self.core.step(self.view(), plan.copies if plan else [], time.time(), drained=self.drained())
        for cmd in r.commands:
            self._spawn(self.command(cmd))
        for model, n in r.scale_up.items():
            if model not in self._scaling:
                log.info("autoscaler: %s load %.2f, adding %d instance(s)", model, r.loads.get(model, 0.0), n)
                req = ScaleRequest(model=model, reason="at_capacity", waiting=0)
                self._start_scale_up(req)  # the one gateways' asks share
                for _ in range(n - 1):  # the rest at the same time, each on devices of its own
                    self._spawn(self.scale_up(req))

    async def command(self, cmd: Command) -> CommandResult:
        """Send one of the core's commands and report how it ended (the core backs off failures). A command
        that got no answer ends as a failed result carrying the bus error."""
        msg = None
        try:
            if not self.term.acting:  # checked at the last moment: a command of a suspended term never leaves
                raise bus.BusError(NOT_LEADER, "this orchestrator replica does not hold the lease now")
            msg = WorkerCommand(kind=cmd.kind, model=cmd.model, spec=self.catalog.items.get(cmd.model),
                                reason=cmd.reason, instance_id=cmd.instance_id, drain=cmd.drain,
                                kv_free_blocks=cmd.kv_free_blocks, replace_active=cmd.replace_active,
                                share=cmd.share, epoch=self.term.epoch)
            result = await self._unless_lost(cmd.worker_id, bus.request(
                self.nc, WORKER_CMD.format(worker=cmd.worker_id), msg, CommandResult,
                timeout=self.settings.command_timeout_s, resend_on_reconnect=True))
        except Exception as exc:  # no answer, or one that does not decode: retried after the back-off
            code = exc.code if isinstance(exc, bus.BusError) else "bad_reply"
            result = CommandResult(command_id=msg.command_id if msg else "", ok=False,
                                   error=ErrorInfo(code=code, message=brief(exc)))
        if result.error is not None and result.error.code == FENCED:  # a later term leads: stop sending at once
            log.warning("%s refused a command: %s; this replica steps down", cmd.worker_id, result.error.message)
            self.term.ended.set()
            return result
        self.core.on_result(cmd, result.ok, time.time(), error_code=result.error.code if result.error else None)
        orchestrator_metrics.COMMANDS.labels(cmd.kind.value, "ok" if result.ok else result.error.code).inc()
        if not result.ok:
            orchestrator_metrics.RETRIES.labels(cmd.kind.value).inc()
        decided = orchestrator_metrics.decision(cmd.kind, cmd.reason, cmd.scale_up, cmd.replace_active)
        if decided and result.ok:
            outcome = cmd.outcome.value if cmd.outcome is not None else ""
            orchestrator_metrics.DECISIONS.labels(cmd.model, decided, outcome).inc()
        if result.ok:
            log.info("%s %s on %s: done (%s)", cmd.kind.value, cmd.model, cmd.worker_id, cmd.reason)
        else:
            log.warning("%s %s on %s failed: %s (retry in %.0f s)", cmd.kind.value, cmd.model, cmd.worker_id,
                        result.error.message if result.error else "", self.core.retry_in(cmd, time.time()))
        return result

    def _incarnation(self, worker_id: str) -> float | None:
        """The start time of the worker process live under ``worker_id`` (None: none is)."""
        return next((w.started_at_s for w in seen_workers(self.workers, self.settings.heartbeat_timeout_s)
                     if w.worker_id == worker_id), None)

    async def _unless_lost(self, worker_id: str, aw):
        """``aw`` (a command's answer), unless its worker dies first: its heartbeat goes stale (silence while
        the mirror could not see does not count, as everywhere) or another process heartbeats under its id (a
        restart). Then BusError('worker_lost') at once, instead of waiting out the command timeout."""
        task = asyncio.ensure_future(aw)
        incarnation = self._incarnation(worker_id)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=LIVENESS_CHECK_S)
                if done:
                    return task.result()
                current = self._incarnation(worker_id)
                if current is None or (incarnation is not None and current != incarnation):
                    raise bus.BusError(WORKER_LOST, f"worker {worker_id} "
                                       f"{'restarted' if current is not None else 'stopped heartbeating'} "
                                       "while the command was out")
        finally:
            await cancel_and_wait([task])

    async def on_demand(self, msg) -> None:
        """Gateways' per-second demand (in flight and queued): the autoscaler's view of waiting requests."""
        try:
            sample = DemandSample.decode(msg.data)
        except ValueError:
            return
        self.core.on_demand(sample.model, sample.gateway_id, sample.start_s + sample.interval_s,
                            sample.concurrency_avg)

    async def on_forecast(self, msg) -> None:
        """The forecaster's latest per model: scaling down keeps what the next window needs, and handover
        weighs what a giver's model will need."""
        try:
            self.core.on_forecast(Forecast.decode(msg.data))
        except ValueError as exc:
            log.warning("dropping malformed forecast: %s", brief(exc))

    def _start_scale_up(self, req: ScaleRequest) -> asyncio.Task:
        task = self._scaling.get(req.model)
        if task is None:
            task = asyncio.create_task(self.scale_up(req))
            self._scaling[req.model] = task
            task.add_done_callback(lambda _t, m=req.model: self._scaling.pop(m, None))
        return task

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
            reply = await asyncio.shield(self._start_scale_up(req))
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
        if not self.term.acting:
            return ScaleReply(ok=False, error=ErrorInfo(code=NOT_LEADER, message="the orchestrator that got this "
                                                        "request does not hold the lease now; ask again"))
        spec = self.catalog.items.get(req.model)
        if spec is None:
            return ScaleReply(ok=False, error=ErrorInfo(code="not_found", message=f"no model {req.model!r}"))
        for _ in range(MAX_PLACEMENTS):  # again elsewhere when the chosen worker dies during the activation
            answer = self.core.scale_up(self.view(), req.model, spec.tensor_parallel_size, spec.parameter_bytes,
                                        time.time(), reason=req.reason, waiting=req.waiting, drained=self.drained())
            if answer.command is None:
                if answer.error_code:
                    return ScaleReply(ok=False, error=ErrorInfo(code=answer.error_code, message=answer.error))
                return ScaleReply(ok=True, outcome=answer.outcome, worker_id=answer.worker_id,
                                  instance_id=answer.instance_id)
            result = await self.command(answer.command)
            log.info("scale-up %s on %s: %s (%s, %.2f s)", req.model, answer.worker_id,
                     "ok" if result.ok else (result.error.message if result.error else "failed"),
                     answer.outcome.value, time.monotonic() - started)
            if result.ok:
                return ScaleReply(ok=True, outcome=answer.outcome, worker_id=answer.worker_id,
                                  instance_id=result.instance_id, seconds=time.monotonic() - started)
            if not result.error or result.error.code != WORKER_LOST:
                break
        return ScaleReply(ok=False, error=result.error)

    async def on_event(self, event: WorkerEvent, msg) -> None:
        """Worker events -> Postgres, acknowledged only once stored. A failure is raised to ``bus.consume``,
        which retries it (Postgres away) or moves the event to the dead-letter stream (it cannot be stored)."""
        try:
            async with self.sessions() as session:
                await repo.record_event(session, event)
                await session.commit()
        except IntegrityError as exc:
            if not isinstance(exc.orig, ForeignKeyViolation):
                raise
            log.info("dropping an event of %s: the model left the catalog since", event.model)
            await msg.term()  # its history went with it (on delete cascade)
            return
        await msg.ack()

    async def touch_workers(self) -> None:
        while True:
            try:
                async with self.sessions() as session:
                    for w in seen_workers(self.workers, self.settings.heartbeat_timeout_s):
                        # last seen on this reader's clock (the worker's own may be off)
                        seen = self.workers.seen_at.get(w.worker_id, w.heartbeat_at_s)
                        await repo.touch_worker(session, w.model_copy(update={"heartbeat_at_s": seen}))
                    await session.commit()
            except Exception as exc:
                log.warning("could not record worker liveness: %s", brief(exc))
            await asyncio.sleep(10.0)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, "prewarm-orchestrator")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.workers = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
        self.plan = watch.KvMirror(buckets[PLACEMENT_BUCKET.name], PlacementPlan).start()
        self.catalog = watch.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        self.operator = watch.KvMirror(buckets[OPERATOR_BUCKET.name], OperatorHold).start()
        engine = create_engine(s.database_url)
        self.sessions = sessionmaker(engine)
        loops = [asyncio.create_task(bus.consume(self.js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                             self.on_event)),
                 asyncio.create_task(self.touch_workers())]
        async def on_scale(msg) -> None:  # handle each in its own task: a scale-up takes seconds
            self._spawn(self.on_scale(msg))

        scale_sub = await self.nc.subscribe(SCALE.wildcard, queue="orchestrator", cb=on_scale)
        demand_sub = await watch.follow(self.js, DEMAND.wildcard, self.on_demand, DeliverPolicy.NEW)
        forecast_sub = await watch.follow(self.js, FORECAST.wildcard, self.on_forecast, DeliverPolicy.LAST_PER_SUBJECT)
        log.info("orchestrator up: reconciling every %.1f s", s.reconcile_interval_s)
        while not stop.is_set():
            if all(m.ready.is_set() for m in (self.workers, self.plan, self.catalog, self.operator)):
                try:
                    await self.round_once()
                except Exception as exc:
                    log.warning("reconcile round failed: %s", brief(exc))
            await pause(stop, s.reconcile_interval_s)
        await scale_sub.unsubscribe()
        await demand_sub.stop()
        await forecast_sub.stop()
        stuck = await cancel_and_wait(loops + list(self._tasks))
        if stuck:
            log.warning("%d task(s) did not stop on cancellation: %s", len(stuck), [t.get_name() for t in stuck])
        for mirror in (self.workers, self.plan, self.catalog, self.operator):
            await mirror.stop()
        await engine.dispose()
        await bus.close(self.nc)


def main() -> None:
    settings = load_settings(OrchestratorSettings)
    run_service(elected("orchestrator", settings, lambda term: Orchestrator(settings, term).run),
                "prewarm-orchestrator", settings)
