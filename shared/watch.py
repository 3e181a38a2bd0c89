"""Readers that follow JetStream: ``KvMirror`` (a live copy of a KV bucket) and ``Follower`` (a stream
subscription). Both notice when what they read from stops arriving while their connection stays up (a
consumer lost with the NATS server that held it, or after a reconnect) and read afresh, and a mirror says
when it could not see (``blind``), so its readers do not take that silence for their writers' death.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Generic

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from shared.bus import M
from shared.policy.cluster import silence
from shared.subjects import BUCKETS
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Follower:
    """A subscription to a stream's messages (an ordered consumer) that renews itself when it stops
    delivering: its consumer lost with the NATS server that held it, or after a reconnect, while the stream
    has messages for it (``num_pending``) and nothing arrives for a check (``STALL_CHECK_S``). nats-py only
    notices a lost ordered consumer after missed heartbeats, if at all; meanwhile a reader sees silence
    (the orchestrator took an absent demand stream for zero load and stopped the instance serving it).
    Renewing starts again with ``deliver_policy`` (new messages, or the last per subject)."""

    STALL_CHECK_S = 1.0

    def __init__(self, js: JetStreamContext, subject: str, cb: Callable[[Msg], Awaitable[None]],
                 deliver_policy: DeliverPolicy, config: Callable[[], ConsumerConfig] | None = None):
        self.js, self.subject, self.cb, self.deliver_policy = js, subject, cb, deliver_policy
        self.config = config  # each subscription's consumer config, made afresh (a start time that moves on)
        self.delivered = 0  # messages delivered since the current subscription began
        self.renewals = 0
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> Follower:
        sub = await self._subscribe()
        self._task = asyncio.create_task(self._watch(sub), name=f"follow-{self.subject}")
        return self

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stop following; cancels again while the watch runs on (nats-py can swallow a cancellation that
        lands in a consumer request, and the loop then ran on with its task stuck "cancelling"), and gives up
        after ``timeout_s`` so a shutdown cannot hang on it."""
        self._stopping = True  # ends the loop at its next check even where every cancellation is swallowed
        if self._task is not None:
            await cancel_and_wait([self._task], timeout_s)

    async def _subscribe(self):
        self.delivered = 0

        async def on_msg(msg: Msg) -> None:
            self.delivered += 1
            await self.cb(msg)
        if self.config is not None:
            return await self.js.subscribe(self.subject, ordered_consumer=True, cb=on_msg, config=self.config())
        return await self.js.subscribe(self.subject, ordered_consumer=True, deliver_policy=self.deliver_policy,
                                       cb=on_msg)

    async def _watch(self, sub) -> None:
        owed_at: int | None = None  # deliveries counted when pending messages were first seen undelivered
        try:
            while not self._stopping:
                await asyncio.sleep(self.STALL_CHECK_S)
                try:
                    info = await sub.consumer_info()
                    pending, lost = info.num_pending, False
                except nats.js.errors.NotFoundError:
                    pending, lost = 0, True
                except Exception:  # NATS away or electing: the next check decides
                    continue
                if not lost and (not pending or owed_at is None or self.delivered > owed_at):
                    owed_at = self.delivered if pending else None
                    continue
                log.warning("subscription to %s stalled (%s); subscribing again", self.subject,
                            "its consumer is gone" if lost else f"{pending} messages not delivered")
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                while not self._stopping:
                    try:
                        sub = await self._subscribe()
                        break
                    except Exception as exc:
                        log.debug("renewing the subscription to %s failed (%s)", self.subject, exc)
                        await asyncio.sleep(self.STALL_CHECK_S)
                self.renewals += 1
                owed_at = None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def follow(js: JetStreamContext, subject: str, cb: Callable[[Msg], Awaitable[None]],
                 deliver_policy: DeliverPolicy) -> Follower:
    """Deliver ``subject``'s stream messages to ``cb``, renewing the subscription when it stalls (``Follower``)."""
    return await Follower(js, subject, cb, deliver_policy).start()


