"""Ending asyncio tasks that may ignore a cancellation."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(tasks: list[asyncio.Task], timeout_s: float = 10.0,
                          every_s: float = 0.25) -> list[asyncio.Task]:
    """Cancel ``tasks`` and wait for them, cancelling again until they end or ``timeout_s`` passes; returns
    those still running. nats-py swallows a cancellation that lands in its flush (``except CancelledError:
    pass``) and turns one in a JetStream publish into an ordinary error, so a loop that publishes may ignore
    a single cancel and run on: a plain ``gather`` after one cancel then waited forever (a worker's shutdown
    hung until it was killed)."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(every_s, left))
    return list(pending)
