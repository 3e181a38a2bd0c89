"""The gateway's shutdown cut: work finishes if it can, is cancelled with a clear 503 if it cannot."""

import asyncio

import pytest

from services.gateway.errors import ApiError
from services.gateway.shutdown import Drain


def endless_work() -> tuple:
    """Work that never ends by itself, and an event set once its cleanup has run."""
    cleaned_up = asyncio.Event()

    async def work():
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.set()

    return work(), cleaned_up


async def test_work_that_ends_in_time_returns_its_result():
    drain = Drain()
    drain.begin(cut_after_s=1.0)
    assert drain.draining
    assert await drain.unless_cut(asyncio.sleep(0.01, result="done")) == "done"


async def test_work_still_running_at_the_cut_is_cancelled_with_a_503():
    drain = Drain()
    work, cancelled = endless_work()
    drain.begin(cut_after_s=0.05)
    with pytest.raises(ApiError) as exc:
        await asyncio.wait_for(drain.unless_cut(work), 5)
    assert exc.value.status == 503 and exc.value.code == "gateway_shutdown"
    assert exc.value.headers["Retry-After"] == "1"
    assert cancelled.is_set()  # its cleanup ran before the error was raised


async def test_after_the_cut_nothing_new_runs():
    drain = Drain()
    drain.begin(cut_after_s=0.0)
    await asyncio.sleep(0.01)
    ran = []

    async def work():
        ran.append(1)
        await asyncio.sleep(1)

    with pytest.raises(ApiError):
        await drain.unless_cut(work())
    assert ran == []


async def test_errors_of_the_work_pass_through_and_no_cut_without_a_shutdown():
    drain = Drain()

    async def fails():
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await drain.unless_cut(fails())
    assert not drain.draining and await drain.unless_cut(asyncio.sleep(0.01, result=1)) == 1


async def test_a_cancelled_caller_cancels_the_work():
    drain = Drain()
    work, cancelled = endless_work()
    caller = asyncio.ensure_future(drain.unless_cut(work))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cancelled.is_set()
