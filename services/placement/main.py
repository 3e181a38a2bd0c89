"""Placement process: keeps the catalog in KV, turns forecasts and cluster state into a plan."""

from __future__ import annotations

import asyncio
import logging
import time

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.placement.admin import Admin
from services.placement.core import PlacementCore, PlacementCoreConfig
from services.placement import metrics as placement_metrics
from shared import bus, metrics, watch
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import ApiKeyRecord, Forecast, ModelSpec, OperatorHold, PlacementPlan, WorkerState
from shared.policy.cluster import ClusterView
from shared.policy.prewarm_placement import PlacementConfig
from shared.leader import Term, elected
from shared.service import brief, run_service, seen_workers
from shared.settings import PlacementSettings, load_settings
from shared.subjects import (
    ADMIN, APIKEYS_BUCKET, CATALOG_BUCKET, FORECAST, OPERATOR_BUCKET, PLACEMENT_BUCKET, PLACEMENT_KEY, PLACEMENT_PLAN, WORKERS_BUCKET,
)

log = logging.getLogger("warmserve.placement")


class Placement:
    def __init__(self, settings: PlacementSettings, term: Term | None = None):
        self.settings = settings
        self.term = term or Term("placement", settings.replica_id, None)
        self.plan_revision = 0  # the plan key's revision as this leader last wrote or read it
        self.forecasts: dict[str, Forecast] = {}
        self.core = PlacementCore(PlacementCoreConfig(
            placement=PlacementConfig(batch_capacity=settings.batch_capacity, h2d_bytes_per_s=settings.h2d_gbps * 1e9,
                                      strategy=settings.placement_strategy, evict=settings.evict),
            kv_reservation=settings.kv_reservation, prewarm=settings.prewarm, idle_first=settings.idle_first,
            forecast_freed_first=settings.forecast_freed_first, copy_start_s=settings.copy_start_s,
            copy_load_bytes_per_s=settings.copy_load_gbps * 1e9))
        self.changed = asyncio.Event()
        self.admin = Admin(self)
        self.skipped: dict[str, dict[str, str]] = {}  # table -> rows the last sync could not publish, and why

    async def sync_catalog(self) -> None:
        """Postgres -> catalog KV (Postgres is the system of record). A row that is not a valid entry is
        skipped (its last good entry, if any, stays) and the others sync."""
        async with self.sessions() as session:
            specs, bad = await repo.catalog_entries(session)
        self._skipped("models", bad)
        for slug, spec in specs.items():
            if self.catalog.items.get(slug) != spec:
                await self.catalog_kv.put(slug, spec.encode())
        for slug in set(self.catalog.items) - set(specs) - set(bad):
            await self.catalog_kv.delete(slug)
        self.changed.set()

    async def sync_keys(self) -> None:
        """API keys Postgres -> KV, keyed by hash: the gateway checks keys without the database. A row that is
        not a valid key is skipped and the others sync; its last published record is deleted like any key not
        in the table, so a key whose row went bad (say, disabled while its hash was overwritten) fails closed
        rather than authenticating as it last did."""
        async with self.sessions() as session:
            rows, bad = await repo.key_records(session)
        self._skipped("api_keys", bad)
        for key_hash, record in rows.items():
            if self.keys.items.get(key_hash) != record:
                await self.keys_kv.put(key_hash, record.encode())
        for key_hash in set(self.keys.items) - set(rows):
            await self.keys_kv.delete(key_hash)

    def _skipped(self, table: str, bad: dict[str, str]) -> None:
        """Log the rows of ``table`` a sync skips: each once, not every round."""
        seen = self.skipped.get(table, {})
        for name, why in bad.items():
            if seen.get(name) != why:
                log.error("%s row %r is not published to the gateways and skipped until fixed: %s", table, name, why)
        self.skipped[table] = bad
        metrics.SKIPPED_ROWS.labels(table).set(len(bad))

    @property
    def current(self) -> PlacementPlan | None:  # the plan in force (published)
        return self.core.current

    @property
    def latest(self) -> PlacementPlan | None:  # the newest computed, for `placement show`
        return self.core.latest

    def prune_forecasts(self, now_s: float) -> None:
        """Forget the forecasts of models no longer in the catalog (removed, or renamed), once a window old:
        younger ones may belong to a model whose catalog entry this mirror has not seen yet."""
        for slug, fc in list(self.forecasts.items()):
            if slug not in self.catalog.items and now_s - fc.made_at_s > fc.window_s:
                del self.forecasts[slug]

    async def replan(self) -> None:
        if not self.term.acting:  # suspended: the lease went unrenewed; another replica may be planning
            return
        self.prune_forecasts(time.time())
        view = ClusterView.from_workers(
            seen_workers(self.workers, self.settings.heartbeat_timeout_s))
        with placement_metrics.ROUND_SECONDS.time():
            plan = self.core.plan(view, self.catalog.items, self.forecasts, list(self.operator.items.values()),
                                  time.time())
        if not self.core.changed(plan):
            placement_metrics.ROUNDS.labels("unchanged").inc()
            return
        plan = plan.model_copy(update={"epoch": self.term.epoch})
        if not await self.write_plan(plan):
            placement_metrics.ROUNDS.labels("not_written").inc()
            return
        await bus.js_publish(self.js, PLACEMENT_PLAN.pattern, plan, msg_id=plan.plan_id)
        placement_metrics.published(plan, self.current)
        self.core.adopt(plan)
        log.info("new plan %s: %s%s", plan.plan_id[:8],
                 ", ".join(f"{c.model}@{c.worker_id}" for c in plan.copies) or "nothing",
                 f" (skipped: {plan.inputs['skipped']})" if plan.inputs.get("skipped") else "")

    async def write_plan(self, plan: PlacementPlan) -> bool:
        """Make ``plan`` the one in force. A leader writes only over the revision it knows (compare and set):
        a plan a later term wrote makes this one step down, unwritten (False), so a deposed leader that has not
        noticed yet cannot overwrite its successor's plan. Without an election, a plain put."""
        if self.term.epoch is None:
            await self.plan_kv.put(PLACEMENT_KEY, plan.encode())
            return True
        for _ in range(2):
            try:
                self.plan_revision = await self.plan_kv.update(PLACEMENT_KEY, plan.encode(), last=self.plan_revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                revision, current = await self.read_plan()
                if current is not None and not self.term.check(current.epoch):
                    log.warning("plan %s is from a later placement term (%s > %s): this replica was deposed",
                                current.plan_id[:8], current.epoch, self.term.epoch)
                    self.term.ended.set()
                    return False
                self.plan_revision = revision  # an earlier term's plan, written late: replace it
        return False

    async def read_plan(self) -> tuple[int, PlacementPlan | None]:
        """The plan key's revision (0: never written) and plan (None: none or unreadable)."""
        try:
            entry = await self.plan_kv.get(PLACEMENT_KEY)
        except nats.js.errors.KeyNotFoundError as exc:
            entry = getattr(exc, "entry", None)
            return (entry.revision if entry is not None else 0), None
        try:
            return entry.revision, PlacementPlan.decode(entry.value) if entry.value else None
        except ValueError:
            return entry.revision, None

    async def history_start(self) -> float | None:
        """Where plan history resumes: the newest stored plan (now, for an empty history). Postgres away:
        wherever the durable consumer stopped."""
        try:
            async with self.sessions() as session:
                newest = await repo.newest_plan_at(session)
            return newest if newest is not None else time.time()
        except Exception as exc:
            log.warning("plan history: Postgres unavailable at start (%s); resuming the stream consumer", brief(exc))
            return None

    async def store_plan(self, plan: PlacementPlan, msg: Msg) -> None:
        """Plan history from the durable plan stream, acknowledged only once in Postgres: a plan made while
        Postgres is away (or before a restart) lands later, once (plan ids are unique). A failure is raised to
        ``bus.consume``, which retries it or moves a plan that cannot be stored to the dead-letter stream."""
        async with self.sessions() as session:
            await repo.record_plan(session, plan)
            await session.commit()
        await msg.ack()

    async def on_forecast(self, msg: Msg) -> None:
        try:
            fc = Forecast.decode(msg.data)
        except ValueError as exc:
            log.warning("dropping malformed forecast: %s", brief(exc))
            return
        old = self.forecasts.get(fc.model)
        self.forecasts[fc.model] = fc
        if old is None or (old.predicted_peak_upper, old.points) != (fc.predicted_peak_upper, fc.points):
            self.changed.set()

    async def on_admin(self, msg: Msg) -> None:
        await self.admin.dispatcher.on_message(self.nc, msg)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, "placement")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.catalog_kv = buckets[CATALOG_BUCKET.name]
        self.plan_kv = buckets[PLACEMENT_BUCKET.name]
        self.catalog = watch.KvMirror(self.catalog_kv, ModelSpec, on_change=self.changed.set).start()
        self.workers = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState, on_change=self.changed.set).start()
        self.keys_kv = buckets[APIKEYS_BUCKET.name]
        self.keys = watch.KvMirror(self.keys_kv, ApiKeyRecord).start()
        self.operator_kv = buckets[OPERATOR_BUCKET.name]
        self.operator = watch.KvMirror(self.operator_kv, OperatorHold, on_change=self.changed.set).start()
        await self.catalog.ready.wait()
        await self.workers.ready.wait()
        await self.keys.ready.wait()
        await self.operator.ready.wait()
        try:  # the plan in force survives a restart (and a takeover): an unchanged replan writes no history
            self.plan_revision, current = await self.read_plan()
            self.core.adopt(current)
        except Exception as exc:
            log.info("no current plan in KV (%s)", brief(exc))
        engine = create_engine(s.database_url)
        self.sessions = sessionmaker(engine)
        forecasts = await watch.follow(self.js, FORECAST.wildcard, self.on_forecast, DeliverPolicy.LAST_PER_SUBJECT)
        subs = [await self.nc.subscribe(ADMIN.wildcard, queue="placement", cb=self.on_admin)]
        history = asyncio.create_task(bus.consume(self.js, PLACEMENT_PLAN.pattern, "placement-history", PlacementPlan,
                                                  self.store_plan, start_s=await self.history_start()))
        log.info("placement up")
        last_sync = float("-inf")
        while not stop.is_set():
            if time.monotonic() - last_sync >= s.catalog_sync_interval_s:
                synced = True
                for what, sync in (("catalog", self.sync_catalog), ("API key", self.sync_keys)):
                    try:  # each on its own: a failing catalog sync does not hold back the keys
                        await sync()
                    except Exception as exc:  # Postgres away or not migrated: keep serving the KV copies
                        synced = False
                        log.warning("%s sync from Postgres failed (%s); is it up and migrated "
                                    "(warmserve migrate)?", what, brief(exc))
                if synced:
                    last_sync = time.monotonic()
            self.changed.clear()  # before replanning: a change during the round triggers the next one
            try:
                await self.replan()
            except Exception as exc:
                log.warning("placement round failed: %s", brief(exc))
            try:
                await asyncio.wait_for(self._wake(stop), s.replan_interval_s)
            except asyncio.TimeoutError:
                pass
        history.cancel()
        await asyncio.gather(history, return_exceptions=True)  # a plan being stored finishes first
        for sub in subs:
            await sub.unsubscribe()
        await forecasts.stop()
        await self.workers.stop()
        await self.catalog.stop()
        await self.keys.stop()
        await self.operator.stop()
        await engine.dispose()
        await bus.close(self.nc)

    async def _wake(self, stop: asyncio.Event) -> None:
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self.changed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.1)  # coalesce bursts of changes (every heartbeat is one)
        finally:
            for t in waits:
                t.cancel()


def main() -> None:
    settings = load_settings(PlacementSettings)
    run_service(elected("placement", settings, lambda term: Placement(settings, term).run), "placement", settings)
