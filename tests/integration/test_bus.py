"""NATS helpers against a real nats-server."""

import asyncio
import time

import pytest

from shared import bus, watch
from shared.messages import AdminReply, AdminRequest, InferChunk, InferRequest, ModelSpec
from shared.subjects import CATALOG_BUCKET, DEMAND, STREAMS
from tests.helpers import eventually

pytestmark = pytest.mark.integration


async def test_request_reply_and_errors(nc):
    async def handler(msg):
        await bus.reply(nc, msg, AdminReply(ok=True, result=AdminRequest.decode(msg.data).args["x"] * 2))

    sub = await nc.subscribe("warmserve.test.double", cb=handler)
    reply = await bus.request(nc, "warmserve.test.double", AdminRequest(args={"x": 21}), AdminReply, timeout=2)
    assert reply.result == 42
    await sub.unsubscribe()
    with pytest.raises(bus.BusError) as exc:
        await bus.request(nc, "warmserve.test.nobody", AdminRequest(), AdminReply, timeout=2)
    assert exc.value.code == "no_responders"


async def test_streamed_replies_arrive_in_order_and_silence_times_out(nc):
    async def streamer(msg):
        req = InferRequest.decode(msg.data)
        for i in range(5):
            await bus.reply(nc, msg, InferChunk(request_id=req.request_id, seq=i, text=str(i)))
        if req.prompt != "hang":
            await bus.reply(nc, msg, InferChunk(request_id=req.request_id, seq=5, finish_reason="stop"))

    sub = await nc.subscribe("warmserve.test.stream", cb=streamer)
    chunks = [c async for c in bus.request_stream(nc, "warmserve.test.stream", InferRequest(model="m", prompt="go"),
                                                  InferChunk, first_timeout=2, idle_timeout=2, is_last=lambda c: c.last)]
    assert [c.seq for c in chunks] == list(range(6)) and chunks[-1].finish_reason == "stop"
    got = []
    with pytest.raises(bus.BusError) as exc:
        async for c in bus.request_stream(nc, "warmserve.test.stream", InferRequest(model="m", prompt="hang"),
                                          InferChunk, first_timeout=2, idle_timeout=0.3, is_last=lambda c: c.last):
            got.append(c)
    assert exc.value.code == "timeout" and len(got) == 5
    await sub.unsubscribe()
    with pytest.raises(bus.BusError) as exc:
        async for _ in bus.request_stream(nc, "warmserve.test.nobody", InferRequest(model="m"), InferChunk,
                                          first_timeout=2, idle_timeout=2, is_last=lambda c: c.last):
            pass
    assert exc.value.code == "no_responders"


async def test_streams_are_created_idempotently_and_publish_dedupes(nc):
    js = nc.jetstream()
    await bus.ensure_all(js)
    await bus.ensure_all(js)  # twice is fine
    for spec in STREAMS:
        info = await js.stream_info(spec.name)
        assert set(info.config.subjects) == set(spec.subjects)
    subject = DEMAND.format(model="dedupe-test")
    before = (await js.stream_info("WARMSERVE_DEMAND")).state.messages
    msg = AdminRequest(args={"n": 1})
    await bus.js_publish(js, subject, msg, msg_id="same-id")
    await bus.js_publish(js, subject, msg, msg_id="same-id")
    assert (await js.stream_info("WARMSERVE_DEMAND")).state.messages == before + 1


async def test_kv_mirror_follows_puts_and_deletes_and_skips_garbage(nc):
    js = nc.jetstream()
    buckets = await bus.ensure_all(js)
    kv = buckets[CATALOG_BUCKET.name]
    spec = ModelSpec(slug="mirror-a", path="/x", parameter_bytes=1)
    await kv.put("mirror-a", spec.encode())
    changes = []
    mirror = watch.KvMirror(kv, ModelSpec, on_change=lambda: changes.append(1)).start()
    await asyncio.wait_for(mirror.ready.wait(), 5)
    assert mirror.items["mirror-a"] == spec
    after_snapshot = len(changes)
    await kv.put("mirror-b", b"{not json")
    await kv.put("mirror-c", spec.model_copy(update={"slug": "mirror-c"}).encode())
    await kv.delete("mirror-a")
    for _ in range(100):
        if "mirror-a" not in mirror.items and "mirror-c" in mirror.items:
            break
        await asyncio.sleep(0.02)
    assert "mirror-a" not in mirror.items and "mirror-b" not in mirror.items and "mirror-c" in mirror.items
    assert len(changes) > after_snapshot  # live updates are announced, not just the snapshot
    await mirror.stop()
    await kv.delete("mirror-c")


