"""Small helpers the integration and end-to-end tests share."""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(check, timeout: float = 25.0, what: str = "a condition", every: float = 0.2):
    """Call ``check()`` (awaiting it if it is a coroutine function's) until it returns something truthy (and
    return it), or fail naming ``what``. Wait on this, never on a fixed sleep: a slow machine only waits longer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def request_raw(nc, subject: str, data: bytes, timeout: float):
    """A request with raw bytes (a malformed message on purpose) and its reply. Unlike ``nc.request`` it
    uses ``bus.reply_inbox``: a worker answers only into inboxes addressed to it."""
    import nats.errors

    from shared import bus

    inbox = bus.reply_inbox(nc, subject)
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=inbox)
        msg = await sub.next_msg(timeout=timeout)
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass
    if msg.headers and msg.headers.get(bus.STATUS_HEADER) == "503":
        raise nats.errors.NoRespondersError
    return msg


async def flushed(nc) -> None:
    """``nc.flush()``, but only once what the client has queued is written: nats-py 2.16's flush writes its
    PING straight to the socket, ahead of commands still queued for its flusher task, so ``subscribe()`` then
    ``flush()`` can return before the server has the subscription (a request right after then gets "no
    responders", about once in 30 to 300 tries)."""
    await nc._flush_pending(force_flush=True)  # waits until the flusher has written the queue
    await nc.flush()
