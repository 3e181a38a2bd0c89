"""Liveness and leaks with real services on a real nats-server: readers judge a worker's liveness on their own
clock, not the worker's; mirrors forget the entries of workers that went away; a worker stops a generation
nobody listens to any more."""

import asyncio
import contextlib
import time
from dataclasses import replace

import pytest

from services.gateway.admission_core import AdmissionCore
from services.gateway.app import Gateway
from services.gateway.routing import RoutingTable
from services.gpu_worker.main import WorkerService
from shared import bus, watch
from shared.messages import (
    CommandKind, CommandResult, InferChunk, InferRequest, ModelSpec, SamplingParams, WorkerCommand, WorkerState,
)
from shared.model_folder import max_context, weight_bytes
from shared.service import seen_workers
from shared.policy.routing import Route
from shared.settings import GatewaySettings, WorkerSettings
from shared.subjects import CATALOG_BUCKET, INFER, PING, WORKER_CMD, WORKERS_BUCKET
from tests.helpers import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def spec(tiny_model):
    return ModelSpec(slug="tiny", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model))


async def command(nc, wid, kind, model, spec=None):
    cmd = WorkerCommand(kind=kind, model=model, spec=spec)
    return await bus.request(nc, WORKER_CMD.format(worker=wid), cmd, CommandResult, timeout=20)


@contextlib.asynccontextmanager
async def gateway_watching(nats_url, nc):
    """A gateway shell with live mirrors of the workers and the catalog (no HTTP server): what a stream's
    liveness checks use. Heartbeats every 0.2 s, stale after 1 s."""
    buckets = await bus.ensure_all(nc.jetstream())
    workers = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
    catalog = watch.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
    gw = Gateway(GatewaySettings(nats_url=nats_url, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0))
    gw.nc, gw.table = nc, RoutingTable(catalog, workers, 1.0, AdmissionCore(queue_size=4))
    try:
        yield gw
    finally:
        for mirror in (workers, catalog):
            await mirror.stop()


@contextlib.asynccontextmanager
async def running_worker(nats_url, wid, clock=time.time, **settings):
    """A sim worker service in this process, answering commands, with its own wall clock."""
    service = WorkerService(WorkerSettings(**{"nats_url": nats_url, "worker_id": wid, "engine": "sim",
                                              "memory_budget_bytes": 512 * 2**20, "kv_cache_bytes": 64 * 2**20,
                                              "heartbeat_interval_s": 0.2, **settings}), clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: _answers(nats_url, wid), timeout=10, every=0.05, what=f"{wid} answering commands")
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)


async def _answers(nats_url, wid) -> bool:
    probe = await bus.connect(nats_url, "svc-test-probe")
    try:
        await probe.request(WORKER_CMD.format(worker=wid), b"{}", timeout=1)
        return True
    except Exception:
        return False
    finally:
        await probe.close()


async def test_liveness_is_judged_on_the_readers_clock_not_the_workers(nats_url, nc, spec):
    """A worker whose clock is a minute behind is visible and routable; one a minute ahead is declared dead
    within the heartbeat timeout once it stops, by a mirror that watched it and by one started afterwards
    (which reads the server's timestamp of its last state)."""
    js = nc.jetstream()
    buckets = await bus.ensure_all(js)
    await buckets[CATALOG_BUCKET.name].put("tiny", spec.encode())
    workers = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
    catalog = watch.KvMirror(buckets[CATALOG_BUCKET.name], ModelSpec).start()
    table = RoutingTable(catalog, workers, 2.0, AdmissionCore(queue_size=4))
    later = None
    try:
        async with running_worker(nats_url, "skew-behind", clock=lambda: time.time() - 60) as behind, \
                running_worker(nats_url, "skew-ahead", clock=lambda: time.time() + 60) as ahead:
            assert (await command(nc, "skew-behind", CommandKind.ACTIVATE, "tiny", spec)).ok

            async def routable():
                route = table.try_route("tiny")
                live = {w.worker_id for w in seen_workers(workers, 2.0)}
                return route if route and {"skew-behind", "skew-ahead"} <= live else None

            route = await eventually(routable, timeout=10, what="both skewed workers live and one routable")
            assert route.worker_id == "skew-behind"

            async def silent():  # the ahead worker hangs: it heartbeats no more (its entry stays)
                pass
            ahead.publish_state = silent

            async def ahead_gone():
                live = {w.worker_id for w in seen_workers(workers, 2.0)}
                return "skew-ahead" not in live and "skew-behind" in live and not table.alive(
                    replace(route, worker_id="skew-ahead", incarnation=ahead.started_at))
            await eventually(ahead_gone, timeout=15, what="the worker with a clock ahead declared dead")
            later = watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).start()
            await asyncio.wait_for(later.ready.wait(), 10)
            assert "skew-ahead" in later.items  # its last state is still stored
            assert [w.worker_id for w in seen_workers(later, 2.0)] == ["skew-behind"]
            assert behind.worker.in_flight == 0
    finally:
        for mirror in (workers, catalog, later):
            if mirror is not None:
                await mirror.stop()
        await buckets[CATALOG_BUCKET.name].delete("tiny")


