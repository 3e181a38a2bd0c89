"""Leader election on a real nats-server: one replica of a role leads, a standby takes over, the deposed
are fenced (shared/leader.py, shared/policy/lease.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gpu_worker.main import WorkerService
from services.placement.main import Placement
from shared import bus
from shared.leader import Elector, Term, run_elected
from shared.messages import FENCED, CommandKind, CommandResult, PlacementPlan, WorkerCommand
from shared.settings import PlacementSettings, WorkerSettings
from shared.subjects import LEASES_BUCKET, PLACEMENT, PLACEMENT_BUCKET, PLACEMENT_KEY, WORKER_CMD
from tests.helpers import eventually

pytestmark = pytest.mark.integration
LEASE_S = 2.0


class Replica:
    """One replica of the placement role whose body only records its terms."""

    def __init__(self, name: str, url: str, terms: list):
        self.name = name
        self.settings = PlacementSettings(nats_url=url, leader_lease_s=LEASE_S, replica_id=name)
        self.terms = terms
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def body(self, ended: asyncio.Event, term: Term) -> None:
        self.terms.append((self.name, term.epoch, time.monotonic()))
        await ended.wait()

    def start(self) -> "Replica":
        self.task = asyncio.create_task(run_elected(PLACEMENT, self.settings, self.body, self.stop))
        return self

    async def stop_gracefully(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)

    async def crash(self, monkeypatch) -> None:
        """Stop without releasing the lease, as a killed process would."""
        async def no_release(elector, kv, revision):
            return None
        monkeypatch.setattr(Elector, "_release", no_release)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def fresh_lease(nc):
    """No placement lease left over from another test."""
    kv = await bus.ensure_bucket(nc.jetstream(), LEASES_BUCKET)
    try:
        await kv.purge(PLACEMENT)
    except Exception:
        pass  # no such key yet: nothing left over
    yield kv
    await kv.purge(PLACEMENT)


async def test_one_replica_leads_and_a_standby_takes_over_a_crashed_leader(nats_urls, fresh_lease, monkeypatch):
    terms: list = []
    a = Replica("a", nats_urls[PLACEMENT], terms).start()
    await eventually(lambda: terms, timeout=10, what="a leader")
    b = Replica("b", nats_urls[PLACEMENT], terms).start()
    first, first_epoch, _ = terms[0]
    assert first == "a"
    t0 = time.monotonic()  # b stands by for two leases while a renews: never two leaders
    while time.monotonic() - t0 < 2 * LEASE_S:
        assert len(terms) == 1, f"two leaders: {terms}"
        await asyncio.sleep(0.1)
    crashed_at = time.monotonic()
    await a.crash(monkeypatch)
    await eventually(lambda: len(terms) == 2, timeout=4 * LEASE_S, what="the standby taking over")
    name, epoch, at = terms[1]
    assert name == "b" and epoch > first_epoch
    assert LEASE_S * 0.5 <= at - crashed_at <= LEASE_S + 1.5, f"took over after {at - crashed_at:.2f} s"
    await b.stop_gracefully()


async def test_a_leader_that_stops_hands_the_lease_on_at_once(nats_urls, fresh_lease):
    terms: list = []
    a = Replica("a", nats_urls[PLACEMENT], terms).start()
    await eventually(lambda: terms, timeout=10, what="a leader")
    b = Replica("b", nats_urls[PLACEMENT], terms).start()
    await asyncio.sleep(1.0)
    stopped_at = time.monotonic()
    await a.stop_gracefully()
    await eventually(lambda: len(terms) == 2, timeout=3 * LEASE_S, what="the standby taking over")
    assert terms[1][0] == "b" and terms[1][1] > terms[0][1]
    assert terms[1][2] - stopped_at < LEASE_S, "a released lease is taken without waiting a lease out"
    await b.stop_gracefully()


async def test_a_worker_refuses_commands_of_a_deposed_orchestrator(nats_url, nats_urls, nc):
    wid = "fence-w"
    service = WorkerService(WorkerSettings(nats_url=nats_urls.worker(wid), worker_id=wid, engine="sim",
                                           memory_budget_bytes=512 * 2**20, kv_cache_bytes=64 * 2**20,
                                           heartbeat_interval_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async def send(epoch):
            cmd = WorkerCommand(kind=CommandKind.EVICT, model="nothing-here", epoch=epoch)
            try:
                return await bus.request(nc, WORKER_CMD.format(worker=wid), cmd, CommandResult, timeout=2)
            except bus.BusError:
                return None

        assert (await eventually(lambda: send(7), timeout=10, what="the worker answering")).ok
        old = await send(6)
        assert not old.ok and old.error.code == FENCED
        assert (await send(7)).ok and (await send(9)).ok
        assert (await send(8)).error.code == FENCED, "the fence rises with every later term"
        assert (await send(None)).ok, "an unfenced command (the operator's) is not refused"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_deposed_placement_cannot_overwrite_its_successors_plan(nats_urls, nc):
    js = nc.jetstream()
    kv = await bus.ensure_bucket(js, PLACEMENT_BUCKET)
    await kv.purge(PLACEMENT_KEY)
    settings = PlacementSettings(nats_url=nats_urls[PLACEMENT], replica_id="x")

    async def placement(epoch: int) -> Placement:
        p = Placement(settings, Term(PLACEMENT, f"r{epoch}", epoch))
        p.plan_kv = kv
        p.plan_revision, _ = await p.read_plan()
        return p

    old = await placement(3)  # read the key before its successor wrote: it does not know yet
    new = await placement(5)
    assert await new.write_plan(PlacementPlan(created_at_s=1.0, epoch=5))
    assert not await old.write_plan(PlacementPlan(created_at_s=2.0, epoch=3))
    assert old.term.ended.is_set(), "the deposed placement ends its term"
    _, current = await new.read_plan()
    assert current.epoch == 5 and current.created_at_s == 1.0
    assert await new.write_plan(PlacementPlan(created_at_s=3.0, epoch=5)), "the leader goes on writing"
    # a plan an earlier term wrote late does not stop the current leader
    later = await placement(8)
    later.plan_revision = 0  # stale: it has to re-read and replace the earlier term's plan
    assert await later.write_plan(PlacementPlan(created_at_s=4.0, epoch=8))
    assert (await later.read_plan())[1].epoch == 8
    await kv.purge(PLACEMENT_KEY)


async def test_a_lone_leader_suspends_while_nats_is_away_and_resumes_its_term(tmp_path):
    """NATS restarts for longer than a lease: the leader stops acting but keeps its term (and the service its
    state), and takes the lease back as soon as NATS returns, since nobody else wrote it."""
    from tests.conftest import NatsServer

    server = NatsServer(tmp_path)
    server.start()
    terms: list = []
    seen: dict = {}

    async def body(ended: asyncio.Event, term: Term) -> None:
        terms.append(term)
        await ended.wait()

    settings = PlacementSettings(nats_url=server[PLACEMENT], leader_lease_s=LEASE_S, replica_id="lone")
    stop = asyncio.Event()
    task = asyncio.create_task(run_elected(PLACEMENT, settings, body, stop))
    try:
        await eventually(lambda: terms and terms[0].acting, timeout=10, what="the lone replica leading")
        term, epoch = terms[0], terms[0].epoch
        server.stop()
        await eventually(lambda: not term.active.is_set(), timeout=3 * LEASE_S, what="the term suspended")
        seen["suspended_ended"] = term.ended.is_set()
        await asyncio.sleep(LEASE_S)  # away for longer than a lease
        server.start()
        await eventually(lambda: term.acting, timeout=20, what="the term resumed")
        assert not seen["suspended_ended"], "a suspended term is not over"
        assert len(terms) == 1, "the same term resumed: no fresh start"
        assert term.epoch > epoch
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        server.stop()


async def test_a_replica_whose_service_fails_hands_the_lease_on_and_stays_up(nats_urls, fresh_lease):
    terms: list = []

    class Failing(Replica):
        async def body(self, ended, term):
            terms.append((self.name, term.epoch, time.monotonic()))
            raise RuntimeError("the service could not start")

    a = Failing("a", nats_urls[PLACEMENT], terms).start()
    await eventually(lambda: terms, timeout=10, what="a leading")
    b = Replica("b", nats_urls[PLACEMENT], terms).start()
    await eventually(lambda: any(name == "b" for name, _, _ in terms), timeout=3 * LEASE_S,
                     what="b taking over from a failed service")
    assert not a.task.done(), "the failing replica stays up, standing by"
    await b.stop_gracefully()
    await a.stop_gracefully()
