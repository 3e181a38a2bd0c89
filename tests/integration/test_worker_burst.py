"""A burst of very long prompts sent straight to a worker (past any gateway) must not take the worker out:
it keeps heartbeating, so no reader declares it dead, and a short request sent meanwhile is served."""

import asyncio

import pytest

from services.gpu_worker.main import WorkerService
from shared import bus
from shared.messages import (
    CommandKind, CommandResult, InferChunk, InferRequest, ModelSpec, SamplingParams, WorkerCommand, WorkerState,
)
from shared.model_folder import weight_bytes
from shared.settings import GatewaySettings, WorkerSettings
from shared.subjects import INFER, WORKER_CMD, WORKERS_BUCKET
from tests.helpers import eventually

pytestmark = pytest.mark.integration

BURST = 30
PROMPT_CHARS = 512 * 1024  # about half a second of tokenising each; the gateway's most (WARMSERVE_MAX_PROMPT_CHARS)


@pytest.fixture
async def worker(nats_url):
    service = WorkerService(WorkerSettings(nats_url=nats_url, worker_id="burst-worker", engine="sim",
                                           memory_budget_bytes=512 * 2**20, kv_cache_bytes=64 * 2**20,
                                           heartbeat_interval_s=0.2, batch_capacity=32))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    yield service
    stop.set()
    await asyncio.wait_for(task, 60)


async def generate(nc, wid: str, req: InferRequest) -> list[InferChunk]:
    return [c async for c in bus.request_stream(nc, INFER.format(worker=wid), req, InferChunk, first_timeout=120,
                                                idle_timeout=120, is_last=lambda c: c.last)]


async def test_a_burst_of_long_prompts_leaves_the_worker_live_and_serving_others(nc, worker, tiny_model):
    wid = worker.settings.worker_id
    # a context the long prompts exceed, found out only by tokenising them
    spec = ModelSpec(slug="tiny", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=4096)
    activate = WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec)  # idempotent: may be sent again

    async def activated():  # once the worker has subscribed
        try:
            return await bus.request(nc, WORKER_CMD.format(worker=wid), activate, CommandResult, timeout=5)
        except bus.BusError:
            return None

    r = await eventually(activated, timeout=30, what="the worker activating the model")
    assert r.ok, r.error

    kv = await nc.jetstream().key_value(WORKERS_BUCKET.name)
    watcher = await kv.watch(wid)
    beats: list[WorkerState] = []

    async def watch() -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                beats.append(WorkerState.decode(entry.value))

    watching = asyncio.create_task(watch())
    await eventually(lambda: asyncio.sleep(0, len(beats) >= 2), timeout=10, what="the worker's heartbeats")

    text = ("the quick brown fox jumps over the lazy dog; " * (PROMPT_CHARS // 40 + 1))[:PROMPT_CHARS]
    burst = [asyncio.create_task(generate(nc, wid, InferRequest(model="tiny", prompt=f"{i} {text}",
                                                                 sampling=SamplingParams(max_tokens=4))))
             for i in range(BURST)]
    # the burst has reached the worker: it reports requests in flight
    await eventually(lambda: asyncio.sleep(0, any(b.in_flight for b in beats)), timeout=60,
                     what="a heartbeat showing the burst in flight (a worker that stops heartbeating is dead to "
                          "every reader)")
    started_at = next(b.heartbeat_at_s for b in beats if b.in_flight)

    # another client's short request is served while the burst is still being worked through
    short = await generate(nc, wid, InferRequest(model="tiny", prompt="hello there",
                                                 sampling=SamplingParams(max_tokens=3, seed=1)))
    pending = sum(not b.done() for b in burst)
    assert short[-1].finish_reason == "length" and short[-1].usage.completion_tokens == 3
    assert pending > 0, "the short request waited for the whole burst"

    answers = await asyncio.gather(*burst)
    assert {a[-1].error.code for a in answers} == {"context_length_exceeded"}  # tokenised, and refused
    await eventually(lambda: asyncio.sleep(0, beats[-1].in_flight == 0), timeout=10, what="the burst's end")
    watching.cancel()
    await watcher.stop()

    # the worker stayed live: no silence as long as the time after which readers drop a worker
    times = [b.heartbeat_at_s for b in beats if b.heartbeat_at_s >= started_at]
    gaps = [b - a for a, b in zip(times, times[1:])]
    timeout = GatewaySettings().heartbeat_timeout_s
    assert len(times) > 2 and max(gaps) < timeout, f"longest silence {max(gaps):.1f} s (readers wait {timeout} s)"
