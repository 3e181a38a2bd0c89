"""Small helpers the integration and end-to-end tests share."""

from __future__ import annotations

import asyncio
import time


async def eventually(check, timeout: float = 25.0, what: str = "a condition", every: float = 0.2):
    """Await ``check()`` until it returns something truthy (and return it), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