async def test_a_generation_nobody_listens_to_stops_without_a_cancel(nats_url, nc, spec):
    """The requester drops its inbox and its cancel is lost (none is sent here): the worker notices that
    nobody listens and stops within a few seconds, not after the 40 s its ``max_tokens`` take. A requester
    that listens gets every token (probing does not end live streams)."""
    slow = spec.model_copy(update={"slug": "slow", "parameter_bytes": 27 * 2**29,  # 13.5 GiB: 20 ms a token
                                   "max_context_tokens": 8192})
    async with running_worker(nats_url, "svc-nolistener", memory_budget_bytes=32 * 2**30) as svc:
        assert (await command(nc, "svc-nolistener", CommandKind.ACTIVATE, "slow", slow)).ok
        subject = INFER.format(worker="svc-nolistener")
        listened = asyncio.ensure_future(_collect(nc, subject, InferRequest(
            model="slow", prompt="stay", sampling=SamplingParams(max_tokens=250, seed=1))))  # about 5 s
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        abandoned = InferRequest(model="slow", prompt="go", sampling=SamplingParams(max_tokens=2000, seed=2))
        await nc.publish(subject, abandoned.encode(), reply=inbox)
        first = InferChunk.decode((await sub.next_msg(timeout=10)).data)
        assert first.error is None and not first.last
        await sub.unsubscribe()  # the requester is gone; no cancel follows
        await eventually(lambda: _async(abandoned.request_id not in svc._requests), timeout=15, every=0.1,
                         what="the worker to stop the generation nobody listens to")
        chunks = await asyncio.wait_for(listened, 30)
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 250
        await eventually(lambda: _async(svc.worker.in_flight == 0), timeout=5, what="nothing in flight")


async def _async(value):
    return value


async def _collect(nc, subject, req):
    return [c async for c in bus.request_stream(nc, subject, req, InferChunk, first_timeout=10, idle_timeout=10,
                                                is_last=lambda c: c.last)]


async def test_mirrors_forget_the_entries_of_workers_that_went_away(nc):
    """Ephemeral worker ids: each heartbeats a little and goes away without deleting its entry (a lost
    machine, a killed pod). A mirror drops an entry once it has been silent for its expiry (by default the
    bucket's TTL, when the server has dropped it too), so what every request scans stays bounded."""
    js = nc.jetstream()
    buckets = await bus.ensure_all(js)
    assert watch.KvMirror(buckets[WORKERS_BUCKET.name], WorkerState).expire_after_s == WORKERS_BUCKET.ttl_s
    kv = await js.create_key_value(bucket="test-ephemeral-workers", history=1)
    mirror = watch.KvMirror(kv, WorkerState, expire_after_s=1.0).start()

    def state(wid):
        return WorkerState(worker_id=wid, node="n", device="cpu:0", engine="sim", memory_budget_bytes=1,
                           heartbeat_at_s=time.time()).encode()

    async def steady():  # one worker that stays
        while True:
            await kv.put("steady", state("steady"))
            await asyncio.sleep(0.2)

    beating = asyncio.ensure_future(steady())
    try:
        await asyncio.wait_for(mirror.ready.wait(), 5)
        peak = 0
        for i in range(60):  # each comes, heartbeats twice and is gone
            for _ in range(2):
                await kv.put(f"eph-{i}", state(f"eph-{i}"))
            await asyncio.sleep(0.02)
            peak = max(peak, len(mirror.items))
        assert peak > 10  # they were there

        async def only_steady():
            return set(mirror.items) == set(mirror.seen_at) == {"steady"} and set(mirror._heard_at) <= {"steady"}
        await eventually(only_steady, timeout=10, every=0.1, what="the mirror to forget the workers that left")
    finally:
        beating.cancel()
        await mirror.stop()
        await js.delete_key_value("test-ephemeral-workers")


