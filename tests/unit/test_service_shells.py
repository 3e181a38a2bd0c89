"""Service shells at the handler level, on the in-memory bus: the admin protocol end to end (client, subject,
dispatcher, error codes) and the orchestrator's scale-up path (request -> core -> worker command -> reply)."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.prewarm_orchestrator.main import Orchestrator
from shared import bus
from shared.admin import FORECASTER_VERBS, PLACEMENT_VERBS, AdminClient, AdminError, Dispatcher, PinArgs
from shared.messages import (
    AdminReply, AdminRequest, CommandKind, CommandResult, CopyState, Outcome, ScaleReply, ScaleRequest, WorkerCommand,
)
from shared.settings import OrchestratorSettings
from shared.subjects import ADMIN, FORECAST_ADMIN, SCALE, WORKER_CMD
from tests.factories import model, worker
from tests.inmemory_bus import InMemoryNats


async def serve_admin(nc, subject, verbs, **handlers):
    async def default(args):
        return {"args": args.model_dump(mode="json")}

    dispatcher = Dispatcher(verbs, {v: handlers.get(v.replace("-", "_"), default) for v in verbs})
    await nc.subscribe(subject.wildcard, queue="svc", cb=lambda msg: dispatcher.on_message(nc, msg))
    return dispatcher


async def test_admin_verbs_travel_typed_and_errors_come_back_with_their_code():
    nc = InMemoryNats()

    async def prewarm_pin(args: PinArgs):
        if args.slug == "gone":
            raise AdminError("not_found", "no model 'gone' in the catalog")
        return {"pinned": args.slug, "copies": args.copies}

    async def model_list(_):
        raise RuntimeError("Postgres is away\nwith details")

    await serve_admin(nc, ADMIN, PLACEMENT_VERBS, prewarm_pin=prewarm_pin, model_list=model_list)
    client = AdminClient(nc)
    assert await client.call("prewarm-pin", {"slug": "m", "copies": 2}) == {"pinned": "m", "copies": 2}
    with pytest.raises(AdminError) as e:
        await client.call("prewarm-pin", {"slug": "gone"})
    assert e.value.code == "not_found"
    with pytest.raises(AdminError) as e:
        await client.call("model-list")
    assert e.value.code == "internal" and str(e.value) == "model-list failed: Postgres is away"


async def test_the_client_refuses_bad_arguments_before_sending_and_the_dispatcher_again_on_receipt():
    nc = InMemoryNats()
    await serve_admin(nc, ADMIN, PLACEMENT_VERBS)
    client = AdminClient(nc)
    for verb, args in (("prewarm-pin", {"slug": "Bad.Slug"}), ("key-create", {"name": "x", "extra": 1}),
                       ("placement-history", {"limit": 0}), ("no-such-verb", {})):
        with pytest.raises(AdminError) as e:
            await client.call(verb, args)
        assert e.value.code in ("bad_request", "unknown_verb"), (verb, e.value)
    assert nc.published == []  # nothing went out
    # a client that is not ours sends whatever it likes: the service answers, with the same codes
    for subject, data, code in ((ADMIN.format(verb="prewarm-pin"), AdminRequest(args={"slug": "a.b"}).encode(),
                                 "bad_request"),
                                (ADMIN.format(verb="model-register"), b"{not json", "bad_request"),
                                (ADMIN.format(verb="explode"), b"", "unknown_verb")):
        reply = AdminReply.decode((await nc.request(subject, data)).data)
        assert not reply.ok and reply.error.code == code, (subject, reply)


async def test_forecaster_verbs_go_to_the_forecaster_subject():
    nc = InMemoryNats()
    await serve_admin(nc, FORECAST_ADMIN, FORECASTER_VERBS)
    assert await AdminClient(nc).call("status", forecaster=True) == {"args": {}}
    with pytest.raises(bus.BusError):  # placement's verbs are not answered there
        await AdminClient(nc).call("model-list")


def test_a_dispatcher_must_handle_exactly_its_verbs():
    with pytest.raises(ValueError, match="differ"):
        Dispatcher(FORECASTER_VERBS, {"status": None})


def orchestrator(nc, workers, catalog) -> Orchestrator:
    o = Orchestrator(OrchestratorSettings(heartbeat_timeout_s=1e9))
    o.nc = nc
    # a workers mirror that never lost its watch and has heard every worker since
    o.workers = SimpleNamespace(items={w.worker_id: w for w in workers}, blind=lambda now=None: [],
                                heard_since_resume=lambda key: True,
                                seen_at={w.worker_id: w.heartbeat_at_s for w in workers})  # as if seen then
    o.catalog = SimpleNamespace(items={m.slug: m for m in catalog})
    o.operator = SimpleNamespace(items={})
    o.plan = SimpleNamespace(items={})
    return o


async def test_a_scale_request_becomes_one_activate_command_and_one_reply_for_every_asker():
    nc = InMemoryNats()
    now = time.time()
    o = orchestrator(nc, [worker("w0", ("m", CopyState.PREWARMED), heartbeat_s=now), worker("w1", heartbeat_s=now)],
                     [model("m")])
    commands, release = [], asyncio.Event()

    async def fake_worker(msg):
        cmd = WorkerCommand.decode(msg.data)
        commands.append((msg.subject, cmd.kind, cmd.model))
        await release.wait()  # the activation takes a while: both asks arrive meanwhile
        await nc.publish(msg.reply, CommandResult(command_id=cmd.command_id, ok=True, instance_id="i-1").encode())

    await nc.subscribe(WORKER_CMD.wildcard, cb=fake_worker)
    await nc.subscribe(SCALE.wildcard, queue="orchestrator", cb=lambda msg: o.on_scale(msg))
    asks = [asyncio.ensure_future(bus.request(nc, SCALE.format(model="m"), ScaleRequest(model="m", reason="no_instance",
                                                                                         waiting=1), ScaleReply, 5))
            for _ in range(2)]
    while not commands:
        await asyncio.sleep(0.01)
    assert o.core.scaling == {"m"}  # the core holds the worker while the command is out
    release.set()
    replies = await asyncio.gather(*asks)
    assert commands == [(WORKER_CMD.format(worker="w0"), CommandKind.ACTIVATE, "m")]  # one command, a prewarm hit
    assert all(r.ok and r.outcome is Outcome.PREWARM_HIT and r.instance_id == "i-1" for r in replies)
    assert o.core.busy == {}


async def test_a_worker_that_does_not_answer_fails_the_ask_clearly_and_frees_the_worker():
    nc = InMemoryNats()
    now = time.time()
    o = orchestrator(nc, [worker("w0", heartbeat_s=now)], [model("m")])
    o.settings = o.settings.model_copy(update={"command_timeout_s": 0.05})
    await nc.subscribe(WORKER_CMD.wildcard, cb=lambda msg: asyncio.sleep(0))  # never replies
    reply = await o.scale_up(ScaleRequest(model="m", reason="no_instance", waiting=1))
    assert not reply.ok and reply.error.code == "timeout"
    # freed; the askers pace their retries (the gateway's back-off), the worker is not blocked here
    assert o.core.busy == {} and o.core.retry_at == {}


@pytest.mark.parametrize("fate", ["dies", "restarts"])
async def test_an_activation_whose_worker_dies_is_placed_on_another_worker_at_once(fate):
    """The orchestrator does not wait out the command timeout on a dead worker (nor make every later asker
    wait on that scale-up): it watches the worker while the answer is out and, once its heartbeat is stale
    or another process heartbeats under its id, activates the model elsewhere."""
    nc, now = InMemoryNats(), time.time()
    o = orchestrator(nc, [worker("w0", ("m", CopyState.PREWARMED), heartbeat_s=now, started_s=1.0),
                          worker("w1", heartbeat_s=now)], [model("m")])
    o.settings = OrchestratorSettings(heartbeat_timeout_s=3, command_timeout_s=120)
    sent = []

    async def fake_worker(msg):
        cmd = WorkerCommand.decode(msg.data)
        sent.append(msg.subject)
        if msg.subject == WORKER_CMD.format(worker="w0"):  # the activation starts, then its worker is gone
            if fate == "dies":
                o.workers.seen_at["w0"] = time.time() - 10  # silent ever since
            else:  # a supervisor restarted it: a new process, empty, heartbeating under the same id
                o.workers.items["w0"] = worker("w0", heartbeat_s=time.time(), started_s=2.0)
            return
        await nc.publish(msg.reply, CommandResult(command_id=cmd.command_id, ok=True, instance_id="i-1").encode())

    await nc.subscribe(WORKER_CMD.wildcard, cb=fake_worker)
    ask = ScaleRequest(model="m", reason="no_instance", waiting=2)
    first, later = o._start_scale_up(ask), o._start_scale_up(ask)  # a later ask waits on the same scale-up
    assert first is later
    reply = await asyncio.wait_for(first, 10)  # far below the 120 s command timeout
    assert reply.ok and (reply.worker_id, reply.outcome, reply.instance_id) == ("w1", Outcome.COLD, "i-1")
    assert sent == [WORKER_CMD.format(worker="w0"), WORKER_CMD.format(worker="w1")]
    assert o.core.busy == {} and o.core.lost_now(time.time()) == ["w0"]


async def test_after_a_nats_outage_the_orchestrator_commands_only_workers_heard_again():
    """Its own outage is no worker's silence (a plan is not moved off a worker because the orchestrator was
    away), but a command goes only to a worker heard since the watch resumed: before that, the worker's
    command subscription may not be back and the command would be lost."""
    nc, now = InMemoryNats(), time.time()
    o = orchestrator(nc, [worker("w0", heartbeat_s=now - 8), worker("w1", heartbeat_s=now - 8),
                          worker("w2", heartbeat_s=now - 8)], [model("m")])
    o.settings = OrchestratorSettings(heartbeat_timeout_s=5)
    o.workers.blind = lambda at=None: [(now - 7, now - 1)]  # blind for 6 of the 8 silent seconds
    o.workers.heard_since_resume = lambda key: key != "w1"
    assert [d.device_id for d in o.view().devices] == ["w0", "w2"]
    o.workers.blind = lambda at=None: []  # no outage: 8 s of silence is death
    assert not o.view().devices


def test_placement_forgets_the_forecasts_of_models_that_left_the_catalog():
    from services.placement.main import Placement
    from shared.settings import PlacementSettings
    from tests.factories import forecast

    p = Placement(PlacementSettings())
    p.catalog = SimpleNamespace(items={"kept": model("kept")})
    for slug in ("kept", "removed", "just-registered"):
        p.forecasts[slug] = forecast(slug, 1.0, 2.0).model_copy(update={"made_at_s": 1000.0, "window_s": 300.0})
    p.forecasts["just-registered"] = p.forecasts["just-registered"].model_copy(update={"made_at_s": 1290.0})
    p.prune_forecasts(now_s=1301.0)  # a window after the first two were made
    assert set(p.forecasts) == {"kept", "just-registered"}  # the last may be ahead of this catalog mirror
