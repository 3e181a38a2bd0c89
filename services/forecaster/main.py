"""Forecaster process: consumes demand from JetStream, publishes a forecast per model and window."""

from __future__ import annotations

import asyncio
import logging
import time

from services.forecaster.windows import WindowBook
from shared import bus
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import DemandSample, Forecast, ModelSpec
from shared.policy.forecast import naive_forecast
from shared.service import brief, pause, run_service
from shared.settings import ForecasterSettings, load_settings
from shared.subjects import CATALOG_BUCKET, DEMAND, FORECAST

log = logging.getLogger("warmserve.forecaster")


class Forecaster:
    def __init__(self, settings: ForecasterSettings):
        self.settings = settings
        self.book = WindowBook(settings.window_s)

    async def on_demand(self, sample: DemandSample, msg) -> None:
        self.book.add(sample)
        await msg.ack()

    async def publish(self) -> None:
        now = time.time()
        closed = self.book.close(now)
        current = self.book.window_of(now)
        models = set(self.catalog.items) | set(self.book.history)
        forecasts = []
        for model in sorted(models):
            p = naive_forecast(list(self.book.history.get(model, ())))
            forecasts.append(Forecast(model=model, window_start_s=current, window_s=self.settings.window_s,
                                      predicted_avg=p.avg, predicted_peak=p.peak, predicted_peak_upper=p.peak_upper,
                                      method=p.method, made_at_s=now))
        for fc in forecasts:
            await bus.js_publish(self.js, FORECAST.format(model=fc.model), fc,
                                 msg_id=f"{fc.model}:{fc.window_start_s:.0f}:{fc.made_at_s:.3f}")
        try:
            async with self.sessions() as session:
                for fc in forecasts:
                    if fc.model in self.catalog.items:
                        await repo.record_forecast(session, fc)
                for model, obs in closed:
                    await repo.record_observed(session, model, obs.start_s, obs.avg, obs.peak)
                await session.commit()
        except Exception as exc:  # history is best effort; forecasts already went out on the bus
            log.warning("could not store forecasts: %s", brief(exc))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.nc = await bus.connect(s.nats_url, "forecaster")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_all(self.js)
        self.catalog = bus.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
        engine = create_engine(s.database_url)
        self.sessions = sessionmaker(engine)
        consumer = asyncio.create_task(
            bus.consume(self.js, DEMAND.wildcard, "forecaster", DemandSample, self.on_demand, batch=256))
        log.info("forecaster up: window %.0f s, refresh every %.0f s", s.window_s, s.publish_interval_s)
        while not stop.is_set():
            try:
                await self.publish()
            except Exception as exc:
                log.warning("forecast round failed: %s", brief(exc))
            await pause(stop, s.publish_interval_s)
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await self.catalog.stop()
        await engine.dispose()
        await bus.close(self.nc)


def main() -> None:
    settings = load_settings(ForecasterSettings)
    run_service(Forecaster(settings).run, "forecaster", settings)