async def test_kv_mirror_follows_the_bucket_at_once_after_a_server_restart(tmp_path):
    """A restarted server has lost the mirror's watch: the mirror rewatches on reconnect, rather than
    showing a stale bucket until nats-py notices missed heartbeats (10-15 s)."""
    from tests.conftest import NatsServer

    server = NatsServer(tmp_path)
    server.start()
    nc = mirror = None
    try:
        nc = await bus.connect(server.url, "mirror-restart")
        kv = (await bus.ensure_all(nc.jetstream()))[CATALOG_BUCKET.name]
        await kv.put("before-restart", ModelSpec(slug="before-restart", path="/x", parameter_bytes=1).encode())
        mirror = watch.KvMirror(kv, ModelSpec).start()
        await asyncio.wait_for(mirror.ready.wait(), 5)
        assert mirror.blind() == []
        stopped_at = time.time()
        server.stop()
        # the mirror notices the server is away (an interval under way is on record) before it comes back
        await eventually(mirror.blind, 15, "the mirror to notice the server is away", every=0.05)
        noticed_at = time.time()
        server.start()  # same port and store
        spec = ModelSpec(slug="after-restart", path="/x", parameter_bytes=1)
        deadline = asyncio.get_running_loop().time() + 15
        while True:  # until the client has reconnected and JetStream answers again
            try:
                await kv.put("after-restart", spec.encode())
                break
            except Exception:
                assert asyncio.get_running_loop().time() < deadline, "could not write after the restart"
                await asyncio.sleep(0.1)
        # at once: well within the 10-15 s that nats-py takes to notice missed heartbeats without the rewatch
        await eventually(lambda: "after-restart" in mirror.items, 6, "the write after the restart in the mirror",
                         every=0.05)
        # the outage is on record as time the mirror could not see, and ended once it watched again
        [(blind_from, blind_to)] = mirror.blind()
        assert stopped_at <= blind_from <= noticed_at and blind_to >= noticed_at
        await kv.put("heard", spec.model_copy(update={"slug": "heard"}).encode())
        await eventually(lambda: "heard" in mirror.items, 20, "a live write in the mirror", every=0.05)
        assert mirror.heard_since_resume("heard")  # written while the new watch ran
        assert not mirror.heard_since_resume("before-restart")  # only replayed from the store
    finally:
        if mirror is not None:
            await mirror.stop()
        if nc is not None:
            await nc.close()
        server.stop()


async def test_a_request_lost_in_a_server_restart_is_sent_again_on_reconnect(tmp_path):
    """A worker command (or its reply) on the wire when NATS restarts is lost; the orchestrator's request
    sends it again once reconnected instead of waiting out its whole timeout (minutes for a prewarm)."""
    from tests.conftest import NatsServer

    server = NatsServer(tmp_path)
    server.start()
    nc = None
    try:
        nc = await bus.connect(server.url, "resend-on-reconnect")
        seen: list[bytes] = []
        first_arrived = asyncio.Event()

        async def responder(msg):  # drops the first copy, as if the outage ate it; answers any later one
            seen.append(msg.data)
            if len(seen) == 1:
                first_arrived.set()
                return
            await bus.reply(nc, msg, AdminReply(ok=True, result=AdminRequest.decode(msg.data).args["x"] * 2))

        await nc.subscribe("warmserve.test.once", cb=responder)
        request = asyncio.create_task(bus.request(nc, "warmserve.test.once", AdminRequest(args={"x": 4}), AdminReply,
                                                  timeout=60, resend_on_reconnect=True))
        await asyncio.wait_for(first_arrived.wait(), 5)
        server.stop()
        server.start()
        reply = await asyncio.wait_for(request, 20)  # long before the request's own 60 s
        assert reply.result == 8
        assert len(seen) >= 2 and len(set(seen)) == 1  # the very same message (same id), sent again
    finally:
        if nc is not None:
            await nc.close()
        server.stop()


async def test_a_stream_request_over_max_payload_is_refused_before_it_is_sent(nc):
    """nats-py checks the payload against max_payload, nats-server the payload and headers together, and it
    drops the publisher's connection (every request on it) over a message beyond. request_stream measures
    both: a message of exactly max_payload is served, one byte more is refused and the connection stays."""
    seen = []

    async def responder(msg):
        seen.append(len(msg.data))
        await bus.reply(nc, msg, InferChunk(request_id="r", seq=0, finish_reason="stop"))

    sub = await nc.subscribe("warmserve.test.big", cb=responder)
    headers_bytes = bus.message_size(b"", bus.inject_headers())
    base = len(InferRequest(request_id="r", model="m", prompt="").encode()) + headers_bytes

    def request(size: int) -> InferRequest:  # multi-byte text (2, 3 and 4 bytes a character), then ASCII
        text = "é€😀" * ((size - base) // 9)
        return InferRequest(request_id="r", model="m", prompt=text + "x" * (size - base - len(text.encode())))

    def stream(size: int):
        msg = request(size)
        assert bus.message_size(msg.encode(), bus.inject_headers()) == size
        return bus.request_stream(nc, "warmserve.test.big", msg, InferChunk, first_timeout=5, idle_timeout=5,
                                  is_last=lambda c: c.last)

    assert [c.finish_reason async for c in stream(nc.max_payload)] == ["stop"]
    with pytest.raises(bus.BusError) as exc:
        async for _ in stream(nc.max_payload + 1):
            pass
    assert exc.value.code == "too_large" and str(nc.max_payload) in str(exc.value)
    assert [c.finish_reason async for c in stream(nc.max_payload)] == ["stop"]  # the connection is still up
    assert nc.is_connected and len(seen) == 2
    await sub.unsubscribe()
