"""Gateway admission with a fake routing table and orchestrator: bounded asking, no over-admission,
honest outcomes."""

import asyncio

import pytest

from services.gateway.admission import Admission
from services.gateway.admission_core import AdmissionCore
from services.gateway.errors import ApiError
from shared.messages import Outcome, ScaleReply
from shared.policy.routing import Route, pick_route
from tests.helpers import eventually


class FakeTable:
    def __init__(self):
        self.instances: list[Route] = []  # on live workers
        self.stale: set[str] = set()  # instances on workers whose heartbeat is stale here
        self.pending: dict[str, int] = {}

    def routes(self, model):
        return list(self.instances)

    def known_instances(self, model):
        return {r.instance_id for r in self.instances} | self.stale


    def has_instance(self, model):
        return bool(self.instances)

    def try_route(self, model, exclude=()):
        return pick_route([r for r in self.instances if r.instance_id not in exclude], self.pending)

    def started(self, route):
        self.pending[route.instance_id] = self.pending.get(route.instance_id, 0) + 1

    def finished(self, route):
        self.pending[route.instance_id] -= 1
        if not self.pending[route.instance_id]:
            del self.pending[route.instance_id]


async def queued(adm: Admission, model: str, n: int, timeout: float = 10.0) -> None:
    """Until ``n`` requests for ``model`` wait in the admission queue."""
    await eventually(lambda: adm.core.waiting.get(model, 0) == n, timeout, f"{n} waiting for {model}", every=0.01)


async def test_failed_scale_ups_are_retried_with_backoff_not_in_a_loop():
    table, asks = FakeTable(), []

    async def scaler(req):
        asks.append(req)
        return ScaleReply(ok=False, error={"code": "no_capacity", "message": "full on worker-7"})

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=3.0)
    with pytest.raises(ApiError) as exc:
        await asyncio.gather(*(adm.admit("m") for _ in range(4)))
    assert exc.value.status == 503 and exc.value.code == "no_capacity"
    assert "worker-7" not in exc.value.message and exc.value.detail == "full on worker-7"  # the log's, not the client's
    assert 2 <= len(asks) <= 4  # 0.5 s, 1 s, 2 s apart: not hundreds


async def test_waiters_never_exceed_the_new_instance_capacity_and_learn_its_outcome():
    table = FakeTable()

    async def scaler(req):
        await asyncio.sleep(0.05)
        table.instances = [Route("w1", "new", 0, capacity=2)]
        return ScaleReply(ok=True, outcome=Outcome.PREWARM_HIT, worker_id="w1", instance_id="new")

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=1.0)
    results = await asyncio.gather(*(adm.admit("m") for _ in range(5)), return_exceptions=True)
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(served) == 2 and table.pending == {"new": 2}
    assert {outcome for _, outcome, _ in served} == {Outcome.PREWARM_HIT}
    assert all(isinstance(r, ApiError) and r.status == 503 for r in results if isinstance(r, Exception))


async def test_a_slot_freed_on_an_old_instance_is_warm_and_the_queue_is_bounded():
    table = FakeTable()
    table.instances = [Route("w1", "old", 1, capacity=1)]  # full

    async def scaler(req):
        await asyncio.sleep(10)  # a slow cold start somewhere else
        return ScaleReply(ok=False)

    adm = Admission(table, scaler, AdmissionCore(1), wait_s=30.0)
    waiter = asyncio.create_task(adm.admit("m"))
    await queued(adm, "m", 1)
    with pytest.raises(ApiError) as exc:
        await adm.admit("m")  # the queue of one is taken
    assert exc.value.code == "queue_full"
    table.instances = [Route("w1", "old", 0, capacity=1)]  # the running request finished
    adm.notify()
    route, outcome, waited = await asyncio.wait_for(waiter, 9.0)  # not the scale-up's 10 s
    assert route.instance_id == "old" and outcome is Outcome.WARM and waited < 9.0


