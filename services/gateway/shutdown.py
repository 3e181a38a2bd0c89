"""The gateway's shutdown: requests in flight finish, or end with a clear error.

uvicorn waits a grace period for open responses and then cancels them, which a client sees as a cut
connection. The gateway cuts them itself a little earlier, so each gets a 503 (or, once streaming,
an error event) that says to retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from services.gateway.errors import ApiError

T = TypeVar("T")


class Drain:
    """The cut is a cancellation of the tasks waiting in ``unless_cut`` at that moment, told apart from any
    other (a client that left) by ``_cutting``: no task nor wait per call, which is once per streamed chunk."""

    def __init__(self) -> None:
        self.draining = False
        self._cut = False
        self._waiting: dict[asyncio.Task, int] = {}  # tasks inside unless_cut (nested calls counted)
        self._cutting: set[asyncio.Task] = set()

    def begin(self, cut_after_s: float) -> None:
        """Shutdown has begun: requests still running after ``cut_after_s`` are ended."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(max(cut_after_s, 0.0), self._cut_now)

    def _cut_now(self) -> None:
        self._cut = True
        for task in self._waiting:
            if task not in self._cutting:
                self._cutting.add(task)
                task.cancel()

    async def unless_cut(self, aw: Awaitable[T]) -> T:
        """``aw``, unless the cut comes first: then it is cancelled and a 503 ``gateway_shutdown`` raised."""
        if self._cut:  # nothing new starts after the cut
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _shutting_down()
        task = asyncio.current_task()
        self._waiting[task] = self._waiting.get(task, 0) + 1
        try:
            result = await aw
        except asyncio.CancelledError:
            if task in self._cutting and task.uncancel() == 0:  # our cut, and nobody else's cancel
                raise _shutting_down() from None
            raise
        else:
            if task in self._cutting:  # the work swallowed the cut's cancellation: still a cut
                task.uncancel()
                raise _shutting_down()
            return result
        finally:
            left = self._waiting.pop(task) - 1
            if left:
                self._waiting[task] = left
            else:
                self._cutting.discard(task)


def _shutting_down() -> ApiError:
    return ApiError(503, "The gateway is shutting down; retry the request", code="gateway_shutdown",
                    headers={"Retry-After": "1"})
