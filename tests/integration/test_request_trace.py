"""One request is one trace: gateway, queue wait, scale-up decision, activation on the worker and
generation, across NATS, asserted on the span tree (in-memory exporter, services in this process)."""

import asyncio

import httpx
import pytest
import uvicorn

from services.gateway.app import create_app
from services.gpu_worker.main import WorkerService
from services.prewarm_orchestrator.main import Orchestrator
from shared import bus
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from tooling.localcluster.processes import free_port
from shared.messages import ModelSpec
from shared.model_folder import max_context, weight_bytes
from shared.settings import GatewaySettings, OrchestratorSettings, WorkerSettings
from shared.subjects import CATALOG_BUCKET
from tests.helpers import eventually

pytestmark = pytest.mark.integration


async def test_scale_up_request_is_one_trace(spans, nats_url, nats_urls, database_url, tiny_model):
    spec = ModelSpec(slug="traced", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model))
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as session:
        await repo.upsert_model(session, spec)
        await session.commit()
    await engine.dispose()
    nc = await bus.connect(nats_url, "trace-test")
    js = nc.jetstream()
    await bus.ensure_all(js)
    catalog = await js.key_value(CATALOG_BUCKET.name)
    await catalog.put("traced", spec.encode())

    stop = asyncio.Event()
    worker = WorkerService(WorkerSettings(nats_url=nats_urls.worker("trace-worker"), worker_id="trace-worker",
                                          heartbeat_interval_s=0.2))
    orchestrator = Orchestrator(OrchestratorSettings(nats_url=nats_urls["orchestrator"], database_url=database_url,
                                                     min_active_per_model=0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(GatewaySettings(
        nats_url=nats_urls["gateway"], port=port, gateway_id="gw-trace", require_api_key=False, queue_wait_s=20)),
        host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5))
    tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(orchestrator.run(stop)),
             asyncio.create_task(server.serve())]
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(100):
                cards = (await http.get("/v1/models")).json()["data"] if (await http.get("/readyz")).status_code == 200 else []
                if any(c["id"] == "traced" for c in cards):
                    break
                await asyncio.sleep(0.1)
            resp = await http.post("/v1/chat/completions", json={
                "model": "traced", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-warmserve-outcome"] == "cold"  # nothing was prewarmed: weights had to load
        request_id = resp.json()["id"]

        async def ended():  # the gateway's root span and the worker's generation span of that trace have ended
            done = spans.get_finished_spans()
            roots = [s for s in done if s.name == "gateway.request"
                     and s.attributes.get("warmserve.request_id") == request_id]
            return roots and any(s.name == "worker.generate" and s.context.trace_id == roots[0].context.trace_id
                                 for s in done)

        await eventually(ended, timeout=10, every=0.05, what="the request's spans to end")
        finished = spans.get_finished_spans()
        root = next(s for s in finished if s.name == "gateway.request"
                    and s.attributes.get("warmserve.request_id") == request_id)
        tree = [s for s in finished if s.context.trace_id == root.context.trace_id]
        by_id = {s.context.span_id: s for s in tree}

        def parent(s):
            return by_id.get(s.parent.span_id) if s.parent else None

        names = {s.name for s in tree}
        assert {"gateway.request", "gateway.queue", "orchestrator.scale_up", "worker.activate",
                "worker.generate"} <= names, names
        one = {s.name: s for s in tree}
        assert parent(one["gateway.queue"]) is root
        assert parent(one["orchestrator.scale_up"]) is one["gateway.queue"]
        assert parent(one["worker.activate"]) is one["orchestrator.scale_up"]
        assert parent(one["worker.generate"]) is root
        assert root.attributes["warmserve.outcome"] == "cold" and root.attributes["http.response.status_code"] == 200
        assert one["gateway.queue"].attributes["warmserve.reason"] == "no_instance"
        assert one["orchestrator.scale_up"].attributes["warmserve.outcome"] == "cold"
        assert [e.name for e in root.events] == ["first_token"]
        assert any(e.name == "first_token" for e in one["worker.generate"].events)
        assert one["worker.generate"].attributes["warmserve.completion_tokens"] == 3
    finally:
        server.should_exit = True
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await catalog.delete("traced")
        await nc.close()
