"""Per-model arrivals and concurrency, published to JetStream about once a second.

While NATS is unreachable the samples wait in a bounded buffer and are published, oldest first and with
their own timestamps (and message ids, so one that did reach the stream is stored once), as soon as the
connection is back; the forecaster keeps windows open across its own outage for them (``ForecastCore.due``).
Past the bound the oldest samples are dropped and counted (``on_drop``): demand is then undercounted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict

from nats.js import JetStreamContext

from shared import bus
from shared.messages import DemandSample
from shared.policy.concurrency import ConcurrencyTracker
from shared.subjects import DEMAND

log = logging.getLogger(__name__)


FLUSH_CHUNK = 256  # samples published at once while catching up after an outage


class DemandPublisher:
    def __init__(self, gateway_id: str, interval_s: float, clock=time.time, *, buffer_max: int = 36_000,
                 on_drop: Callable[[int], None] | None = None):
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self._clock = clock
        self._trackers: dict[str, ConcurrencyTracker] = {}
        self.buffer_max = buffer_max
        self.pending: deque[DemandSample] = deque()  # not yet stored in the stream, oldest first
        self.dropped = 0
        self._on_drop = on_drop
        self._failing = False  # the last publish failed (logged once per outage)
        self._dropping = False  # the buffer overflowed in this outage (logged once)

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

    def buffer(self, samples: list[DemandSample]) -> None:
        """Queue samples for publishing; beyond ``buffer_max`` the oldest are dropped (and counted)."""
        self.pending.extend(samples)
        over = len(self.pending) - self.buffer_max
        if over > 0:
            for _ in range(over):
                self.pending.popleft()
            self.dropped += over
            if self._on_drop is not None:
                self._on_drop(over)
            if not self._dropping:  # once per outage
                log.warning("demand buffer full (%d samples, WARMSERVE_DEMAND_BUFFER_SAMPLES): dropping the "
                            "oldest; forecasts will undercount the demand of this outage", self.buffer_max)
            self._dropping = True

    async def flush(self, js: JetStreamContext) -> bool:
        """Publish what is pending, oldest first, a chunk at a time; stop at the first chunk with a failure
        (its failed samples stay first in line). True once nothing is pending."""
        while self.pending:
            chunk = [self.pending.popleft() for _ in range(min(FLUSH_CHUNK, len(self.pending)))]
            results = await asyncio.gather(*(self._publish(js, s) for s in chunk), return_exceptions=True)
            failed = [s for s, r in zip(chunk, results) if isinstance(r, BaseException)]
            if failed:
                self.pending.extendleft(reversed(failed))
                if not self._failing:
                    log.warning("demand publish failed (%s); %d samples kept until NATS takes them",
                                next(r for r in results if isinstance(r, BaseException)), len(self.pending))
                self._failing = True
                return False
        if self._failing:
            log.info("demand samples buffered during the outage are published (%d dropped in all)", self.dropped)
        self._failing = self._dropping = False
        return True

    async def _publish(self, js: JetStreamContext, sample: DemandSample) -> None:
        await bus.js_publish(js, DEMAND.format(model=sample.model), sample,
                             msg_id=f"{self.gateway_id}:{sample.model}:{sample.start_s:.3f}")

    async def run(self, js: JetStreamContext, connected: Callable[[], bool] = lambda: True) -> None:
        """Every interval: close the samples and publish what is pending, unless ``connected()`` says NATS
        is away (then they wait, and no publish stalls the loop for its timeout)."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.buffer(self.samples())
            if self.pending and connected():
                await self.flush(js)
