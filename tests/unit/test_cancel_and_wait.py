"""Stopping a service's loops when one of them ignores a cancellation, as a loop publishing through nats-py
can (its flush swallows a CancelledError)."""

import asyncio

from shared.tasks import cancel_and_wait


async def test_a_loop_that_swallows_one_cancellation_still_stops():
    swallowed, stubborn = asyncio.Event(), [True]

    async def publishing_loop():
        while stubborn[0]:
            try:
                await asyncio.sleep(3600)  # a publish in flight when the cancel lands
            except asyncio.CancelledError:
                swallowed.set()  # what nats-py's flush does with it

    task = asyncio.create_task(publishing_loop())
    await asyncio.sleep(0)
    task.cancel()  # one cancel, as a plain cancel-then-gather gives: the loop runs on
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done and swallowed.is_set()

    async def loop_that_gives_in():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # swallowed once
        await asyncio.sleep(3600)  # the next await takes the next cancel

    other = asyncio.create_task(loop_that_gives_in())
    await asyncio.sleep(0)
    assert await cancel_and_wait([other], timeout_s=5, every_s=0.05) == []
    assert other.cancelled()

    # one that never gives in is reported once the time is up, instead of waiting forever
    assert await cancel_and_wait([task], timeout_s=0.3, every_s=0.05) == [task]
    stubborn[0] = False
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.done()


async def test_a_follower_stops_when_its_consumer_request_swallows_the_cancel():
    """A Follower's stop hung a test for 300 s: the cancel landed in nats-py's consumer-info request, which
    swallowed it, and the watch loop slept on with its task 'cancelling'."""
    from nats.js.api import DeliverPolicy

    from shared.watch import Follower

    swallowed = asyncio.Event()

    class Sub:
        async def consumer_info(self):
            try:
                await asyncio.sleep(3600)  # the request in flight when the cancel lands
            except asyncio.CancelledError:
                swallowed.set()
                raise TimeoutError("nats: timeout") from None  # nats-py's answer instead of the cancel

        async def unsubscribe(self):
            pass

    class JetStream:
        async def subscribe(self, *args, **kwargs):
            return Sub()

    follower = Follower(JetStream(), "s.*", lambda msg: None, DeliverPolicy.NEW)
    follower.STALL_CHECK_S = 0.01
    await follower.start()
    await asyncio.sleep(0.1)  # in consumer_info
    await asyncio.wait_for(follower.stop(timeout_s=5), 10)
    assert swallowed.is_set() and follower._task.done()
