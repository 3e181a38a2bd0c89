"""Forecaster process: per-model concurrency windows from gateways' demand, forecasts at every boundary.

State and recovery: closed windows are stored in Postgres (``observed_load``); at start the forecaster
loads them, replays its per-model forecasters over them (a short rolling backtest so method selection
survives a restart) and recreates its durable JetStream consumer at the end of the last stored window.
Samples for windows already stored are dropped as late, so a restart loses nothing and counts nothing
twice. Postgres writes that fail wait in an outbox and are retried; every write is an idempotent upsert.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from services.forecaster.admin import ForecasterAdmin
from services.forecaster.core import ForecastCore, ForecastRoundConfig
from services.forecaster.outbox import Outbox
from services.forecaster import metrics as forecaster_metrics
from shared import bus, watch
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import DemandSample, Forecast, ModelSpec
from shared.policy.forecast import ForecastConfig, WindowObservation
from shared.leader import Term, elected
from shared.service import brief, pause, run_service
from shared.settings import ForecasterSettings, load_settings
from shared.subjects import CATALOG_BUCKET, DEMAND, FORECAST, FORECAST_ADMIN

log = logging.getLogger("warmserve.forecaster")

def forecast_config(s: ForecasterSettings) -> ForecastConfig:
    methods = tuple(m.strip() for m in s.forecast_methods.split(",") if m.strip())
    return ForecastConfig.for_window(s.window_s, horizon=s.horizon_windows, upper_quantile=s.upper_quantile,
                                     min_history=s.min_history_windows, score_windows=s.score_windows,
                                     methods=methods)


class Forecaster:
    """The shell: demand from JetStream into the core, its rounds' forecasts to NATS and history to Postgres."""

    def __init__(self, settings: ForecasterSettings, term: Term | None = None):
        self.settings = settings
        self.term = term  # this replica's term as the forecaster leader (None: no election)
        self.config = forecast_config(settings)
        self.core = ForecastCore(ForecastRoundConfig(
            forecast=self.config, window_s=settings.window_s, close_grace_s=settings.close_grace_s,
            retry_interval_s=settings.retry_interval_s, startup_backtest_windows=settings.startup_backtest_windows,
            outage_grace_s=settings.outage_grace_s))
        self.outbox = Outbox.empty()
        self.band = forecaster_metrics.BandMeter()  # the forecast for each next window, scored when it closes
        self.caught_up = asyncio.Event()
        self.busy = asyncio.Lock()  # rounds, imports and reloads take turns with the forecasters
        self.rounds = {"count": 0, "last_s": None, "first_s": None, "last_at_s": None}
        self.admin = ForecasterAdmin(self)

    # ---- demand in -------------------------------------------------------------------------------

    async def on_demand(self, sample: DemandSample, msg: Msg) -> None:
        self.core.add(sample)
        await msg.ack()

    # ---- history ---------------------------------------------------------------------------------

    async def load_history(self, stop: asyncio.Event) -> dict[str, list[WindowObservation]]:
        """Stored windows of the last ``fit_windows``; waits for Postgres (forecasts need history)."""
        since = time.time() - self.config.fit_windows * self.settings.window_s
        attempt = 0
        while not stop.is_set():
            try:
                async with self.sessions() as session:
                    return await repo.observed_history(session, since)
            except Exception as exc:
                attempt += 1
                log.warning("cannot load forecast history from Postgres (%s); retrying (attempt %d)", brief(exc), attempt)
                await pause(stop, min(30.0, 2.0 * attempt))
        return {}

    # ---- the round at every window boundary --------------------------------------------------------

    def blind(self) -> list[tuple[float, float]]:
        """When this forecaster could not see the bus (its catalog mirror's outages): the gateways' samples
        of those intervals arrive late, so rounds wait for them (``ForecastCore.due``)."""
        return self.catalog.blind()

    async def round(self, now: float) -> None:
        async with self.busy:
            await self._round(now)

    async def _round(self, now: float) -> None:
        started = time.perf_counter()
        models = sorted(self.catalog.items)
        closed = self.core.close_windows(now, models)
        for model, obs in closed:
            self.outbox.observations[model].append(obs)
            self.band.observed(model, obs)
        await self.publish(await asyncio.to_thread(self.core.forecast, models, now))
        elapsed = time.perf_counter() - started
        forecaster_metrics.ROUND_SECONDS.observe(elapsed)
        self.rounds.update(count=self.rounds["count"] + 1, last_s=round(elapsed, 3), last_at_s=now)
        if self.rounds["first_s"] is None:
            self.rounds["first_s"] = round(elapsed, 3)
        log.info("forecast round: %d models, %d windows closed, %.2f s", len(models), len(closed), elapsed)
        await self.flush()

    async def publish(self, forecasts: list[Forecast]) -> None:
        if self.term is not None and not self.term.acting:  # suspended: they are stored, the next round publishes
            self.outbox.forecasts.extend(forecasts)
            self.outbox.bound()
            return
        for fc in forecasts:
            self.band.forecast(fc)
            try:
                await bus.js_publish(self.js, FORECAST.format(model=fc.model), fc,
                                     msg_id=f"{fc.model}:{fc.window_start_s:.0f}:{fc.made_at_s:.3f}")
            except Exception as exc:  # placement keeps the last forecast; the next round republishes
                log.warning("could not publish the forecast for %s: %s", fc.model, brief(exc))
        self.outbox.forecasts.extend(forecasts)
        self.outbox.bound()

    async def flush(self) -> None:
        """Write pending history; on failure everything stays queued (writes are idempotent upserts)."""
        if not len(self.outbox):
            return
        try:
            async with self.sessions() as session:
                # only models Postgres knows: one removed model must not block everyone's history
                known = set(await repo.model_slugs(session))
                for model, rows in self.outbox.observations.items():
                    if model not in known:
                        continue
                    await repo.record_observations(session, model, self.settings.window_s, rows)
                    for o in rows:
                        await repo.record_observed(session, model, o.start_s, o.avg, o.peak)
                for fc in self.outbox.forecasts:
                    if fc.model in known:
                        await repo.record_forecast(session, fc)
                await session.commit()
        except Exception as exc:
            log.warning("could not store forecast history (%s); %d rows queued, retrying", brief(exc), len(self.outbox))
            return
        if self.outbox.dropped:
            log.warning("%d forecasts were dropped while Postgres was away (the outbox is bounded)", self.outbox.dropped)
        self.outbox = Outbox.empty()

    async def first_forecasts(self) -> None:
        """Models new to the catalog get a forecast (the recent level, i.e. none yet) without waiting."""
        new = self.core.new_models(self.catalog.items)
        if new:
            async with self.busy:
                await self.publish(await asyncio.to_thread(self.core.forecast, new, time.time()))

    # ---- main loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, "forecaster")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.catalog = watch.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        engine = create_engine(s.database_url)
        self.sessions = sessionmaker(engine)
        await self.catalog.ready.wait()
        history = await self.load_history(stop)
        started = time.perf_counter()
        await asyncio.to_thread(self.core.rebuild, history)
        log.info("history: %d models, %d windows; rebuilt in %.1f s", len(history),
                 sum(len(v) for v in history.values()), time.perf_counter() - started)
        resume = min(self.core.book.next_start.values(), default=self.core.book.window_of(time.time()))
        consumer = asyncio.create_task(bus.consume(
            self.js, DEMAND.wildcard, "forecaster", DemandSample, self.on_demand, batch=512,
            max_ack_pending=100_000, start_s=resume - 5.0, caught_up=self.caught_up))
        admin = await self.nc.subscribe(FORECAST_ADMIN.wildcard, queue="forecaster", cb=self.admin.on_admin)
        log.info("forecaster up: window %.0f s, horizon %d, methods %s; replaying demand since %s",
                 s.window_s, self.config.horizon, ",".join(self.config.methods),
                 time.strftime("%H:%M:%S", time.gmtime(resume)))
        while not stop.is_set() and not self.caught_up.is_set():
            await pause(stop, 0.2)
        while not stop.is_set():  # the first round (windows closed while we were away), then one per boundary
            if self.term is not None and not self.term.acting:  # suspended: close nothing, publish nothing
                await pause(stop, 0.2)  # until the lease is back (the windows close then) or the term ends
                continue
            try:
                if self.core.due(time.time(), self.blind()):
                    await self.round(time.time())
                else:
                    await self.first_forecasts()
                    await self.flush()
            except Exception as exc:  # a round that keeps failing is retried, never in a tight loop
                log.warning("forecast round failed: %s", brief(exc))
                await pause(stop, 1.0)
            await pause(stop, max(0.0, self.core.wake_at(time.time(), self.blind()) - time.time()))
        await admin.unsubscribe()
        consumer.cancel()
        await asyncio.wait([consumer], timeout=3)
        await self.flush()
        await self.catalog.stop()
        await engine.dispose()
        await bus.close(self.nc)


def main() -> None:
    settings = load_settings(ForecasterSettings)
    run_service(elected("forecaster", settings, lambda term: Forecaster(settings, term).run), "forecaster", settings)
