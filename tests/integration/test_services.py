"""The worker and the gateway as real services on a real nats-server (in this process)."""

import asyncio
import json

import httpx
import pytest
import uvicorn

from services.gateway.app import create_app
from services.gpu_worker.main import WorkerService
from shared import bus
from tooling.localcluster.processes import free_port
from shared.messages import (
    CommandKind, CommandResult, CopyState, InferChunk, InferRequest, ModelSpec, SamplingParams, WorkerCommand,
    WorkerEvent, WorkerState,
)
from shared.model_folder import max_context, weight_bytes
from shared.settings import GatewaySettings, WorkerSettings
from shared.subjects import CATALOG_BUCKET, INFER, WORKER_CMD, WORKER_EVENT, WORKERS_BUCKET
from tests.helpers import eventually, request_raw

pytestmark = pytest.mark.integration


@pytest.fixture
def spec(tiny_model):
    return ModelSpec(slug="tiny", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model))


@pytest.fixture
async def worker(nats_url, nats_urls, request):
    wid = f"svc-{request.node.name[-20:].replace('_', '-').strip('-')}"
    service = WorkerService(WorkerSettings(nats_url=nats_urls.worker(wid), worker_id=wid, engine="sim",
                                           memory_budget_bytes=512 * 2**20, kv_cache_bytes=64 * 2**20,
                                           heartbeat_interval_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    probe = await bus.connect(nats_url, "svc-test-probe")

    async def answering():  # the worker has subscribed to its command subject (a malformed command is refused)
        try:
            await request_raw(probe, WORKER_CMD.format(worker=wid), b"{}", timeout=1)
            return getattr(service, "kv", None) is not None
        except Exception:
            return False

    await eventually(answering, timeout=10, every=0.05, what="the worker answering commands")
    await probe.close()
    yield service
    stop.set()
    await asyncio.wait_for(task, 40)


async def command(nc, wid, kind, model, spec=None, command_id=None):
    cmd = WorkerCommand(kind=kind, model=model, spec=spec, **({"command_id": command_id} if command_id else {}))
    return await bus.request(nc, WORKER_CMD.format(worker=wid), cmd, CommandResult, timeout=20)


async def test_worker_over_nats(nc, worker, spec):
    wid = worker.settings.worker_id
    raw = await request_raw(nc, WORKER_CMD.format(worker=wid), b'{"kind": "launch"}', timeout=5)
    bad = CommandResult.decode(raw.data)
    assert not bad.ok and bad.error.code == "bad_request"

    r = await command(nc, wid, CommandKind.ACTIVATE, "tiny", spec, command_id="act-1")
    assert r.ok and r.instance_id
    again = await command(nc, wid, CommandKind.ACTIVATE, "tiny", spec, command_id="act-1")
    assert again == r

    kv = await nc.jetstream().key_value(WORKERS_BUCKET.name)
    state = WorkerState.decode((await kv.get(wid)).value)
    assert state.copy_of("tiny").state is CopyState.ACTIVE and state.kv_bytes == 64 * 2**20

    req = InferRequest(model="tiny", prompt="hello there", sampling=SamplingParams(max_tokens=6, seed=3))
    chunks = [c async for c in bus.request_stream(nc, INFER.format(worker=wid), req, InferChunk, first_timeout=10,
                                                  idle_timeout=10, is_last=lambda c: c.last)]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    assert [c.seq for c in chunks] == sorted(c.seq for c in chunks)

    raw = await request_raw(nc, INFER.format(worker=wid), b"garbage", timeout=5)
    assert InferChunk.decode(raw.data).error.code == "bad_request"
    other = InferRequest(model="nope", prompt="x")
    [err] = [c async for c in bus.request_stream(nc, INFER.format(worker=wid), other, InferChunk, first_timeout=5,
                                                 idle_timeout=5, is_last=lambda c: c.last)]
    assert err.error.code == "not_active"

    js = nc.jetstream()
    sub = await js.subscribe(WORKER_EVENT.format(worker=wid), ordered_consumer=True)
    seen = []
    for _ in range(3):
        msg = await sub.next_msg(timeout=5)
        seen.append(WorkerEvent.decode(msg.data).to_state)
    assert seen == [CopyState.LOADING, CopyState.PREWARMED, CopyState.ACTIVE]
    await sub.unsubscribe()


@pytest.fixture
async def gateway(nats_urls, nc, worker, spec):
    kv = await nc.jetstream().key_value(CATALOG_BUCKET.name)
    await kv.put("tiny", spec.encode())
    await kv.put("cold", spec.model_copy(update={"slug": "cold"}).encode())
    port = free_port()
    app = create_app(GatewaySettings(nats_url=nats_urls["gateway"], port=port, demand_interval_s=0.2,
                                     gateway_id="gw-test", queue_wait_s=2, require_api_key=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, 30)
    await kv.delete("tiny")
    await kv.delete("cold")


async def test_gateway_errors_are_openai_shaped(spans, gateway, nc, worker, spec):
    r = await command(nc, worker.settings.worker_id, CommandKind.ACTIVATE, "tiny", spec)
    assert r.ok
    async with httpx.AsyncClient(base_url=gateway, timeout=20) as http:
        for _ in range(50):
            ready = await http.get("/readyz")
            cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
            if ready.status_code == 200 and cards.get("tiny", {}).get("active_instances"):
                break
            await asyncio.sleep(0.1)
        assert cards["tiny"]["active_instances"] == 1 and cards["cold"]["active_instances"] == 0

        def chat(**over):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | over
            return http.post("/v1/chat/completions", json=body)

        ok = await chat()
        assert ok.status_code == 200 and ok.headers["x-warmserve-outcome"] == "warm"
        assert ok.json()["usage"]["completion_tokens"] == 4
        # one request is one trace: the worker's span continues the gateway's
        by_name = {}
        for span in spans.get_finished_spans():
            if span.attributes.get("warmserve.request_id") == ok.json()["id"]:
                by_name[span.name] = span
        assert by_name["worker.generate"].context.trace_id == by_name["gateway.request"].context.trace_id
        assert by_name["gateway.request"].attributes["warmserve.outcome"] == "warm"

        cases = {
            "malformed json": (await http.post("/v1/chat/completions", content=b"{nope",
                                               headers={"content-type": "application/json"}), 400, None),
            "unknown model": (await chat(model="missing"), 404, "model_not_found"),
            "unsupported": (await chat(use_beam_search=True), 400, "unsupported_parameter"),
            "n too large": (await chat(n=17), 400, "invalid_request"),
            "no messages": (await chat(messages=[]), 400, "invalid_request"),
            "too long": (await chat(messages=[{"role": "user", "content": "word " * 400}]), 400,
                         "context_length_exceeded"),
            "no instance": (await chat(model="cold"), 503, "no_capacity"),
        }
        for name, (resp, status, code) in cases.items():
            assert resp.status_code == status, (name, resp.text)
            err = resp.json()["error"]
            assert err["message"] and err["type"], name
            if code:
                assert err["code"] == code, (name, err)
        assert "use_beam_search" in cases["unsupported"][0].json()["error"]["message"]
        no_instance = cases["no instance"][0]  # no orchestrator here: the wait budget runs out
        assert no_instance.headers["retry-after"] == "5" and "within 2 s" in no_instance.json()["error"]["message"]

        # streaming with usage in the last chunk
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = [ln async for ln in resp.aiter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
        assert any(e["choices"] and e["choices"][0]["finish_reason"] == "length" for e in events)

        metrics = (await http.get("/metrics")).text
        assert 'warmserve:requests_total{model="tiny",outcome="warm",status="200"}' in metrics
        assert 'warmserve:requests_total{model="missing"' not in metrics  # unknown models are not labels
        assert "warmserve:time_to_first_token_seconds_bucket" in metrics


async def test_api_keys_and_rate_limits(nats_urls, nc):
    from shared.apikeys import hash_key, new_key
    from shared.messages import ApiKeyRecord
    from shared.subjects import APIKEYS_BUCKET

    js = nc.jetstream()
    await bus.ensure_all(js)
    keys = await js.key_value(APIKEYS_BUCKET.name)
    good, slow, off = new_key(), new_key(), new_key()
    await keys.put(hash_key(good), ApiKeyRecord(id="k1", name="good").encode())
    await keys.put(hash_key(slow), ApiKeyRecord(id="k2", name="slow", rate_limit_rps=1.0).encode())
    await keys.put(hash_key(off), ApiKeyRecord(id="k3", name="off", disabled=True).encode())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(GatewaySettings(nats_url=nats_urls["gateway"], port=port,
                                                                      gateway_id="gw-auth")),
                                           host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(50):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get("/healthz")).status_code == 200  # no key needed
            missing = await http.get("/v1/models")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer ws-wrong"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            disabled = await http.get("/v1/models", headers={"Authorization": f"Bearer {off}"})
            assert disabled.status_code == 401 and "disabled" in disabled.json()["error"]["message"]
            bad_body = await http.post("/v1/chat/completions", content=b"{nope",
                                       headers={"content-type": "application/json"})
            assert bad_body.status_code == 401  # the key is checked before the body
            assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {good}"})).status_code == 200
            statuses = [(await http.get("/v1/models", headers={"Authorization": f"Bearer {slow}"})).status_code
                        for _ in range(3)]
            assert statuses == [200, 200, 429]  # a burst of twice the rate, then the limit
            limited = await http.get("/v1/models", headers={"Authorization": f"Bearer {slow}"})
            assert limited.json()["error"]["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) >= 1
            assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {good}"})).status_code == 200
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        for k in (good, slow, off):
            await keys.delete(hash_key(k))
