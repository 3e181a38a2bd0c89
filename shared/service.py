"""The process shell every service shares: logging, tracing, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from shared import metrics
from shared.bus import BusError
from shared.watch import KvMirror
from shared.leader import readiness
from shared.messages import WorkerState
from shared.policy.cluster import live_workers
from shared.settings import CommonSettings, ControlPlaneSettings, MetricsSettings
from shared.telemetry import configure_logging, setup_tracing

log = logging.getLogger(__name__)


def run_service(run: Callable[[asyncio.Event], Awaitable[None]], service: str, settings: CommonSettings) -> None:
    """Run ``run(stop)`` until it returns; ``stop`` is set by SIGINT or SIGTERM. Serves
    ``WARMSERVE_METRICS_PORT`` where the settings have one (the control plane's readiness is its lease's)."""
    configure_logging(settings.log_level)
    setup_tracing(service, settings.otlp_endpoint)
    if isinstance(settings, ControlPlaneSettings):
        metrics.serve(settings.metrics_host, settings.metrics_port, lambda: readiness(settings.leader_lease_s))
    elif isinstance(settings, MetricsSettings):
        metrics.serve(settings.metrics_host, settings.metrics_port)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_main())
    except BusError as exc:
        log.error("%s: %s", service, exc)
        raise SystemExit(1) from None
    log.info("%s stopped", service)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a sim worker spent a sixth less CPU per streamed request on
    it, 0.87 ms instead of 1.05: docs/operations.md, "Performance"), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        return


def brief(exc: BaseException) -> str:
    """The first line of an exception (SQLAlchemy errors append the whole statement)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def seen_workers(mirror: KvMirror[WorkerState], timeout_s: float, *, reachable: bool = False) -> list[WorkerState]:
    """The live workers in a mirror of the workers bucket, the mirror's own outages not counted as their
    silence (a NATS restart does not make every worker look gone to whoever reconnects first), and each
    worker's silence counted from when the mirror saw its state (on this reader's clock, not the worker's).
    ``reachable``: only those heard since the mirror's watch resumed, the ones a command can reach now."""
    now = time.time()
    live = live_workers(mirror.items.values(), now, timeout_s, mirror.blind(now), mirror.seen_at)
    return [w for w in live if mirror.heard_since_resume(w.worker_id)] if reachable else live


def freeze_gc_heap(thaw: bool = False) -> None:
    """Move what exists now (modules, an engine, its tokenizer and config) out of the garbage collector's
    sight, as vLLM's own server does once it has started: a full collection otherwise walks that whole heap
    and stops the event loop, which showed as gaps of about 100 ms between tokens (ITL P99 99 ms against
    vLLM's 16, docs/benchmarks/vs_vllm.md). ``thaw``: first let the collector see the heap again, so that
    what was dropped (an unloaded engine) is freed. Call it after start-up and when an engine starts or stops,
    not per request: the collection itself takes a while on a large heap."""
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