async def test_a_worker_whose_heartbeat_lags_keeps_its_streams_while_it_answers_pings(nats_url, nc):
    """The heartbeat path can lag behind a worker that runs (its KV writes held up on a loaded host): a
    gateway waiting on a silent stream then asks the worker itself, and ends the stream only when no process
    answers, or another process of that worker does (a restart)."""
    async with gateway_watching(nats_url, nc) as gw:
        async with running_worker(nats_url, "lagging") as lagging:
            route = Route("lagging", "i-1", 0, incarnation=lagging.started_at)
            await eventually(lambda: gw.table.alive(route), timeout=10, what="the worker's heartbeat seen")

            async def held_up():
                pass  # its writes to the workers bucket stop arriving; the worker itself runs on
            lagging.publish_state = held_up
            await eventually(lambda: not gw.table.alive(route), timeout=10, what="its heartbeat stale")
            assert await gw.still_serving(route)  # it answers: the stream waits on
            assert not await gw.still_serving(replace(route, incarnation=lagging.started_at - 1))  # another process

        async def gone():  # stopped: nobody listens any more (once its last answer is a heartbeat timeout old)
            return not await gw.still_serving(route)
        await eventually(gone, timeout=5, what="the stopped worker called lost")

        async def never_answer(msg):
            pass  # a stopped process: subscribed, silent
        stuck = await nc.subscribe(PING.format(worker="lagging"), cb=never_answer)
        try:
            started = time.monotonic()
            assert not await gw.still_serving(replace(route, incarnation=route.incarnation + 1))
            assert time.monotonic() - started < 2.0  # within about a heartbeat interval
        finally:
            await stuck.unsubscribe()


async def test_a_worker_stops_though_its_heartbeat_swallows_a_cancellation(nats_url):
    """nats-py's flush swallows a CancelledError: a heartbeat cancelled inside it ran on, and the worker's
    shutdown waited for it forever (until its supervisor killed it)."""
    inside = asyncio.Event()
    async with running_worker(nats_url, "stubborn") as worker:
        async def publish_in_flush():
            inside.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as nats-py's _flush_pending does
        worker.publish_state = publish_in_flush
        await asyncio.wait_for(inside.wait(), 10)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 15  # running_worker's exit waited for the whole shutdown


async def test_a_request_the_worker_does_not_have_is_called_lost_even_with_a_fresh_heartbeat(nats_url, nc):
    """A request (or its last chunk) lost on the way, as with a NATS server that dies holding it: the worker
    heartbeats, but asked about that request it says it has none, and the stream ends instead of waiting out
    the token timeout. A request it has keeps its stream."""
    async with gateway_watching(nats_url, nc) as gw:
        async with running_worker(nats_url, "forgetful") as worker:
            route = Route("forgetful", "i-1", 0, incarnation=worker.started_at)
            await eventually(lambda: gw.table.alive(route), timeout=10, what="the worker's heartbeat seen")
            assert not await gw.still_serving(route, "never-sent"), "a request the worker never got is lost"
            held = asyncio.Event()
            worker._requests["in-flight"] = asyncio.ensure_future(held.wait())  # one it is serving
            try:
                assert await gw.still_serving(route, "in-flight")
            finally:
                held.set()
                worker._requests.pop("in-flight")
            assert gw.table.alive(route), "the heartbeat was fresh throughout"