class KvMirror(Generic[M]):
    """A live local copy of a KV bucket, decoded into messages.

    Keeps watching across NATS reconnects; ``ready`` is set once the bucket's current content
    has been read. Undecodable values are logged and skipped, never fatal.

    It also says what it could not see. ``blind(now)`` lists the wall-clock intervals in which the watch
    was down (from a lost connection or a failed watch until the next snapshot was read): a reader must
    not take a writer's silence in those intervals for the writer's death. ``heard_since_resume(key)``
    says whether ``key`` was written after the current watch began, which proves its writer is connected
    to the server this reader now talks to (and, its subscriptions being restored before its writes,
    can be sent requests).

    ``seen_at[key]`` is when the current value was written as this reader knows it, on the reader's own
    clock: its receipt time for a live update; for one read from the store (a snapshot), its age on the
    server's clock subtracted from the reader's now (``snapshot_seen_at``). Liveness is judged on it, never on
    a time the writer or the server put in a value (either clock may be off). An entry silent for longer than ``expire_after_s`` while the mirror watched (default: the
    bucket's TTL, after which the server has dropped it from the store too; expiry sends watchers nothing)
    is dropped, so entries of writers that went away (ephemeral worker ids) do not pile up in every mirror.
    """

    MAX_BLIND_INTERVALS = 64  # older outages no longer matter to anyone's heartbeat
    STALL_CHECK_S = 1.0  # how often a watch is checked against the bucket's last revision

    def __init__(self, kv: KeyValue, value_type: type[M],
                 on_change: Callable[[], Awaitable[None] | None] | None = None,
                 clock: Callable[[], float] = time.time, expire_after_s: float | None = None):
        self._kv = kv
        self._type = value_type
        self._on_change = on_change
        self._clock = clock
        if expire_after_s is None:
            expire_after_s = next((b.ttl_s for b in BUCKETS if b.name == getattr(kv, "_name", None)), None)
        self.expire_after_s = expire_after_s
        self.items: dict[str, M] = {}
        self.seen_at: dict[str, float] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._expiry: asyncio.Task | None = None
        self._blind: list[tuple[float, float]] = []
        self._blind_since: float | None = None  # the watch is down since then (None: watching)
        self._resumed_at = float("inf")  # when the current watch's snapshot was read
        self._heard_at: dict[str, float] = {}  # key -> when its latest live update arrived
        self._delivered = 0  # the highest bucket revision the watch has delivered (or the snapshot covered)

    def blind(self, now: float | None = None) -> list[tuple[float, float]]:
        """The intervals this mirror could not see, the one under way (ending ``now``) included."""
        if self._blind_since is None:
            return list(self._blind)
        return [*self._blind, (self._blind_since, self._clock() if now is None else now)]

    def heard_since_resume(self, key: str) -> bool:
        return self._heard_at.get(key, float("-inf")) >= self._resumed_at

    def prune(self, now: float | None = None) -> list[str]:
        """Drop the entries silent for longer than ``expire_after_s`` (the mirror's outages not counted);
        returns their keys."""
        if not self.expire_after_s:
            return []
        now = self._clock() if now is None else now
        blind = self.blind(now)
        gone = [k for k, t in self.seen_at.items() if silence(t, now, blind) > self.expire_after_s]
        for key in gone:
            self._forget(key)
        return gone

    def _forget(self, key: str) -> None:
        self.items.pop(key, None)
        self.seen_at.pop(key, None)
        self._heard_at.pop(key, None)

    async def _expire(self) -> None:
        every = min(self.expire_after_s / 4, 5.0)
        while True:
            await asyncio.sleep(every)
            try:  # a failing on_change must not end expiry for the mirror's life, silently
                if self.prune():
                    await self._changed()
            except Exception as exc:
                log.warning("KV expiry on %s failed (%s); retrying in %.1f s", self._type.__name__, exc, every)

    def _went_blind(self, since: float | None = None) -> None:
        if self._blind_since is None and self.ready.is_set():
            self._blind_since = self._clock() if since is None else since

    def _resumed(self) -> None:
        now = self._clock()
        if self._blind_since is not None:
            self._blind = [*self._blind, (self._blind_since, now)][-self.MAX_BLIND_INTERVALS:]
            self._blind_since = None
        self._resumed_at = now

    def start(self) -> KvMirror[M]:
        self._task = asyncio.create_task(self._run(), name=f"kv-mirror-{self._type.__name__}")
        if self.expire_after_s:
            self._expiry = asyncio.create_task(self._expire(), name=f"kv-expiry-{self._type.__name__}")
        return self

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stop watching; bounded, so a slow or absent server cannot stall a service's shutdown."""
        await cancel_and_wait([t for t in (self._task, self._expiry) if t is not None], timeout_s)

    async def _run(self) -> None:
        nc = getattr(getattr(self._kv, "_js", None), "_nc", None)  # the connection the bucket was opened on
        while True:
            watcher = watchdog = None
            try:
                watcher = await self._kv.watchall()
                if nc is not None:
                    watchdog = asyncio.create_task(self._watch_the_watch(watcher, nc))
                fresh: dict[str, M] = {}
                fresh_seen: dict[str, float | None] = {}  # the server's timestamps until the snapshot ends
                initial = True
                async for entry in watcher:
                    if entry is None:  # end of the initial snapshot
                        initial = False
                        server_now, last_seq = await self._stream_state()
                        self._delivered = max(self._delivered, last_seq or 0)  # expired entries included
                        self.items, self.seen_at = fresh, snapshot_seen_at(fresh_seen, self._clock(), server_now)
                        self._heard_at = {k: t for k, t in self._heard_at.items() if k in fresh}
                        self._resumed()
                        self.ready.set()
                        await self._changed()
                        continue
                    now = self._clock()
                    self._delivered = max(self._delivered, entry.revision or 0)
                    if not initial:
                        self._heard_at[entry.key] = now
                    target, seen = (fresh, fresh_seen) if initial else (self.items, self.seen_at)
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        target.pop(entry.key, None)
                        seen.pop(entry.key, None)
                        self._heard_at.pop(entry.key, None)
                    else:
                        try:
                            target[entry.key] = self._type.decode(entry.value)
                        except ValueError as exc:
                            log.warning("skipping bad %s value for %s: %s", self._type.__name__, entry.key, exc)
                            continue
                        # from the store: when the server stored it, on the server's clock; live: now
                        stored = getattr(entry.created, "timestamp", None)
                        seen[entry.key] = (stored() if stored else None) if initial else now
                    if not initial:
                        await self._changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnects, consumer loss: start a fresh watch
                self._went_blind()
                log.warning("KV watch on %s interrupted (%s); rewatching", self._type.__name__, exc)
                await asyncio.sleep(0.5)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                if watcher is not None:
                    try:
                        await asyncio.wait_for(watcher.stop(), 2.0)
                    except (Exception, asyncio.CancelledError):
                        pass  # the abandoned watch's consumer may be gone with its server: nothing to stop

    async def _stream_state(self) -> tuple[float | None, int | None]:
        """The server's clock now (the ``ts`` of the bucket's stream info, nats-server 2.10 and later) and the
        stream's last sequence; None for what cannot be had (an older server, a timeout)."""
        js = getattr(self._kv, "_js", None)
        nc, stream = getattr(js, "_nc", None), getattr(self._kv, "_stream", None)
        if nc is None or stream is None:
            return None, None
        try:
            reply = await nc.request(f"{js._prefix}.STREAM.INFO.{stream}", b"", timeout=2.0)
            info = json.loads(reply.data)
            ts = info.get("ts")
            last_seq = (info.get("state") or {}).get("last_seq")
            return (datetime.fromisoformat(ts).timestamp() if ts else None), last_seq
        except Exception as exc:
            log.debug("no stream state of %s: %s", stream, exc)
            return None, None

    async def _watch_the_watch(self, watcher, nc: NATS) -> None:
        """End the watch (the mirror then watches afresh) when its connection reconnects, or when the bucket
        has a revision the watch has not delivered a check (``STALL_CHECK_S``) later: in a NATS cluster
        a watch's consumer can be lost with the server that held it while the connection stays up, and the
        watch then goes quiet for good (a known failure of ordered consumers in every client). The mirror
        counts itself blind from when the lag was first seen."""
        reconnected = asyncio.ensure_future(_stop_on_reconnect(watcher, nc, self._went_blind))
        try:
            owed: tuple[int, float] | None = None  # a revision the bucket had and the watch had not, since when
            while not reconnected.done():
                await asyncio.wait([reconnected], timeout=self.STALL_CHECK_S)
                if reconnected.done():
                    break
                if owed is not None and self._delivered < owed[0]:  # still not delivered a check later: stalled
                    log.warning("KV watch on %s stalled (revision %d is in the bucket, the watch delivered %d); "
                                "rewatching", self._type.__name__, owed[0], self._delivered)
                    self._went_blind(since=owed[1])
                    await watcher.stop()
                    return
                _, last_seq = await self._stream_state()
                owed = (last_seq, self._clock() - self.STALL_CHECK_S) if last_seq and last_seq > self._delivered else None
        finally:
            reconnected.cancel()
            await asyncio.gather(reconnected, return_exceptions=True)

    async def _changed(self) -> None:
        if self._on_change is not None:
            result = self._on_change()
            if asyncio.iscoroutine(result):
                await result


