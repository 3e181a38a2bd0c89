"""Per-model arrivals and concurrency, published to JetStream about once a second."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

from nats.js import JetStreamContext

from shared import bus
from shared.messages import DemandSample
from shared.policy.concurrency import ConcurrencyTracker
from shared.subjects import DEMAND

log = logging.getLogger(__name__)


class DemandPublisher:
    def __init__(self, gateway_id: str, interval_s: float, clock=time.time):
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self._clock = clock
        self._trackers: dict[str, ConcurrencyTracker] = {}

    def _tracker(self, model: str) -> ConcurrencyTracker:
        t = self._trackers.get(model)
        if t is None:
            t = self._trackers[model] = ConcurrencyTracker(self._clock())
        return t

    def arrive(self, model: str) -> None:
        self._tracker(model).arrive(self._clock())

    def complete(self, model: str) -> None:
        self._tracker(model).complete(self._clock())

    def in_flight(self, model: str) -> int:
        t = self._trackers.get(model)
        return t.in_flight if t else 0

    def samples(self) -> list[DemandSample]:
        """Close the interval for every model that saw traffic; idle trackers are dropped."""
        now = self._clock()
        out = []
        for model, t in list(self._trackers.items()):
            if t.idle:
                del self._trackers[model]
                continue
            out.append(DemandSample(gateway_id=self.gateway_id, model=model, **asdict(t.roll(now))))
        return out

    async def run(self, js: JetStreamContext) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            for sample in self.samples():
                try:
                    await bus.js_publish(js, DEMAND.format(model=sample.model), sample,
                                         msg_id=f"{self.gateway_id}:{sample.model}:{sample.start_s:.3f}")
                except Exception as exc:  # a lost sample only blurs the forecast
                    log.warning("demand publish failed for %s: %s", sample.model, exc)