async def test_a_watch_whose_consumer_is_lost_is_noticed_and_renewed(nc, caplog):
    """A KV watch's consumer lost on the server while the connection stays up (it lived on a NATS server that
    died) delivers nothing more, silently: the mirror sees the bucket move past what it delivered and watches
    afresh, counting the gap as blind (not as its writers' silence)."""
    js = nc.jetstream()
    kv = await js.create_key_value(bucket="test-stalled-watch", history=1)
    mirror = watch.KvMirror(kv, WorkerState, expire_after_s=0).start()

    def state(wid, at):
        return WorkerState(worker_id=wid, node="n", device="cpu:0", engine="sim", memory_budget_bytes=1,
                           heartbeat_at_s=at).encode()
    try:
        await kv.put("w", state("w", 1.0))
        await eventually(lambda: "w" in mirror.items, timeout=5, what="the first value")
        for consumer in await js.consumers_info("KV_test-stalled-watch"):  # the watch's consumer is gone
            await js.delete_consumer("KV_test-stalled-watch", consumer.name)
        lost_at = time.time()
        await kv.put("w", state("w", 2.0))
        await eventually(lambda: mirror.items["w"].heartbeat_at_s == 2.0, timeout=10, every=0.1,
                         what="the value written after the consumer was lost")
        assert time.time() - lost_at < 5, "noticed within a few stall checks, not after heartbeats time out"
        assert any("stalled" in r.message for r in caplog.records)
        assert any(start <= lost_at + watch.KvMirror.STALL_CHECK_S for start, _ in mirror.blind())
    finally:
        await mirror.stop()
        await js.delete_key_value("test-stalled-watch")


async def test_an_ask_for_an_instance_lost_with_its_orchestrator_is_given_up_and_asked_again(nats_url, nc):
    """The orchestrator leader that took an ask died with it (its node went): the gateway's ask gives up after
    SCALE_ASK_S, not the whole queue wait, and the next ask reaches the new leader."""
    from services.gateway.app import SCALE_ASK_S
    from shared.messages import ScaleReply, ScaleRequest
    from shared.subjects import SCALE

    gw = Gateway(GatewaySettings(nats_url=nats_url, queue_wait_s=60.0))
    gw.nc = nc
    asks: list[float] = []

    async def orchestrators(msg):  # the first ask is lost; the next leader answers
        asks.append(time.monotonic())
        if len(asks) > 1:
            await bus.reply(nc, msg, ScaleReply(ok=True, worker_id="w", instance_id="i"))
    sub = await nc.subscribe(SCALE.wildcard, queue="orchestrator", cb=orchestrators)
    try:
        req = ScaleRequest(model="m", reason="no_instance", waiting=1)
        started = time.monotonic()
        with pytest.raises(bus.BusError):
            await gw._scale(req)
        assert SCALE_ASK_S - 0.5 <= time.monotonic() - started < SCALE_ASK_S + 2
        assert (await gw._scale(req)).ok
    finally:
        await sub.unsubscribe()


async def test_a_stream_subscription_whose_consumer_is_lost_is_renewed(nc, caplog):
    """The orchestrator's demand subscription lost its consumer with a NATS server while its connection stayed
    up: it delivered nothing more, and the autoscaler took the silence for zero load. A Follower notices the
    consumer is gone and subscribes again."""
    from nats.js.api import DeliverPolicy

    js = nc.jetstream()
    await js.add_stream(name="TEST_FOLLOW", subjects=["test.follow.*"])
    got: list[bytes] = []

    async def on_msg(msg):
        got.append(msg.data)
    follower = await watch.follow(js, "test.follow.*", on_msg, DeliverPolicy.NEW)
    try:
        await js.publish("test.follow.a", b"1")
        await eventually(lambda: got == [b"1"], timeout=5, what="the first message")
        for consumer in await js.consumers_info("TEST_FOLLOW"):  # its consumer is gone, the connection stays
            await js.delete_consumer("TEST_FOLLOW", consumer.name)

        async def delivered_again():
            await js.publish("test.follow.a", b"2")
            return b"2" in got
        await eventually(delivered_again, timeout=10, every=1.0, what="messages delivered after the loss")
        assert follower.renewals >= 1 and any("stalled" in r.message for r in caplog.records)
    finally:
        await follower.stop()
        await js.delete_stream("TEST_FOLLOW")
