"""Leader election for one control-plane role: a lease in a KV key, decided here without I/O.

Each replica of a role (placement, the orchestrator, the forecaster) runs one ``LeaseCore``. The shell
(``shared/leader.py``) reads the lease key, feeds what it saw into ``observe`` and carries out what ``decide``
returns: a compare-and-set write that names the revision it read, so of two replicas racing for one lease
exactly one write lands.

Times are the replica's own clock; no replica trusts a time written by another. The rules:

- A follower takes the lease once the key has not changed for ``lease_s`` since it *saw* the last change
  (or at once when the key is absent or deleted: a leader that stops releases it).
- A leader renews every ``renew_s`` and steps down once ``lease_s - margin_s`` has passed since it *sent*
  the last renewal that was acknowledged. A follower counts from when it saw that renewal, which was later,
  so the old leader has stopped before anyone else may start (clock rates permitting; the epoch fences the rest).
- A leader that steps down only because its renewals went unanswered (NATS away, or a partition that left it
  on the minority side) is *suspended*, not deposed: it sends nothing, but keeps what it knows. If the key is
  still at its own last write when it can read it again, nobody else has led meanwhile, so it takes the
  lease back at once and *resumes* (a single replica rides out a NATS restart with its state). If anyone else
  wrote the key, its term is over.
- The epoch is the KV revision of the write that acquired the lease. Revisions only grow, so every new term
  has a higher epoch than every earlier one; workers and the plan refuse a lower epoch than they have seen,
  which fences a deposed leader that has not noticed yet (a long pause, a partition).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


@dataclass(frozen=True)
class LeaseValue:
    """What the lease key holds: who leads, and the epoch of its term."""

    holder: str
    epoch: int


@dataclass(frozen=True)
class Acquire:
    """Write ``LeaseValue(me, 0)`` if the key is still at ``last_revision`` (None: if the key does not exist);
    the revision of that write becomes the epoch, then a ``Renew`` records it in the value."""

    last_revision: int | None


@dataclass(frozen=True)
class Renew:
    """Write ``LeaseValue(me, epoch)`` if the key is still at ``last_revision``."""

    last_revision: int
    epoch: int


@dataclass(frozen=True)
class StepDown:
    """Stop leading at once: nothing more is sent. ``resumable``: only suspended (the renewals went
    unanswered); the term may resume if this replica gets the lease back before anyone else writes it."""

    reason: str
    resumable: bool = False


Action = Acquire | Renew | StepDown | None


@dataclass(frozen=True)
class LeaseConfig:
    lease_s: float = 5.0
    renew_s: float | None = None  # default: a third of the lease
    margin_s: float | None = None  # default: a fifth of the lease

    @property
    def renew_every_s(self) -> float:
        return self.renew_s if self.renew_s is not None else self.lease_s / 3

    @property
    def margin(self) -> float:
        return self.margin_s if self.margin_s is not None else self.lease_s / 5

    def __post_init__(self):
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")
        if not 0 < self.renew_every_s < self.lease_s - self.margin:
            raise ValueError("renewals must come more often than the lease minus its margin")


class LeaseCore:
    """One replica's view of one role's lease. Feed it ``observe`` (each read of the key) and the outcome
    of each write; ask ``decide(now)`` what to do."""

    def __init__(self, me: str, config: LeaseConfig = LeaseConfig()):
        self.me = me
        self.config = config
        self.role = Role.FOLLOWER
        self.epoch: int | None = None  # of my term while I lead
        self.revision: int | None = None  # the key's latest revision as I know it (None: never seen)
        self.value: LeaseValue | None = None  # None: the key is absent or deleted
        self.changed_at: float | None = None  # when I saw the key change last (my clock)
        self.renewed_at: float | None = None  # when I sent the last renewal that was acknowledged
        self.last_written: int | None = None  # the revision of my last acknowledged write
        self._acquiring_from: int | None = None  # the revision my pending Acquire names

    # ---- what the shell saw --------------------------------------------------------------------

    def observe(self, revision: int | None, value: LeaseValue | None, now: float) -> Action:
        """A read of the key: its revision (None: never written) and value (None: absent or deleted).
        Returns StepDown when it shows that someone else holds the lease while I think I lead."""
        if revision is not None and self.revision is not None and revision < self.revision:
            return None  # an older copy of the key (a lagging replica of the bucket answered): nothing new
        if revision != self.revision or self.changed_at is None:
            self.changed_at = now
        self.revision, self.value = revision, value
        if self.role is Role.LEADER and value is not None and value.holder != self.me:
            return self._step_down(f"{value.holder} holds the lease (epoch {value.epoch})")
        if self.role is Role.LEADER and value is not None and self.epoch is not None and value.epoch > self.epoch:
            return self._step_down(f"a later term holds the lease (epoch {value.epoch})")
        return None

    def may_resume(self) -> bool:
        """Whether a suspended term of mine could still resume: the key is as I last wrote it."""
        return (self.last_written is not None and self.revision == self.last_written
                and self.value is not None and self.value.holder == self.me)

    def acquired(self, revision: int, sent_at: float) -> bool:
        """My Acquire landed at ``revision``: I lead from now, with that revision as my epoch. True when it
        took the key over from my own last write: nobody led in between, a suspended term resumes."""
        resumed = self.last_written is not None and self._acquiring_from == self.last_written
        self.last_written = revision
        self.role, self.epoch = Role.LEADER, revision
        self.revision, self.value = revision, LeaseValue(self.me, 0)
        self.renewed_at = sent_at
        self.changed_at = sent_at
        return resumed

    def renewed(self, revision: int, sent_at: float) -> None:
        """My Renew landed at ``revision``."""
        if self.role is not Role.LEADER:
            return
        self.revision, self.value = revision, LeaseValue(self.me, self.epoch or revision)
        self.last_written = revision
        self.renewed_at = sent_at
        self.changed_at = sent_at

    def write_failed(self, now: float, conflict: bool) -> Action:
        """My write did not land: ``conflict`` when the key moved (another replica wrote); else NATS did not
        answer (the lease may still be mine until it runs out)."""
        if conflict:
            self.changed_at = now  # someone wrote: whoever it was, wait a full lease from now
            self.revision = None  # unknown until the next read
            if self.role is Role.LEADER:
                return self._step_down("another replica wrote the lease key")
        return None

    # ---- what to do now ------------------------------------------------------------------------

    def decide(self, now: float) -> Action:
        c = self.config
        if self.role is Role.LEADER:
            if self.renewed_at is None or now - self.renewed_at >= c.lease_s - c.margin:
                return self._step_down(f"no renewal acknowledged for {c.lease_s - c.margin:g} s", resumable=True)
            if (now - self.renewed_at >= c.renew_every_s or self.value is None  # deleted under me: write it back
                    or self.value.epoch == 0):  # just acquired: record the epoch in the value
                assert self.revision is not None and self.epoch is not None
                return Renew(self.revision, self.epoch)
            return None
        if self.changed_at is None:  # the key was never read: read it first
            return None
        if (self.value is None  # absent, or released by a leader that stopped: take it now
                or self.may_resume()  # still as I left it: nobody led since, take it back at once
                or now - self.changed_at >= c.lease_s):  # unchanged for a whole lease: its holder is gone
            self._acquiring_from = self.revision
            return Acquire(self.revision)
        return None

    def next_wake(self, now: float) -> float:
        """When ``decide`` may next have something to do."""
        c = self.config
        if self.role is Role.LEADER and self.renewed_at is not None:
            return min(self.renewed_at + c.renew_every_s, self.renewed_at + c.lease_s - c.margin)
        if self.changed_at is not None and self.value is not None:
            return max(now, self.changed_at + c.lease_s)
        return now

    def resign(self, reason: str) -> StepDown:
        """Give up leading of my own accord (the service stopped, or learned it was deposed); the shell then
        releases the key so a standby takes over at once."""
        return self._step_down(reason)

    @property
    def leading(self) -> bool:
        return self.role is Role.LEADER

    def _step_down(self, reason: str, resumable: bool = False) -> StepDown:
        self.role, self.epoch, self.renewed_at = Role.FOLLOWER, None, None
        return StepDown(reason, resumable)
