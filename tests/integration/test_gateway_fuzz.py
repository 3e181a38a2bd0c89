"""Schemathesis fuzzes the gateway's OpenAPI: no 5xx, no hang, every error in the OpenAI format.

The real gateway app runs in-process (schemathesis drives it over ASGI, lifespan included) on the
test nats-server, with a valid API key and one catalog model (MODEL) served by a fake worker that
answers at once, so requests that pass validation go all the way through routing and streaming.
Half of the generated bodies name MODEL, so valid-model requests reach the deeper checks. Bounded:
150 derandomized examples per operation (both generation modes: valid and schema-violating input,
plus schemathesis's probes such as unsupported methods and undecodable bodies), about 10 s.

The schema is loaded at import from an app that never starts, and the calls go to the real one
through ``_LateApp``: ``schemathesis.pytest.from_fixture`` does not work with pytest 9.
"""

from __future__ import annotations

import asyncio
import threading
import time

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from services.gateway.app import create_app
from shared import bus
from shared.apikeys import hash_key, new_key
from shared.messages import (
    ApiKeyRecord, CopyState, InferChunk, InferRequest, ModelCopy, ModelSpec, Usage, WorkerState,
)
from shared.settings import GatewaySettings
from shared.subjects import APIKEYS_BUCKET, CATALOG_BUCKET, INFER, WORKERS_BUCKET

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL, WORKER, INSTANCE = "fuzz-tiny", "fuzz-worker", "fuzz-instance"
MAX_SECONDS = 5.0  # one call, streaming included
KEY = new_key()


class FakeWorker:
    """A worker in its own thread and event loop: one active instance of MODEL, answering each
    request with two chunks. Also seeds the catalog and the API key."""

    def __init__(self, nats_url: str):
        self.nats_url = nats_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        self.nc = await bus.connect(self.nats_url, "fuzz-worker")
        js = self.nc.jetstream()
        buckets = await bus.ensure_all(js)
        self.catalog, self.workers, self.keys = (buckets[b.name] for b in (CATALOG_BUCKET, WORKERS_BUCKET,
                                                                              APIKEYS_BUCKET))
        await self.catalog.put(MODEL, ModelSpec(slug=MODEL, path="/nowhere", parameter_bytes=1,
                                                max_context_tokens=2048).encode())
        await self.keys.put(hash_key(KEY), ApiKeyRecord(id="fuzz", name="fuzz", rate_limit_rps=1e6).encode())
        now = time.time()
        state = WorkerState(worker_id=WORKER, node="n", device="cpu:0", engine="sim", memory_budget_bytes=1,
                            batch_capacity=1000, heartbeat_at_s=now, started_at_s=now,
                            copies=[ModelCopy(model=MODEL, state=CopyState.ACTIVE, weight_bytes=1,
                                              instance_id=INSTANCE)])
        await self.workers.put(WORKER, state.encode())
        self.sub = await self.nc.subscribe(INFER.format(worker=WORKER), cb=self._infer)

    async def _infer(self, msg) -> None:
        req = InferRequest.decode(msg.data)
        for chunk in (InferChunk(request_id=req.request_id, seq=0, text="ok"),
                      InferChunk(request_id=req.request_id, seq=1, finish_reason="stop",
                                 usage=Usage(prompt_tokens=3, completion_tokens=1))):
            await self.nc.publish(msg.reply, chunk.encode())

    async def _stop(self) -> None:
        await self.sub.unsubscribe()
        await self.catalog.delete(MODEL)
        await self.workers.delete(WORKER)
        await self.keys.delete(hash_key(KEY))
        await bus.close(self.nc)


class _LateApp:
    """The ASGI app schemathesis drives: the real gateway, created by a fixture once the test
    nats-server runs (the schema is loaded at import, from an app that is never started)."""

    target = None

    async def __call__(self, scope, receive, send):
        await self.target(scope, receive, send)


APP = _LateApp()
schema = schemathesis.openapi.from_dict(create_app(GatewaySettings()).openapi())
schema.app = APP
schema.config.generation.update(max_examples=150, deterministic=True, database="none")


@schema.hook
def flatmap_body(context, body):  # half the bodies name the served model
    if isinstance(body, dict) and "model" in body:
        return st.sampled_from([body, {**body, "model": MODEL}])
    return st.just(body)


@pytest.fixture(scope="module")
def gateway(nats_url, nats_urls):
    from schemathesis.python.asgi import shutdown_lifespans

    worker = FakeWorker(nats_url)  # as the operator: it also seeds the catalog and the key
    worker.start()
    APP.target = create_app(GatewaySettings(
        nats_url=nats_urls["gateway"], gateway_id="gw-fuzz", queue_wait_s=0.5, heartbeat_timeout_s=3600,
        first_token_timeout_s=2, inter_token_timeout_s=2))
    yield APP
    shutdown_lifespans()  # the gateway's lifespan: close its NATS connection while the server is up
    worker.stop()


REACHED: set[tuple[str, int]] = set()  # (operation, status) seen, for the last test


def openai_errors(ctx, response, case):
    """Every error body is ``{"error": {"message": str, "type": str, "param": str|None, "code": str}}``,
    with a machine-readable code, and a 4xx is not typed as a server error."""
    REACHED.add((case.operation.label, response.status_code))
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, f"bad error fields: {err!r}"
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert isinstance(err["code"], str) and err["code"], f"no error code: {err!r}"
    if response.status_code < 500:
        assert err["type"] != "server_error", f"a {response.status_code} typed as a server error: {err!r}"
    return None


def quick(ctx, response, case):
    """No call hangs: each one, a streamed answer included, is over within a few seconds."""
    assert response.elapsed < MAX_SECONDS, f"took {response.elapsed:.1f} s"


@schema.parametrize()
@hypothesis.settings(max_examples=150, derandomize=True, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_gateway_fuzz(case, gateway):
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                           checks=[not_a_server_error, openai_errors, quick])


def test_fuzz_reached_validation_and_the_worker():
    """The fuzz is only worth something if generated requests passed validation and were served."""
    if not REACHED:
        pytest.skip("runs after test_gateway_fuzz")
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        statuses = {status for label, status in REACHED if label == op}
        assert {200, 400, 404} <= statuses, (op, statuses)
