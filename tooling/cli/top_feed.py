"""What ``warmserve top`` reads, kept current in the background: the workers KV bucket (``KvMirror``), the
last minute of demand samples and each model's latest forecast (JetStream followers), and the gateway's
queue gauge (its /metrics). NATS is the source of truth for everything it can give, so the view works
against any cluster the CLI reaches; the gateway adds only the queued requests, and is optional.

Nothing here raises into the screen: an unreachable NATS or gateway becomes a line in ``Snapshot.errors``
and is retried, while the last data seen stays on screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timezone

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared import bus, watch
from shared.messages import DemandSample, Forecast, WorkerState
from shared.subjects import DEMAND, FORECAST, WORKERS_BUCKET
from shared.tasks import cancel_and_wait
from tooling.cli.top_screen import RATE_WINDOW_S, Snapshot

RETRY_S = 2.0
QUEUED_GAUGE = "warmserve:num_requests_waiting"  # the gateway's requests waiting for an instance


def parse_queued(text: str) -> dict[str, float]:
    """Requests waiting per model from a gateway's Prometheus exposition.
    (In-flight requests are read from the workers, which every gateway's requests reach.)"""
    from prometheus_client.parser import text_string_to_metric_families

    queued: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != QUEUED_GAUGE:
            continue
        for sample in family.samples:
            model = sample.labels.get("model")
            if model:
                queued[model] = queued.get(model, 0.0) + sample.value
    return queued


def since(back_s: float) -> ConsumerConfig:
    """A consumer that starts ``back_s`` ago (the last minute of demand), made again on each renewal; the feed
    keys samples by gateway, model and start, so what is read twice counts once."""
    start = datetime.fromtimestamp(time.time() - back_s, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)


class Feed:
    """The reader: ``run()`` forever in the background, ``snapshot()`` whenever the screen wants one."""

    def __init__(self, nats_url: str, gateway_url: str | None, cluster: str, clock=time.time):
        self.nats_url, self.gateway_url, self.cluster, self.clock = nats_url, gateway_url, cluster, clock
        self.nats_error: str | None = "connecting to NATS ..."
        self.gateway_error: str | None = None
        self.mirror: watch.KvMirror | None = None
        self.demand: dict[tuple[str, str, float], DemandSample] = {}
        self.forecasts: dict[str, Forecast] = {}
        self.queued: dict[str, float] | None = None
        self.refreshed_at: float | None = None
        self._nc = None

    def snapshot(self) -> Snapshot:
        now = self.clock()
        horizon = now - RATE_WINDOW_S - 5.0
        self.demand = {k: s for k, s in self.demand.items() if s.start_s + s.interval_s > horizon}
        workers, ages = {}, {}
        if self.mirror is not None:
            workers = dict(self.mirror.items)
            ages = {k: max(0.0, now - t) for k, t in self.mirror.seen_at.items()}
        return Snapshot(cluster=self.cluster, now=now, workers=workers, heartbeat_age_s=ages,
                        demand=list(self.demand.values()), forecasts=dict(self.forecasts), queued=self.queued,
                        refreshed_at=self.refreshed_at,
                        errors=tuple(e for e in (self.nats_error, self.gateway_error) if e))

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._nats())]
        if self.gateway_url:
            tasks.append(asyncio.create_task(self._gateway()))
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks, timeout_s=3.0)

    # ---- NATS ------------------------------------------------------------------------------------

    async def _nats(self) -> None:
        """Connect (retrying, with the reason on screen), then watch; a lost connection is reconnected by the
        client and the mirror and followers resume on their own, so this only reports it."""
        while True:
            try:
                self._nc = await bus.connect(self.nats_url, "warmserve-top", deadline_s=5)
            except Exception as exc:  # BusError: unreachable, refused credentials, TLS
                self.nats_error = f"NATS unreachable, retrying every {RETRY_S:g} s: {exc}"
                await asyncio.sleep(RETRY_S)
                continue
            readers = []
            try:
                js = self._nc.jetstream()
                kv = await js.key_value(WORKERS_BUCKET.name)
                self.mirror = watch.KvMirror(kv, WorkerState).start()
                readers = [self.mirror,
                           await watch.Follower(js, DEMAND.wildcard, self._on_demand, DeliverPolicy.BY_START_TIME,
                                                config=lambda: since(RATE_WINDOW_S + 5.0)).start(),
                           await watch.follow(js, FORECAST.wildcard, self._on_forecast, DeliverPolicy.LAST_PER_SUBJECT)]
                while True:
                    connected = self._nc.is_connected and self.mirror.ready.is_set()
                    self.nats_error = None if connected else (
                        f"NATS connection to {self.cluster} lost; reconnecting (showing the last data seen)"
                        if self.mirror.ready.is_set() else "reading the workers bucket ...")
                    if connected:
                        self.refreshed_at = self.clock()
                    await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no bucket yet (a cluster starting), JetStream away: start over
                self.nats_error = f"cannot read the cluster's state, retrying: {exc or type(exc).__name__}"
                await asyncio.sleep(RETRY_S)
            finally:
                for r in readers:
                    with contextlib.suppress(Exception):
                        await r.stop()
                await bus.close(self._nc)

    async def _on_demand(self, msg: Msg) -> None:
        try:
            s = DemandSample.decode(msg.data)
        except ValueError:
            return
        self.demand[(s.gateway_id, s.model, s.start_s)] = s

    async def _on_forecast(self, msg: Msg) -> None:
        try:
            fc = Forecast.decode(msg.data)
        except ValueError:
            return
        old = self.forecasts.get(fc.model)
        if old is None or fc.made_at_s >= old.made_at_s:
            self.forecasts[fc.model] = fc

    # ---- the gateway -----------------------------------------------------------------------------

    async def _gateway(self, every_s: float = 2.0) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                try:
                    resp = await client.get(f"{self.gateway_url}/metrics")
                    resp.raise_for_status()
                    self.queued = parse_queued(resp.text)
                    self.gateway_error = None
                except Exception as exc:
                    self.queued = None
                    self.gateway_error = (f"queued requests unknown: the gateway's /metrics at {self.gateway_url} "
                                          f"did not answer ({type(exc).__name__})")
                await asyncio.sleep(every_s)
