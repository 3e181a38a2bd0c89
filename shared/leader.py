"""Run a control-plane service as one of several replicas: the leader works, the others stand by.

Each replica holds its own NATS connection for the lease (key = role in ``warmserve-leases``) and runs the
``LeaseCore`` of ``shared/policy/lease.py``: it reads the key every ``POLL_S``, renews it while it leads and
takes it over with a compare-and-set write once it has gone unrenewed for a lease. While it leads, the
service's body runs with a ``Term`` (the epoch to stamp on what it sends); when the lease is lost the body's
stop event is set and the replica stands by again. On SIGTERM a leader releases the lease (a delete that
names the revision it holds), so a standby takes over at once instead of after a lease.

A standby starts the body only when it wins, from scratch: what the body needs it reads from NATS and
Postgres, as after a restart. Takeover takes a lease plus the body's start (about a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors

from shared import bus, metrics
from shared.messages import LeaderLease
from shared.policy.lease import Acquire, LeaseConfig, LeaseCore, LeaseValue, Renew, StepDown
from shared.settings import ControlPlaneSettings
from shared.subjects import LEASES_BUCKET

log = logging.getLogger(__name__)
RETRY_AFTER_FAILURE_S = 5.0  # a replica whose service failed waits this long before it may lead again
POLL_S = 0.5  # how often a replica reads the lease key (a standby sees a release this late at most)


@dataclass
class Term:
    """One leader's term: its epoch, ``ended`` (set when the lease is lost to another replica or the replica
    stops: the service returns) and ``active`` (cleared while the term is suspended: the renewals went
    unanswered, so the service keeps its state but sends nothing until the lease is back)."""

    role: str
    holder: str
    epoch: int | None  # None: no election (a single replica run directly, as the tests do)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    active: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self.active.set()

    @property
    def acting(self) -> bool:
        """Whether the service may send now: its term is neither ended nor suspended."""
        return self.active.is_set() and not self.ended.is_set()

    def check(self, epoch_seen: int | None) -> bool:
        """Whether a record stamped ``epoch_seen`` allows this term to go on: a later term's record means
        this leader was deposed."""
        return self.epoch is None or epoch_seen is None or epoch_seen <= self.epoch


Body = Callable[[asyncio.Event, Term], Awaitable[None]]


@dataclass
class LeaderStatus:
    """What /readyz reports: the lease as this replica last saw it."""

    role: str
    me: str
    leading: bool = False
    epoch: int | None = None
    holder: str | None = None
    read_at: float | None = None  # when the key was last read (monotonic): a replica that cannot is not ready

    def ready(self, lease_s: float) -> bool:
        return self.read_at is not None and time.monotonic() - self.read_at < lease_s


STATUS: dict[str, LeaderStatus] = {}  # role -> status, for the health endpoint of this process


def readiness(lease_s: float) -> tuple[bool, dict]:
    """For /readyz: ready once this process has read its lease within a lease (leader or standby)."""
    if not STATUS:
        return False, {"why": "not connected to NATS yet"}
    detail = {s.role: {"replica": s.me, "leading": s.leading, "epoch": s.epoch, "leader": s.holder}
              for s in STATUS.values()}
    ok = all(s.ready(lease_s) for s in STATUS.values())
    return ok, detail if ok else {**detail, "why": "cannot read the leader lease in NATS"}


def _decode(entry_value: bytes | None) -> LeaseValue | None:
    if not entry_value:
        return None
    try:
        v = LeaderLease.decode(entry_value)
    except ValueError:
        return LeaseValue("?", 0)  # something unreadable holds the key: treat it as held, wait it out
    return LeaseValue(v.holder, v.epoch)


async def read_lease(kv, role: str) -> tuple[int | None, LeaseValue | None]:
    """The lease key's revision and value; (revision of the delete marker, None) after a release;
    (None, None) if it was never written. Read from the stream's leader, never a replica's direct answer:
    a replica that lags (a NATS server catching up after a restart) would show an old revision, and every
    compare-and-set written over it would fail."""
    try:
        msg = await kv._js.get_last_msg(kv._stream, f"$KV.{LEASES_BUCKET.name}.{role}", direct=False)
    except nats.js.errors.NotFoundError:
        return None, None
    if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
        return msg.seq, None
    return msg.seq, _decode(msg.data)


class Elector:
    """The I/O around one ``LeaseCore``: reads, compare-and-set writes, the body's start and stop."""

    def __init__(self, role: str, me: str, config: LeaseConfig, body: Body, clock=time.monotonic):
        self.role, self.me, self.body = role, me, body
        self.core = LeaseCore(me, config)
        self.clock = clock
        self.status = STATUS.setdefault(role, LeaderStatus(role, me))
        self.term: Term | None = None
        self.task: asyncio.Task | None = None
        self.failing_since: float | None = None  # lease reads or writes fail since then
        self.warned_at: float | None = None

    async def run(self, kv, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._turn(kv)
                if self.task is not None and self.task.done():
                    # it returned by itself (it learned it was deposed) or failed: hand the lease on
                    failed = not self.task.cancelled() and self.task.exception() is not None
                    if failed:
                        log.error("%s: the service failed; handing the lease on", self.role,
                                  exc_info=self.task.exception())
                    self.task = None
                    revision = self.core.revision
                    await self._step_down(self.core.resign("the service failed" if failed else
                                                           "the service ended its term"))
                    await self._release(kv, revision)
                    if failed:  # not at once again: a standby may do better, and a crash loop stays slow
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), RETRY_AFTER_FAILURE_S)
                wake = min(self.core.next_wake(self.clock()) - self.clock(), POLL_S)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.05, wake))
        finally:
            leading, revision = self.core.leading, self.core.revision
            await self._end_term()
            if leading:
                self.core.resign("stopping")
                await self._release(kv, revision)

    async def _turn(self, kv) -> None:
        try:
            revision, value = await read_lease(kv, self.role)
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as exc:
            self._failed(exc)
        else:
            self.failing_since = None
            self.status.read_at, self.status.holder = time.monotonic(), value.holder if value else None
            action = self.core.observe(revision, value, self.clock())
            if isinstance(action, StepDown):
                await self._step_down(action)
            elif self.term is not None and not self.core.leading and not self.core.may_resume():
                await self._step_down(StepDown("another replica wrote the lease while this one was suspended"))
        action = self.core.decide(self.clock())
        if isinstance(action, StepDown):
            await self._step_down(action)
        elif isinstance(action, (Acquire, Renew)):
            await self._write(kv, action)

    async def _write(self, kv, action: Acquire | Renew) -> None:
        sent = self.clock()
        epoch = action.epoch if isinstance(action, Renew) else 0
        value = LeaderLease(holder=self.me, epoch=epoch, at_s=time.time()).encode()
        try:
            if isinstance(action, Acquire) and action.last_revision is None:
                revision = await kv.create(self.role, value)
            else:
                revision = await kv.update(self.role, value, last=action.last_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            step = self.core.write_failed(self.clock(), conflict=True)
            if isinstance(step, StepDown):
                await self._step_down(step)
            return
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as exc:
            self._failed(exc)
            self.core.write_failed(self.clock(), conflict=False)
            return
        if isinstance(action, Acquire):
            resumed = self.core.acquired(revision, sent)
            if resumed and self.term is not None:
                self._resume_term(revision)
            else:
                await self._end_term()
                self._start_term(revision)
        else:
            self.core.renewed(revision, sent)

    def _failed(self, exc: Exception) -> None:
        """A read or write of the lease that NATS did not answer: logged once it has gone on for a lease."""
        now = self.clock()
        if self.failing_since is None:
            self.failing_since, self.warned_at = now, None
        lease_s = self.core.config.lease_s
        if now - self.failing_since >= lease_s and (self.warned_at is None or now - self.warned_at >= 6 * lease_s):
            self.warned_at = now
            log.warning("%s: %s cannot read or write its lease in NATS for %.0f s (%s: %s)", self.role, self.me,
                        now - self.failing_since, exc.__class__.__name__, exc)

    def _start_term(self, epoch: int) -> None:
        log.info("%s: %s leads (epoch %d)", self.role, self.me, epoch)
        self.status.leading, self.status.epoch = True, epoch
        metrics.LEADER.labels(self.role).set(1)
        self.term = Term(self.role, self.me, epoch)
        self.task = asyncio.create_task(self.body(self.term.ended, self.term))

    def _resume_term(self, epoch: int) -> None:
        log.info("%s: %s leads again, resuming its term (epoch %d): nobody led meanwhile", self.role, self.me, epoch)
        self.status.leading, self.status.epoch = True, epoch
        metrics.LEADER.labels(self.role).set(1)
        self.term.epoch = epoch
        self.term.active.set()

    async def _step_down(self, action: StepDown) -> None:
        if self.term is not None:
            log.warning("%s: %s %s: %s", self.role, self.me,
                        "suspends its term" if action.resumable else "steps down", action.reason)
        if action.resumable and self.term is not None:
            self.status.leading = False
            metrics.LEADER.labels(self.role).set(0)
            self.term.active.clear()  # the service sends nothing until the lease is back or another leads
            return
        await self._end_term()

    async def _end_term(self) -> None:
        self.status.leading, self.status.epoch = False, None
        metrics.LEADER.labels(self.role).set(0)
        if self.term is not None:
            self.term.ended.set()
        if self.task is not None:
            try:
                await self.task  # the body stops sending before this replica may lead again
            except Exception:
                log.exception("%s: the service failed while stopping", self.role)
        self.term, self.task = None, None

    async def _release(self, kv, revision: int | None) -> None:
        """Hand the lease on at once: delete the key if it is still at my revision."""
        if revision is None:
            return
        try:
            await kv.delete(self.role, last=revision)
            log.info("%s: %s released the lease", self.role, self.me)
        except Exception as exc:  # the standby waits the lease out instead
            log.info("%s: could not release the lease (%s)", self.role, exc)


def elected(role: str, settings: ControlPlaneSettings,
            make: Callable[[Term], Callable[[asyncio.Event], Awaitable[None]]]):
    """``run(stop)`` for ``run_service``: ``make(term)`` builds a fresh service for each term this replica
    wins (nothing of a lost term carries over) and returns its ``run(stop)``."""
    async def run(stop: asyncio.Event) -> None:
        async def body(ended: asyncio.Event, term: Term) -> None:
            await make(term)(ended)
        await run_elected(role, settings, body, stop)
    return run


async def run_elected(role: str, settings: ControlPlaneSettings, body: Body, stop: asyncio.Event) -> None:
    """Run ``body`` whenever this replica leads ``role``, until ``stop``."""
    nc = await bus.connect(settings.nats_url, f"{role}-lease-{settings.replica_id}")
    try:
        # a replica started while the NATS cluster elects its leaders waits for it instead of failing
        kv = await bus.when_jetstream_answers(lambda: bus.ensure_bucket(nc.jetstream(), LEASES_BUCKET))
        elector = Elector(role, settings.replica_id, LeaseConfig(settings.leader_lease_s), body)
        log.info("%s: replica %s standing by for the lease (%.0f s)", role, settings.replica_id,
                 settings.leader_lease_s)
        await elector.run(kv, stop)
    finally:
        await bus.close(nc)
