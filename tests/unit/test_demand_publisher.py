"""The gateway's demand samples while NATS is away: kept (bounded), then published with their own times."""

import asyncio
import time

import nats.errors

from services.gateway.demand import DemandPublisher
from shared.messages import DemandSample


class FakeJetStream:
    """``js.publish`` that fails while ``down`` and records what it stored (with the message id)."""

    def __init__(self):
        self.down = False
        self.stored: list[tuple[str, DemandSample, str]] = []

    async def publish(self, subject, payload, headers=None, **_):
        if self.down:
            raise nats.errors.TimeoutError
        self.stored.append((subject, DemandSample.decode(payload), headers["Nats-Msg-Id"]))


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def tick(pub: DemandPublisher, clock: Clock, arrivals: int = 1) -> None:
    """One second of traffic, then the publisher's interval closes."""
    for _ in range(arrivals):
        pub.arrive("m")
        pub.complete("m")
    clock.t += 1.0
    pub.buffer(pub.samples())


def test_samples_of_an_outage_are_published_once_nats_is_back_with_their_own_times():
    clock, js = Clock(), FakeJetStream()
    pub = DemandPublisher("gw-1", 1.0, clock=clock)
    tick(pub, clock)
    assert asyncio.run(pub.flush(js)) and len(js.stored) == 1
    js.down = True
    for _ in range(5):
        tick(pub, clock, arrivals=2)
        assert not asyncio.run(pub.flush(js))
    assert len(pub.pending) == 5 and len(js.stored) == 1  # kept, nothing lost
    js.down = False
    tick(pub, clock)
    assert asyncio.run(pub.flush(js)) and not pub.pending
    starts = [s.start_s for _, s, _ in js.stored]
    assert starts == [1000.0 + i for i in range(7)]  # oldest first, each with the second it describes
    assert [s.arrivals for _, s, _ in js.stored] == [1, 2, 2, 2, 2, 2, 1]
    assert js.stored[3][2] == "gw-1:m:1003.000"  # the id a retried publish is deduplicated by
    assert {subject for subject, _, _ in js.stored} == {"warmserve.demand.m"}


def test_the_buffer_is_bounded_and_drops_the_oldest_counting_them():
    clock, js = Clock(), FakeJetStream()
    drops: list[int] = []
    pub = DemandPublisher("gw-1", 1.0, clock=clock, buffer_max=3, on_drop=drops.append)
    js.down = True
    for _ in range(5):
        tick(pub, clock)
    assert [s.start_s for s in pub.pending] == [1002.0, 1003.0, 1004.0]
    assert pub.dropped == 2 and sum(drops) == 2
    js.down = False
    assert asyncio.run(pub.flush(js))
    assert [s.start_s for _, s, _ in js.stored] == [1002.0, 1003.0, 1004.0]


def test_run_keeps_samples_while_disconnected_without_trying_to_publish():
    clock, js = Clock(), FakeJetStream()
    pub = DemandPublisher("gw-1", 0.01, clock=clock)
    connected = {"now": False}
    attempts = []
    real_publish = js.publish

    async def counting(*a, **kw):
        attempts.append(1)
        await real_publish(*a, **kw)
    js.publish = counting

    async def scenario():
        task = asyncio.create_task(pub.run(js, lambda: connected["now"]))
        try:
            deadline = time.monotonic() + 10
            while len(pub.pending) < 3 and time.monotonic() < deadline:  # traffic while NATS is away
                pub.arrive("m")
                clock.t += 0.5
                await asyncio.sleep(0.005)
            assert len(pub.pending) >= 3 and not attempts  # kept, and no publish waited out its timeout
            connected["now"] = True
            deadline = time.monotonic() + 10
            while (pub.pending or not js.stored) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
    asyncio.run(scenario())
    assert not pub.pending and len(js.stored) >= 3
