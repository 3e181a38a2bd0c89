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


async def seed_serving(js, model: str, worker: str, instance_id: str, *, batch_capacity: int = 32,
                       max_context_tokens: int = 512):
    """A gateway's view of a cluster with no cluster behind it: ``model`` in the catalog and one live ``worker``
    with an active instance of it (the test answers that worker's inference subject itself). Returns the
    catalog, workers and API keys buckets (for the test's keys, and to clean up)."""
    from shared import bus
    from shared.messages import CopyState, ModelCopy, ModelSpec, WorkerState
    from shared.subjects import APIKEYS_BUCKET, CATALOG_BUCKET, WORKERS_BUCKET

    buckets = await bus.ensure_all(js)
    await buckets[CATALOG_BUCKET.name].put(model, ModelSpec(slug=model, path="/nowhere", parameter_bytes=1,
                                                            max_context_tokens=max_context_tokens).encode())
    now = time.time()
    await buckets[WORKERS_BUCKET.name].put(worker, WorkerState(
        worker_id=worker, node="n", device="cpu:0", engine="sim", memory_budget_bytes=1, heartbeat_at_s=now,
        started_at_s=now, batch_capacity=batch_capacity,
        copies=[ModelCopy(model=model, state=CopyState.ACTIVE, weight_bytes=1, instance_id=instance_id)]).encode())
    return tuple(buckets[b.name] for b in (CATALOG_BUCKET, WORKERS_BUCKET, APIKEYS_BUCKET))
