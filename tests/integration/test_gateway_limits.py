"""Per-key limits on the real gateway (real NATS, real HTTP): requests in flight per key, the slot given
back however a request ends, and API keys kept out of the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import pytest
import uvicorn

from services.gateway import limits
from services.gateway.app import create_app
from shared.apikeys import hash_key, new_key
from tooling.localcluster.processes import free_port
from shared.messages import (
    ApiKeyRecord, CancelRequest, ErrorInfo, InferChunk, InferRequest, Usage,
)
from shared.settings import GatewaySettings
from shared.subjects import CANCEL, INFER

from tests.helpers import eventually, seed_serving

pytestmark = pytest.mark.integration

MODEL, WORKER = "lim-m", "lim-worker"
LIMITED, DEFAULT, OFF = new_key(), new_key(), new_key()  # max_concurrency 2; the setting's 3; disabled


class Worker:
    """A fake worker with one active instance of MODEL. What it does depends on the last message:
    ``hold`` generates (a chunk every 0.1 s) until ``release`` is set, ``hold-first`` sends nothing until
    then, ``fail`` reports an error after the first chunk, ``silent`` goes quiet after it, ``error-first``
    refuses at once; anything else is answered at once. ``cancelled`` collects cancel requests."""

    def __init__(self, nc):
        self.nc = nc
        self.release = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.cancelled: list[str] = []
        self.received: list[str] = []  # the text of each request that reached it

    async def on_cancel(self, msg) -> None:
        self.cancelled.append(CancelRequest.decode(msg.data).request_id)

    async def on_infer(self, msg) -> None:  # a subscription's callbacks run one at a time: answer in tasks
        task = asyncio.create_task(self.answer(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, msg) -> None:
        req = InferRequest.decode(msg.data)
        text = req.messages[-1].content if req.messages else req.prompt
        self.received.append(text)

        async def send(**kw):
            await self.nc.publish(msg.reply, InferChunk(request_id=req.request_id, **kw).encode())

        if text == "error-first":
            await send(seq=0, error=ErrorInfo(code="bad_request", message="the worker refused it"))
            return
        if text == "hold-first":
            await self.release.wait()
        await send(seq=0, text="a")
        seq = 1
        while text == "hold" and not self.release.is_set():
            try:
                await asyncio.wait_for(self.release.wait(), 0.1)
            except asyncio.TimeoutError:
                await send(seq=seq, text=".")
                seq += 1
        if text == "fail":
            await send(seq=seq, error=ErrorInfo(code="bad_request", message="failed mid-way"))
            return
        elif text == "silent":
            return
        await send(seq=seq, text="b", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=2))


@pytest.fixture
async def gateway(nats_urls, nc):
    catalog, workers, keys = await seed_serving(nc.jetstream(), MODEL, WORKER, "lim-instance")
    await keys.put(hash_key(LIMITED), ApiKeyRecord(id="lim-a", name="limited", max_concurrency=2).encode())
    await keys.put(hash_key(DEFAULT), ApiKeyRecord(id="lim-b", name="default").encode())
    await keys.put(hash_key(OFF), ApiKeyRecord(id="lim-c", name="off", disabled=True).encode())
    worker = Worker(nc)
    subs = [await nc.subscribe(INFER.format(worker=WORKER), cb=worker.on_infer),
            await nc.subscribe(CANCEL.format(worker=WORKER), cb=worker.on_cancel)]

    port = free_port()
    app = create_app(GatewaySettings(nats_url=nats_urls["gateway"], port=port, gateway_id="gw-limits",
                                     key_max_concurrency=3, heartbeat_timeout_s=3600, queue_wait_s=1,
                                     inter_token_timeout_s=0.5, max_body_bytes=4096))
    # log_config=None: uvicorn's own loggers (access log included) propagate to the test's capture
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="debug",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    await eventually(lambda: _ready(http), what="the gateway to be ready")
    yield http, app.state.gateway, worker
    await http.aclose()
    worker.release.set()
    server.should_exit = True
    await asyncio.wait_for(task, 30)
    for sub in subs:
        await sub.unsubscribe()
    await catalog.delete(MODEL)
    await workers.delete(WORKER)
    for k in (LIMITED, DEFAULT, OFF):
        await keys.delete(hash_key(k))


async def _ready(http):
    return (await http.get("/readyz")).status_code == 200


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str, **over) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4} | over


async def first_event(lines) -> dict:
    """Read a streamed response's lines up to its first data event (the request is then in flight). The
    same iterator reads on: an abandoned one closes the connection when it is garbage-collected."""
    async for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("stream ended without data")


def held(gw, key_id: str) -> int:
    return gw.key_slots.in_flight.get(key_id, 0)


async def test_concurrency_limit_per_key_and_slots_given_back_however_requests_end(gateway):
    http, gw, worker = gateway
    post = "/v1/chat/completions"

    async def stream(content: str):
        resp = await http.send(http.build_request("POST", post, json=chat(content, stream=True),
                                                  headers=auth(LIMITED)), stream=True)
        return resp, resp.aiter_lines()

    (one, one_lines), (two, two_lines) = await stream("hold"), await stream("hold")
    assert one.status_code == two.status_code == 200
    await first_event(one_lines)
    await first_event(two_lines)
    assert held(gw, "lim-a") == 2

    over = await http.post(post, json=chat("quick"), headers=auth(LIMITED))
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    err = over.json()["error"]
    assert err["code"] == "concurrency_limit_exceeded" and err["type"] == "rate_limit_error"
    assert "limited" in err["message"] and "2" in err["message"]
    # another key has its own slots (the setting's 3)
    assert (await http.post(post, json=chat("quick"), headers=auth(DEFAULT))).status_code == 200

    await one.aclose()  # the client leaves mid-stream: its slot comes back
    await eventually(lambda: _held_is(gw, "lim-a", 1), timeout=5, what="the disconnected stream's slot")
    assert (await http.post(post, json=chat("quick"), headers=auth(LIMITED))).status_code == 200
    worker.release.set()  # the other stream ends normally
    assert [ln async for ln in two_lines if ln.startswith("data: ")][-1] == "data: [DONE]"
    await two.aclose()
    await eventually(lambda: _held_is(gw, "lim-a", 0), timeout=5, what="the finished stream's slot")

    # success, streamed and not
    ok = await http.post(post, json=chat("quick"), headers=auth(LIMITED))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ab"
    async with http.stream("POST", post, json=chat("quick", stream=True), headers=auth(LIMITED)) as resp:
        assert [ln async for ln in resp.aiter_lines() if ln.startswith("data: ")][-1] == "data: [DONE]"
    await eventually(lambda: _held_is(gw, "lim-a", 0), timeout=5, what="every slot back")

    # errors: refused by the worker, failed mid-stream, a worker gone silent, and refused by the gateway
    assert (await http.post(post, json=chat("error-first"), headers=auth(LIMITED))).status_code == 400
    assert (await http.post(post, json=chat("fail"), headers=auth(LIMITED))).status_code == 400
    for content in ("fail", "silent"):
        async with http.stream("POST", post, json=chat(content, stream=True), headers=auth(LIMITED)) as resp:
            events = [json.loads(ln[6:]) for ln in [ln async for ln in resp.aiter_lines()]
                      if ln.startswith("data: {")]
        assert "error" in events[-1], (content, events)
    assert (await http.post(post, json=chat("quick", model="nope"), headers=auth(LIMITED))).status_code == 404
    assert (await http.post(post, json=chat("x" * 5000), headers=auth(LIMITED))).status_code == 413
    assert (await http.post(post, json=chat("quick", top_k=-3), headers=auth(LIMITED))).status_code == 400
    await eventually(lambda: _held_is(gw, "lim-a", 0), timeout=5, what="every slot back")

    # clients that give up on a non-streamed request, before its first chunk and while it generates:
    # the request is cancelled at once (the worker is told), not when a timeout ends it
    worker.release.clear()
    for content in ("hold-first", "hold"):
        waiting = asyncio.create_task(http.post(post, json=chat(content), headers=auth(LIMITED)))
        await eventually(lambda: _held_is(gw, "lim-a", 1), timeout=5, what="the request to be in flight")
        cancels = len(worker.cancelled)
        await eventually(lambda: worker.received[-1:] == [content], timeout=5, what="the request at the worker")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await eventually(lambda: _held_is(gw, "lim-a", 0), timeout=5, what="the abandoned request's slot")
        await eventually(lambda: _more(worker.cancelled, cancels), timeout=5, what="a cancel sent to the worker")
    worker.release.set()
    metrics = (await http.get("/metrics")).text
    assert f'warmserve:requests_total{{model="{MODEL}",outcome="warm",status="499"}} 3.0' in metrics

    # after all that the key has its two slots again
    worker.release.clear()
    (one, one_lines), (two, two_lines) = await stream("hold"), await stream("hold")
    assert (await http.post(post, json=chat("quick"), headers=auth(LIMITED))).status_code == 429
    worker.release.set()
    for resp, lines in ((one, one_lines), (two, two_lines)):
        assert resp.status_code == 200 and [ln async for ln in lines if ln][-1] == "data: [DONE]"
        await resp.aclose()
    await eventually(lambda: _held_is(gw, "lim-a", 0), timeout=5, what="every slot back")
    assert gw.key_slots.in_flight == {}


async def _held_is(gw, key_id, n):
    return held(gw, key_id) == n


async def _more(items, n):
    return len(items) > n


async def test_api_keys_never_reach_the_logs(gateway, caplog):
    http, gw, worker = gateway
    caplog.set_level(logging.DEBUG)
    wrong = new_key()
    assert (await http.get("/v1/models", headers=auth(wrong))).status_code == 401
    assert (await http.get("/v1/models", headers=auth("zq7x"))).status_code == 401
    assert (await http.get("/v1/models", headers=auth(OFF))).status_code == 401
    assert (await http.post("/v1/chat/completions", content=b"{nope", headers=auth(wrong))).status_code == 401
    assert (await http.post("/v1/chat/completions", json=chat("quick"), headers=auth(LIMITED))).status_code == 200
    assert (await http.post("/v1/chat/completions", json=chat("hi", model="nope"),
                            headers=auth(DEFAULT))).status_code == 404
    async with http.stream("POST", "/v1/chat/completions", json=chat("silent", stream=True),
                           headers=auth(DEFAULT)) as resp:
        [ln async for ln in resp.aiter_lines()]  # a stream that fails: logged as a warning or error
    records = caplog.records
    assert any(r.name.startswith("warmserve.gateway") for r in records)  # the gateway did log at DEBUG
    assert any(r.name.startswith("uvicorn") for r in records)  # and so did the server (access log)
    text = caplog.text + "\n".join(repr(r.args) for r in records)
    for key in (wrong, "zq7x", OFF, LIMITED, DEFAULT):
        assert key not in text, "an API key was logged"
    for key in (wrong, OFF, LIMITED, DEFAULT):
        assert key[3:11] not in text  # not even a part of it


# ------------------------------------------------------------ request size vs NATS's message size
# The body limit stays ENVELOPE_BYTES below NATS's max_payload (1 MiB on the test server), so the largest
# body accepted still fits in one message to a worker once the gateway has added ids, defaults and trace
# headers; anything larger gets a 413, never a 500 from a refused publish.

BIG_MODEL, BIG_WORKER = "pay-m", "pay-worker"


@contextlib.asynccontextmanager
async def big_gateway(nats_url, nc, **settings):
    """A gateway (no API keys) whose one worker answers "ab" to any prompt, for a model with a context large
    enough that only the body and message sizes limit a prompt."""
    catalog, workers, _ = await seed_serving(nc.jetstream(), BIG_MODEL, BIG_WORKER, "pay-instance",
                                             max_context_tokens=2**21)
    worker = Worker(nc)
    sub = await nc.subscribe(INFER.format(worker=BIG_WORKER), cb=worker.on_infer)
    port = free_port()
    app = create_app(GatewaySettings(nats_url=nats_url, port=port, gateway_id="gw-payload", require_api_key=False,
                                     heartbeat_timeout_s=3600, queue_wait_s=1, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        await eventually(lambda: _up_and_ready(server, http), what="the gateway to be ready")
        await eventually(lambda: _routable(http), what="the model to be routable")
        yield http, app.state.gateway
    finally:
        await http.aclose()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        await sub.unsubscribe()
        await catalog.delete(BIG_MODEL)
        await workers.delete(BIG_WORKER)


async def _up_and_ready(server, http):
    return server.started and await _ready(http)


async def _routable(http):
    return (await post(http, big_body(300))).status_code == 200


def big_body(size: int, escaped: bool = False) -> bytes:
    """A chat request of exactly ``size`` bytes whose prompt is multi-byte text (2, 3 and 4 bytes a character
    in UTF-8; as \\u escapes, 6 to 12 bytes), padded with ASCII."""
    def encode(text: str) -> bytes:
        body = {"model": BIG_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
        return json.dumps(body, ensure_ascii=escaped, separators=(",", ":")).encode()

    unit = "é€😀"
    text = unit * ((size - len(encode(""))) // (len(encode(unit)) - len(encode(""))))
    text += "x" * (size - len(encode(text)))
    raw = encode(text)
    assert len(raw) == size and len(text) < 400_000, (len(raw), len(text))  # under WARMSERVE_MAX_PROMPT_CHARS
    return raw


async def post(http, raw: bytes):
    return await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})


async def test_the_largest_body_accepted_is_served_and_one_byte_more_is_a_413(nats_url, nc):
    async with big_gateway(nats_url, nc) as (http, gw):
        limit = gw.settings.max_body_bytes
        for escaped in (False, True):
            resp = await post(http, big_body(limit, escaped))
            assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "ab", resp.text
        assert limit == gw.body_limit == gw.nc.max_payload - limits.ENVELOPE_BYTES  # consistent by default
        resp = await post(http, big_body(limit + 1))
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large", resp.text
        assert str(limit) in resp.json()["error"]["message"]


async def test_a_body_limit_above_what_nats_carries_is_lowered_to_it(nats_url, nc, caplog):
    async with big_gateway(nats_url, nc, max_body_bytes=4 * 2**20) as (http, gw):
        limit = gw.body_limit
        assert limit == gw.nc.max_payload - limits.ENVELOPE_BYTES
        assert any("WARMSERVE_MAX_BODY_BYTES" in r.getMessage() and str(limit) in r.getMessage()
                   for r in caplog.records), caplog.text
        assert (await post(http, big_body(limit))).status_code == 200
        for size in (limit + 1, gw.nc.max_payload - 1, gw.nc.max_payload + 1):  # were 500s: a refused publish
            resp = await post(http, big_body(size))
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large", (size, resp.text)


async def test_a_request_that_grew_past_max_payload_on_the_way_is_a_413(nats_url, nc, monkeypatch):
    """The message to the worker is measured as sent (JSON, ids, trace headers) before it is published: with
    no room left for the envelope, a body just under max_payload is refused with a 413, and the gateway's
    connection (which nats-server would close over the message) keeps serving."""
    monkeypatch.setattr(limits, "ENVELOPE_BYTES", 0)
    async with big_gateway(nats_url, nc, max_body_bytes=4 * 2**20) as (http, gw):
        assert gw.body_limit == gw.nc.max_payload
        resp = await post(http, big_body(gw.nc.max_payload - 40))
        err = resp.json()["error"]
        assert resp.status_code == 413 and err["code"] == "request_too_large", resp.text
        assert "too large to send" in err["message"] and BIG_WORKER not in resp.text
        # the same text as \u escapes: a body as large, but the message is not (the worker gets UTF-8)
        assert (await post(http, big_body(gw.nc.max_payload - 40, escaped=True))).status_code == 200
        assert (await post(http, big_body(1000))).status_code == 200 and gw.nc.is_connected
