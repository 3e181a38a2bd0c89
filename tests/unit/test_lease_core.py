"""The leader lease core (shared/policy/lease.py): who may lead when, on the replica's own clock."""

from __future__ import annotations

import pytest

from shared.policy.lease import Acquire, LeaseConfig, LeaseCore, LeaseValue, Renew, StepDown

CFG = LeaseConfig(lease_s=5.0)  # renew every 5/3 s, step down 4 s after the last acknowledged renewal


class Key:
    """A KV key with compare-and-set writes, as NATS keeps it: revisions only grow."""

    def __init__(self):
        self.revision: int | None = None
        self.value: LeaseValue | None = None
        self.seq = 0

    def write(self, last: int | None, value: LeaseValue | None) -> int | None:
        if last != self.revision:
            return None
        self.seq += 1
        self.revision, self.value = self.seq, value
        return self.seq


def step(core: LeaseCore, key: Key, now: float):
    """One turn of the shell: read, decide, write."""
    got = core.observe(key.revision, key.value, now)
    if isinstance(got, StepDown):
        return got
    action = core.decide(now)
    if isinstance(action, Acquire):
        rev = key.write(action.last_revision, LeaseValue(core.me, 0))
        if rev is None:
            return core.write_failed(now, conflict=True)
        core.acquired(rev, now)
    elif isinstance(action, Renew):
        rev = key.write(action.last_revision, LeaseValue(core.me, action.epoch))
        if rev is None:
            return core.write_failed(now, conflict=True)
        core.renewed(rev, now)
    return action


def run(cores, key, start, end, dt=0.5, down=()):
    """Turns every ``dt`` from ``start`` to ``end``; ``down``: replicas that do nothing (dead or cut off)."""
    t = start
    leaders = []
    while t <= end + 1e-9:
        for c in cores:
            if c.me not in down:
                step(c, key, t)
        leaders.append((t, [c.me for c in cores if c.leading]))
        t += dt
    return leaders


def test_one_of_two_replicas_leads_and_the_epoch_is_the_acquiring_revision():
    key, a, b = Key(), LeaseCore("a", CFG), LeaseCore("b", CFG)
    history = run([a, b], key, 0.0, 20.0)
    assert all(len(who) <= 1 for _, who in history)
    assert a.leading and not b.leading
    assert key.value == LeaseValue("a", a.epoch) and a.epoch == 1


def test_a_standby_takes_over_a_lease_after_it_goes_unrenewed_and_gets_a_higher_epoch():
    key, a, b = Key(), LeaseCore("a", CFG), LeaseCore("b", CFG)
    run([a, b], key, 0.0, 10.0)
    first = a.epoch
    history = run([a, b], key, 10.5, 30.0, down={"a"})  # a dies at 10
    took = next(t for t, who in history if who == ["b"] or "b" in who)
    assert 10.5 + CFG.lease_s - 2 <= took <= 10.0 + CFG.lease_s + 1.0  # about one lease after the last renewal
    assert b.epoch > first


def test_a_cut_off_leader_steps_down_before_the_standby_may_lead():
    """a cannot reach the key from t=10 (a partition): it must stop leading before b starts."""
    key, a, b = Key(), LeaseCore("a", CFG), LeaseCore("b", CFG)
    run([a, b], key, 0.0, 10.0)
    a_stopped = b_started = None
    t = 10.5
    while t < 30:
        if a_stopped is None and isinstance(a.decide(t), StepDown):  # a only decides: its reads and writes fail
            a_stopped = t
        step(b, key, t)
        if b_started is None and b.leading:
            b_started = t
        t += 0.5
    assert a_stopped is not None and b_started is not None
    assert a_stopped < b_started


def test_racing_acquires_let_exactly_one_replica_lead():
    key = Key()
    cores = [LeaseCore(name, CFG) for name in "abcde"]
    history = run(cores, key, 0.0, 12.0, dt=0.25)
    assert all(len(who) <= 1 for _, who in history)
    assert sum(c.leading for c in cores) == 1


def test_a_released_lease_is_taken_at_once():
    key, a, b = Key(), LeaseCore("a", CFG), LeaseCore("b", CFG)
    run([a, b], key, 0.0, 10.0)
    key.write(key.revision, None)  # a's release: a delete that names its revision
    a._step_down("stopping")
    run([b], key, 10.5, 10.5)
    assert b.leading and b.epoch > 1


def test_a_leader_that_sees_another_holder_steps_down():
    key, a = Key(), LeaseCore("a", CFG)
    run([a], key, 0.0, 3.0)
    key.revision, key.value = key.revision + 5, LeaseValue("b", key.revision + 5)
    assert isinstance(a.observe(key.revision, key.value, 3.5), StepDown)
    assert not a.leading


def test_an_older_copy_of_the_key_is_ignored():
    """A lagging replica of the bucket may answer a read with an older revision: it proves nothing."""
    key, a = Key(), LeaseCore("a", CFG)
    run([a], key, 0.0, 3.0)
    assert a.observe(1, LeaseValue("someone-earlier", 0), 3.2) is None
    assert a.leading


def test_a_conflicting_renewal_deposes_the_leader():
    key, a = Key(), LeaseCore("a", CFG)
    run([a], key, 0.0, 3.0)
    assert isinstance(a.write_failed(3.5, conflict=True), StepDown)
    assert not a.leading


def test_renewals_must_come_well_within_the_lease():
    with pytest.raises(ValueError):
        LeaseConfig(lease_s=5.0, renew_s=4.5)


def test_a_leader_whose_renewals_go_unanswered_is_suspended_and_resumes_if_nobody_else_wrote():
    """NATS away for longer than the lease: the leader stops sending, then takes its own lease back at once."""
    key, a = Key(), LeaseCore("a", CFG)
    run([a], key, 0.0, 3.0)
    epoch = a.epoch
    t, suspended = 3.5, None
    while suspended is None:  # reads and writes fail: only decide
        got = a.decide(t)
        if isinstance(got, StepDown):
            suspended = got
        t += 0.5
    assert suspended.resumable and not a.leading
    assert a.may_resume(), "the key is as a left it"
    step(a, key, 30.0)  # NATS is back 30 s later: no waiting out another lease
    assert a.leading and a.epoch > epoch


def test_a_suspended_leader_cannot_resume_once_another_replica_wrote():
    key, a, b = Key(), LeaseCore("a", CFG), LeaseCore("b", CFG)
    run([a, b], key, 0.0, 3.0)
    run([b], key, 3.5, 12.0)  # a is cut off; b takes over
    assert b.leading
    assert isinstance(a.decide(12.0), StepDown)
    a.observe(key.revision, key.value, 12.5)  # a sees the key again
    assert not a.may_resume()
    assert a.decide(12.5) is None, "a waits: b holds a lease it renews"


def test_a_renewal_that_lost_its_answer_is_not_taken_for_someone_elses_write():
    """A write that landed but whose acknowledgement was lost moves the key past my last known write: I may
    not resume (I cannot tell it from another replica's write) but I take the lease after a lease like anyone."""
    key, a = Key(), LeaseCore("a", CFG)
    run([a], key, 0.0, 3.0)
    key.write(key.revision, LeaseValue("a", a.epoch))  # landed, unacknowledged
    assert isinstance(a.decide(10.0), StepDown)
    a.observe(key.revision, key.value, 10.5)
    assert not a.may_resume() and a.decide(10.5) is None
    step(a, key, 16.0)
    assert a.leading
