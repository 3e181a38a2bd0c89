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