def snapshot_seen_at(stored: dict[str, float | None], now: float,
                     server_now: float | None = None) -> dict[str, float]:
    """When each entry of a snapshot was written, on the reader's clock: its age on the server's clock
    (``server_now`` less its timestamp) subtracted from the reader's ``now``. The server's timestamps are not
    comparable with ``now``: a server clock behind the reader's by more than the heartbeat timeout made every
    worker in a snapshot look dead. Without ``server_now`` (a server older than 2.10) ages are taken behind
    the snapshot's newest entry, which counts as written ``now``: silences are undercounted by that entry's
    (about a heartbeat while any writer is live). An entry without a timestamp counts as written ``now``."""
    known = [t for t in stored.values() if t is not None]
    ref = server_now if server_now is not None else max(known, default=0.0)
    return {k: now if t is None else now - max(0.0, ref - t) for k, t in stored.items()}


async def _stop_on_reconnect(watcher, nc: NATS, went_blind: Callable[[], None], every_s: float = 0.25) -> None:
    """End a KV watch when its connection reconnects. A restarted server has lost the watch's ordered
    consumer, which nats-py notices only after missed heartbeats (10-15 s of a stale mirror, during which
    placement saw no live workers); the mirror rewatches at once instead. ``went_blind`` is called as soon
    as the connection is seen down (within ``every_s``)."""
    seen = nc.stats["reconnects"]
    while nc.stats["reconnects"] == seen:
        if not nc.is_connected:
            went_blind()
        await asyncio.sleep(every_s)
    went_blind()  # a reconnect faster than one poll
    await watcher.stop()