async def test_an_instance_hidden_by_a_lagging_heartbeat_is_warm_when_it_reappears():
    """A worker's heartbeat went stale here while it served: requests wait (its instances are not routed to),
    and when the heartbeat is back the same instance serves them. It was not made for them: warm."""
    table, never = FakeTable(), asyncio.Event()
    table.stale = {"lagging"}

    async def scaler(req):
        await never.wait()
        return ScaleReply(ok=False)

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=30.0)
    waiter = asyncio.create_task(adm.admit("m"))
    await queued(adm, "m", 1)
    table.stale, table.instances = set(), [Route("w1", "lagging", 0, capacity=4, made=Outcome.PREWARM_HIT)]
    adm.notify()
    route, outcome, _ = await asyncio.wait_for(waiter, 10)
    assert route.instance_id == "lagging" and outcome is Outcome.WARM


async def test_an_instance_someone_else_started_is_labelled_by_how_its_worker_made_it():
    """The autoscaler may start the instance a waiting request gets before the request's own ask is
    answered: the worker's report says cold (or prewarm_hit), never warm."""
    table, never = FakeTable(), asyncio.Event()
    table.instances = [Route("w1", "old", 1, capacity=1)]  # full

    async def scaler(req):
        await never.wait()  # the gateway's own ask is still pending
        return ScaleReply(ok=False)

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=30.0)
    labels = []
    label = adm.core.label
    adm.core.label = lambda *a, **kw: labels.append(kw.get("waited_for_reply", False)) or label(*a, **kw)
    waiter = asyncio.create_task(adm.admit("m"))
    await queued(adm, "m", 1)
    table.instances = [Route("w1", "old", 1, capacity=1), Route("w2", "auto", 0, capacity=1, made=Outcome.COLD)]
    adm.notify()
    route, outcome, _ = await asyncio.wait_for(waiter, 10)
    assert route.instance_id == "auto" and outcome is Outcome.COLD
    assert labels == [False]  # labelled at once: no waiting for the pending ask's reply


async def test_a_request_cancelled_while_its_scale_up_reply_is_awaited_gives_its_slot_back():
    table, replied = FakeTable(), asyncio.Event()

    async def scaler(req):  # the instance appears (heartbeat) before the orchestrator's reply arrives
        table.instances = [Route("w1", "new", 0, capacity=1)]
        await replied.wait()
        return ScaleReply(ok=True, outcome=Outcome.COLD, worker_id="w1", instance_id="new")

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=5.0)
    waiter = asyncio.create_task(adm.admit("m"))
    for _ in range(100):
        if table.pending:
            break
        await asyncio.sleep(0.01)
    assert table.pending == {"new": 1}  # reserved, waiting for the reply that says how it was made
    waiter.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert table.pending == {}
    replied.set()


async def test_a_request_rerouted_from_the_only_instance_goes_back_to_it_instead_of_waiting_out_its_budget():
    """A request that could not start on an instance (the gateway or the worker was cut off from NATS for a
    moment) avoids it while it waits; when it is the only one and no other comes, it is tried again after
    RETRY_EXCLUDED_S, not after the whole queue wait (the orchestrator makes no new instance for a load the
    old one has room for)."""
    from services.gateway.admission import RETRY_EXCLUDED_S

    table = FakeTable()
    table.instances = [Route("w1", "only", 0, capacity=4, made=Outcome.PREWARM_HIT)]

    async def scaler(req):  # the orchestrator: the existing instance has room
        return ScaleReply(ok=True, outcome=Outcome.WARM, worker_id="w1", instance_id="only")

    adm = Admission(table, scaler, AdmissionCore(8), wait_s=60.0)
    started = asyncio.get_running_loop().time()
    route, _, waited = await asyncio.wait_for(adm.admit("m", exclude={"only"}), 10)
    assert route.instance_id == "only"
    assert RETRY_EXCLUDED_S <= asyncio.get_running_loop().time() - started < RETRY_EXCLUDED_S + 2.0
    table.instances.append(Route("w2", "other", 0, capacity=4, made=Outcome.PREWARM_HIT))
    route, _, _ = await asyncio.wait_for(adm.admit("m", exclude={"only"}), 10)
    assert route.instance_id == "other", "another instance is preferred at once"
