"""The gateway's shutdown: requests in flight finish, or end with a clear error.

uvicorn waits a grace period for open responses and then cancels them, which a client sees as a cut
connection. The gateway cuts them itself a little earlier, so each gets a 503 (or, once streaming,
an error event) that says to retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from typing import TypeVar

from services.gateway.errors import ApiError

T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self._cut: asyncio.Future[None] | None = None

    def _future(self) -> asyncio.Future[None]:
        if self._cut is None:
            self._cut = asyncio.get_running_loop().create_future()
        return self._cut

    def begin(self, cut_after_s: float) -> None:
        """Shutdown has begun: requests still running after ``cut_after_s`` are ended."""
        if self.draining:
            return
        self.draining = True
        cut = self._future()
        asyncio.get_running_loop().call_later(max(cut_after_s, 0.0), lambda: cut.done() or cut.set_result(None))

    async def unless_cut(self, aw: Awaitable[T]) -> T:
        """``aw``, unless the cut comes first: then it is cancelled and a 503 ``gateway_shutdown`` raised."""
        if self._future().done():  # nothing new starts after the cut
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _shutting_down()
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait((task, self._future()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut = not task.done()  # the cut came (or our caller was cancelled: the client left)
            if cut:
                task.cancel()
                with suppress(BaseException):
                    await task
        if cut:
            raise _shutting_down()
        return task.result()


def _shutting_down() -> ApiError:
    return ApiError(503, "The gateway is shutting down; retry the request", code="gateway_shutdown",
                    headers={"Retry-After": "1"})
