"""A 3-server NATS cluster on loopback (tooling/localcluster/nats_cluster.py): streams and buckets with 3
replicas stay available when one server dies, clients fail over to the others, the leader lease holds."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import bus
from shared.leader import run_elected
from shared.messages import DemandSample, WorkerState
from shared.settings import PlacementSettings
from shared.subjects import BUCKETS, DEMAND, PLACEMENT, STREAMS, WORKERS_BUCKET
from tests.helpers import eventually
from tooling.localcluster.nats_cluster import NatsCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = NatsCluster(tmp_path_factory.mktemp("nats-cluster"), n=3)
    c.start()
    yield c
    c.stop()


async def test_streams_and_buckets_survive_a_server_and_clients_fail_over(cluster):
    nc = await bus.connect(cluster.urls(), "cluster-test")
    js = nc.jetstream()
    buckets = await bus.ensure_all(js, replicas=3)
    for spec in STREAMS:
        info = await js.stream_info(spec.name)
        assert info.config.num_replicas == 3, spec.name
    for spec in BUCKETS:
        assert (await js.stream_info(f"KV_{spec.name}")).config.num_replicas == 3, spec.name
    kv = buckets[WORKERS_BUCKET.name]
    state = WorkerState(worker_id="w-1", node="n", device="cpu:0", engine="sim", started_at_s=1.0,
                        heartbeat_at_s=1.0, memory_budget_bytes=1)
    await kv.put("w-1", state.encode())
    sample = DemandSample(model="m", gateway_id="g", start_s=1.0, interval_s=1.0, arrivals=1, completions=1,
                          concurrency_avg=1.0, concurrency_peak=1)
    await bus.js_publish(js, DEMAND.format(model="m"), sample, msg_id="before")

    victim = next(i for i, s in enumerate(cluster.servers) if f":{s.client_port}" in str(nc.connected_url))
    cluster.kill(victim)
    try:
        async def writes_land():  # once the client has reconnected and the streams have a leader
            try:
                await kv.put("w-1", state.model_copy(update={"heartbeat_at_s": 2.0}).encode())
                await bus.js_publish(js, DEMAND.format(model="m"), sample, msg_id="after")
                return True
            except Exception:
                return False

        started = time.monotonic()
        await eventually(writes_land, timeout=30, every=0.2, what="writes after a server's death")
        assert time.monotonic() - started < 15
        assert f":{cluster.servers[victim].client_port}" not in str(nc.connected_url)
        assert WorkerState.decode((await kv.get("w-1")).value).heartbeat_at_s == 2.0

        async def demand_messages():  # the stream-names API waits on JetStream's meta leader, elected apart
            try:
                stream = await js.find_stream_name_by_subject(DEMAND.format(model="m"))
                return (await js.stream_info(stream)).state.messages
            except Exception:
                return 0
        assert await eventually(demand_messages, timeout=30, what="the demand stream's info") >= 2
    finally:
        cluster.start(victim)  # it rejoins and catches up (its /healthz waits for that)
    await bus.close(nc)


async def test_the_leader_lease_holds_across_a_server_death(cluster):
    """The leader may change when its server dies, but there is always at most one, and soon one again."""
    terms: list[tuple[str, int]] = []
    running: dict[str, bool] = {}

    def replica(name: str):
        async def body(ended: asyncio.Event, term) -> None:
            terms.append((name, term.epoch))
            assert not any(running.values()), f"{name} leads while {running} does"
            running[name] = True
            try:
                await ended.wait()
            finally:
                running[name] = False
        settings = PlacementSettings(nats_url=cluster.urls(PLACEMENT), leader_lease_s=3.0, replica_id=name,
                                     nats_replicas=3)
        stop = asyncio.Event()
        return stop, asyncio.create_task(run_elected(PLACEMENT, settings, body, stop))

    stops = [replica("a"), replica("b")]
    killed = False
    try:
        await eventually(lambda: any(running.values()), timeout=30, what="a leader")
        cluster.kill(0)
        killed = True
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:  # at most one leader throughout (the body asserts it)
            await asyncio.sleep(0.1)
        await eventually(lambda: any(running.values()), timeout=15, what="a leader after the server's death")
        assert [e for _, e in terms] == sorted(e for _, e in terms), "epochs only grow"
    finally:
        if killed:
            cluster.start(0)
        for stop, task in stops:
            stop.set()
        results = await asyncio.gather(*(t for _, t in stops), return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
