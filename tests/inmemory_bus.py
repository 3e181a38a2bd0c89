"""An in-memory stand-in for a NATS connection, for handler-level unit tests of the service shells (as httpx's
``MockTransport`` stands in for a server): core publish, subscribe with ``*`` / ``>`` wildcards and queue groups,
request-reply with inboxes and no-responders (a 503 status to the reply inbox). It has what ``shared.bus.request``, ``request_stream`` and
``reply`` use; JetStream, KV and reconnects are for the integration tests against a real nats-server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors

from shared.subjects import subject_matches as matches


@dataclass
class Msg:
    subject: str
    data: bytes
    reply: str = ""
    headers: dict | None = None


@dataclass
class Subscription:
    bus: InMemoryNats
    subject: str
    queue: str | None
    cb: Callable[[Msg], Awaitable[None]] | None
    pending: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def next_msg(self, timeout: float = 1.0) -> Msg:
        try:
            return await asyncio.wait_for(self.pending.get(), timeout)
        except asyncio.TimeoutError:
            raise nats.errors.TimeoutError from None

    async def unsubscribe(self) -> None:
        if self in self.bus.subs:
            self.bus.subs.remove(self)


class InMemoryNats:
    def __init__(self):
        self.subs: list[Subscription] = []
        self.published: list[Msg] = []  # everything sent, for assertions
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self.stats = {"reconnects": 0}  # never reconnects

    def new_inbox(self) -> str:
        return f"_INBOX.mem.{next(self._ids)}"

    async def subscribe(self, subject: str, queue: str | None = None, cb=None) -> Subscription:
        sub = Subscription(self, subject, queue, cb)
        self.subs.append(sub)
        return sub

    async def publish(self, subject: str, data: bytes = b"", reply: str = "", headers: dict | None = None) -> None:
        msg = Msg(subject, data, reply, headers)
        self.published.append(msg)
        groups: dict[str, list[Subscription]] = {}
        for sub in list(self.subs):
            if matches(sub.subject, subject):
                groups.setdefault(sub.queue or f"\0{id(sub)}", []).append(sub)
        if not groups and reply:  # what nats-server answers a request nobody listens to
            await self.publish(reply, b"", headers={"Status": "503"})
            return
        for members in groups.values():
            sub = members[next(self._ids) % len(members)]  # one member of a queue group
            if sub.cb is None:
                sub.pending.put_nowait(msg)
            else:
                task = asyncio.ensure_future(sub.cb(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def request(self, subject: str, data: bytes = b"", timeout: float = 1.0, headers: dict | None = None) -> Msg:
        if not any(matches(s.subject, subject) for s in self.subs):
            raise nats.errors.NoRespondersError
        inbox = self.new_inbox()
        sub = await self.subscribe(inbox)
        try:
            await self.publish(subject, data, reply=inbox, headers=headers)
            return await sub.next_msg(timeout)
        finally:
            await sub.unsubscribe()

    async def drain_tasks(self) -> None:
        """Wait for every callback started so far (and those they start)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
