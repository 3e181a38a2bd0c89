"""Poison messages on the durable consumers (real NATS and Postgres): what can never be stored goes to the
dead-letter stream with its error and the consumer moves on; a Postgres outage is retried, never given up on."""

import asyncio
import contextlib
import time
import uuid

import pytest
from sqlalchemy import text

from services.placement.main import Placement
from services.prewarm_orchestrator.main import Orchestrator
from shared import bus
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import CopyState, DeadLetter, ModelSpec, PlacementPlan, WorkerEvent
from shared.metrics import REGISTRY
from shared.settings import OrchestratorSettings, PlacementSettings
from shared.subjects import DEAD_LETTER, PLACEMENT_PLAN, WORKER_EVENT
from tests.helpers import eventually
from tooling.cli import deadletters
from tooling.localcluster.processes import free_port

pytestmark = pytest.mark.integration

TOO_LONG = "x" * 40  # event and plan ids are String(32)


def dead_letters_counted(service: str, stream: str) -> float:
    return REGISTRY.get_sample_value("warmserve:dead_letters_total", {"service": service, "stream": stream}) or 0.0


async def dead_letters(js, service: str, since_s: float) -> list[DeadLetter]:
    """Dead letters of ``service`` stored since ``since_s`` (an ordered consumer reads them, leaving no state)."""
    out: list[DeadLetter] = []
    try:
        info = await js.stream_info("WARMSERVE_DEADLETTER")
    except Exception:
        return out
    if not info.state.messages:
        return out
    sub = await js.subscribe(DEAD_LETTER.format(service=service), ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                return out
            letter = DeadLetter.decode(msg.data)
            if letter.failed_at_s >= since_s:
                out.append(letter)
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def db(database_url):
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    async with sessions() as session:
        await repo.upsert_model(session, ModelSpec(slug="dl", path="/m", parameter_bytes=1))
        await session.commit()
    yield sessions
    await engine.dispose()


async def rows(sessions, sql: str) -> list:
    async with sessions() as session:
        return (await session.execute(text(sql))).all()


@contextlib.asynccontextmanager
async def running(consumer):
    """``consumer`` (a ``bus.consume`` loop) running for the block, cancelled after it."""
    task = asyncio.create_task(consumer)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def settled(js) -> bool:
    """The orchestrator's event consumer has nothing pending or waiting for an acknowledgement."""
    info = await js.consumer_info("WARMSERVE_EVENTS", "orchestrator-events")
    return info.num_ack_pending == 0 and info.num_pending == 0


def event(event_id: str) -> WorkerEvent:
    return WorkerEvent(event_id=event_id, worker_id="w-dl", model="dl", from_state=CopyState.LOADING,
                       to_state=CopyState.PREWARMED, at_s=time.time())


async def test_an_event_that_cannot_be_stored_is_dead_lettered_and_the_next_one_is_stored(nc, nats_url, database_url, db):
    js = nc.jetstream()
    await bus.ensure_all(js)
    orch = Orchestrator(OrchestratorSettings(nats_url=nats_url, database_url=database_url))
    orch.sessions = db
    before = dead_letters_counted("orchestrator", "WARMSERVE_EVENTS")
    started = time.time()
    async with running(bus.consume(js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                   orch.on_event, start_s=started - 0.5)):
        subject = WORKER_EVENT.format(worker="w-dl")
        await bus.js_publish(js, subject, event(TOO_LONG), msg_id=f"dl-bad-{started}")
        await js.publish(subject, b"{not json", headers={"Nats-Msg-Id": f"dl-malformed-{started}"})
        await bus.js_publish(js, subject, event("good-after-bad"), msg_id=f"dl-good-{started}")

        # the consumer moved on: the event after the poison one is stored
        await eventually(lambda: rows(db, "select event_id from model_events where event_id = 'good-after-bad'"),
                         timeout=20, what="the good event stored")
        letters = await eventually(lambda: _two(dead_letters(js, "orchestrator", started)), timeout=10,
                                   what="two dead letters")
        bad = next(d for d in letters if d.error.code == "unstorable")
        assert bad.consumer == "orchestrator-events" and bad.stream == "WARMSERVE_EVENTS" and bad.subject == subject
        assert bad.delivered == 1  # given up on at once: retrying a value too long cannot help
        assert "DataError" in bad.error.message and "too long" in bad.error.message
        assert WorkerEvent.decode(bad.payload).event_id == TOO_LONG  # the original, to fix and publish again
        malformed = next(d for d in letters if d.error.code == "malformed")
        assert malformed.payload == "{not json"
        assert dead_letters_counted("orchestrator", "WARMSERVE_EVENTS") == before + 2
        assert await rows(db, f"select event_id from model_events where event_id = '{TOO_LONG[:32]}'") == []
        listed = await deadletters.read(nats_url, "orchestrator", limit=1000)  # `warmserve deadletters`
        assert any(d["stream_seq"] == bad.stream_seq and d["error"]["code"] == "unstorable" for d in listed)
        # nothing waits for redelivery: both were terminated
        await eventually(lambda: settled(js), timeout=10, what="the consumer to have nothing pending")


async def _two(letters):
    got = await letters
    return got if len(got) >= 2 else None


async def test_a_plan_that_cannot_be_stored_is_dead_lettered(nc, nats_url, database_url, db):
    js = nc.jetstream()
    await bus.ensure_all(js)
    placement = Placement(PlacementSettings(nats_url=nats_url, database_url=database_url))
    placement.sessions = db
    before = dead_letters_counted("placement", "WARMSERVE_FORECAST")
    started = time.time()
    async with running(bus.consume(js, PLACEMENT_PLAN.pattern, "placement-history", PlacementPlan,
                                   placement.store_plan, start_s=started - 0.5)):
        await bus.js_publish(js, PLACEMENT_PLAN.pattern, PlacementPlan(plan_id=TOO_LONG, created_at_s=started),
                             msg_id=f"dl-plan-bad-{started}")
        good = PlacementPlan(created_at_s=started)
        await bus.js_publish(js, PLACEMENT_PLAN.pattern, good, msg_id=f"dl-plan-good-{started}")
        await eventually(lambda: rows(db, f"select plan_id from placement_decisions where plan_id = '{good.plan_id}'"),
                         timeout=20, what="the good plan stored")
        letters = await eventually(lambda: dead_letters(js, "placement", started), timeout=10, what="a dead letter")
        assert [PlacementPlan.decode(d.payload).plan_id for d in letters] == [TOO_LONG]
        assert letters[0].error.code == "unstorable" and letters[0].consumer == "placement-history"
        assert dead_letters_counted("placement", "WARMSERVE_FORECAST") == before + 1


async def test_postgres_away_is_retried_past_the_delivery_limit_and_lands_once_it_is_back(nc, nats_url, database_url, db):
    js = nc.jetstream()
    await bus.ensure_all(js)
    orch = Orchestrator(OrchestratorSettings(nats_url=nats_url, database_url=database_url))
    away = create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")  # nothing listens there
    orch.sessions = sessionmaker(away)
    deliveries: list[int] = []

    async def handle(ev, msg):
        deliveries.append(msg.metadata.num_delivered)
        await orch.on_event(ev, msg)

    started = time.time()
    try:
        async with running(bus.consume(js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                       handle, start_s=started - 0.5, max_deliver=2)):
            await bus.js_publish(js, WORKER_EVENT.format(worker="w-dl"), event("while-pg-away"), msg_id=f"dl-away-{started}")
            await eventually(lambda: _true(max(deliveries, default=0) > 2), timeout=30,
                             what="the event delivered more often than the limit")
            assert await dead_letters(js, "orchestrator", started) == []  # an outage is not a poison message
            orch.sessions = db  # Postgres is back
            await eventually(lambda: rows(db, "select event_id from model_events where event_id = 'while-pg-away'"),
                             timeout=20, what="the event stored once Postgres is back")
            assert await dead_letters(js, "orchestrator", started) == []
    finally:
        await away.dispose()


async def test_a_message_that_keeps_failing_is_given_up_on_after_the_limit(nc):
    js = nc.jetstream()
    await bus.ensure_all(js)
    deliveries: list[int] = []

    async def broken(ev, msg):
        deliveries.append(msg.metadata.num_delivered)
        raise RuntimeError("a bug")

    started = time.time()
    async with running(bus.consume(js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                   broken, start_s=started - 0.5, max_deliver=3)):
        await bus.js_publish(js, WORKER_EVENT.format(worker="w-dl"), event("always-fails"), msg_id=f"dl-bug-{started}")
        letters = await eventually(lambda: dead_letters(js, "orchestrator", started), timeout=30, what="a dead letter")
        assert [(d.error.code, d.delivered) for d in letters] == [("retries_exhausted", 3)]
        assert "RuntimeError: a bug" == letters[0].error.message
        assert [d for d in deliveries if d >= 1] == [1, 2, 3]  # with backoff in between, then never again


async def _true(value):
    return value


async def test_each_consuming_service_may_store_its_dead_letters_under_its_own_user(tmp_path):
    """On a nats-server with the generated users: placement, the orchestrator and the forecaster create the
    dead-letter stream at start and store dead letters in it; nobody else may publish there."""
    import subprocess

    from tooling.localcluster.infra import nats_server_binary
    from tooling.localcluster.nats_auth import PERMISSIONS, NatsUsers, server_config
    from tooling.localcluster.processes import wait_port
    from shared.subjects import subject_matches

    users = NatsUsers.load_or_create(tmp_path / "users.json")
    port = free_port()
    (tmp_path / "nats.conf").write_text(server_config(port, tmp_path / "js", users))
    proc = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_port(port, 10.0, proc=proc)
        for service in ("orchestrator", "placement", "forecaster"):
            nc = await bus.connect(users.url(f"nats://127.0.0.1:{port}", service), f"dl-{service}", deadline_s=5)
            try:
                js = nc.jetstream()
                await bus.ensure_all(js)
                letter = DeadLetter(service=service, consumer="c", stream="S", subject="s", stream_seq=1, delivered=1,
                                    error={"code": "unstorable", "message": "m"}, failed_at_s=time.time(), payload="{}")
                ack = await js.publish(DEAD_LETTER.format(service=service), letter.encode(), timeout=5)
                assert ack.stream == "WARMSERVE_DEADLETTER"
            finally:
                await nc.close()
        for user, perms in PERMISSIONS.items():
            allowed = any(subject_matches(p, "warmserve.deadletter.placement") for p in perms["publish"]["allow"])
            assert allowed == (user in ("orchestrator", "placement", "forecaster", "operator")), user
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_message_too_large_to_wrap_is_dead_lettered_cut_to_fit_not_retried_forever(nc, nats_url, database_url,
                                                                                         db):
    """A malformed event as large as NATS allows (quotes, which JSON doubles): its dead letter would be over
    max_payload, so its payload is cut to fit and flagged, and the consumer moves on."""
    js = nc.jetstream()
    await bus.ensure_all(js)
    orch = Orchestrator(OrchestratorSettings(nats_url=nats_url, database_url=database_url))
    orch.sessions = db
    started = time.time()
    async with running(bus.consume(js, WORKER_EVENT.wildcard, "orchestrator-events", WorkerEvent,
                                   orch.on_event, start_s=started - 0.5)):
        subject = WORKER_EVENT.format(worker="w-dl")
        huge = b"{" + b'"' * (nc.max_payload - 1024)
        await js.publish(subject, huge, headers={"Nats-Msg-Id": f"dl-huge-{started}"})
        await bus.js_publish(js, subject, event("good-after-huge"), msg_id=f"dl-good-huge-{started}")
        await eventually(lambda: rows(db, "select event_id from model_events where event_id = 'good-after-huge'"),
                         timeout=20, what="the event after the huge one stored")
        [cut] = await eventually(lambda: dead_letters(js, "orchestrator", started), timeout=10, what="its dead letter")
        assert cut.error.code == "malformed" and cut.payload_truncated and cut.payload_bytes == len(huge)
        assert huge.decode().startswith(cut.payload) and len(cut.payload) > nc.max_payload // 4
        assert len(cut.encode()) <= nc.max_payload - 16 * 1024
        # terminated, not waiting for another delivery
        await eventually(lambda: settled(js), timeout=10, what="the consumer to have nothing pending")


async def test_listing_one_services_dead_letters_reads_only_the_newest(nc, nats_url):
    """`warmserve deadletters --service X --limit N` reads about N letters, not the stream's history, and
    stops at X's last letter even when the stream's last message is another service's."""
    js = nc.jetstream()
    await bus.ensure_all(js)
    tag = uuid.uuid4().hex[:8]
    seqs = [(await js.publish(DEAD_LETTER.format(service="orchestrator"), f"o-{tag}-{i}".encode())).seq
            for i in range(12)]
    await js.publish(DEAD_LETTER.format(service="forecaster"), f"f-{tag}".encode())  # the stream's last
    counts: dict = {}
    listed = await deadletters.read(nats_url, "orchestrator", limit=2, counts=counts)
    assert [d["seq"] for d in listed] == seqs[-2:]
    assert counts["read"] <= 4, counts  # from about the 2nd newest, not from the first of 12 and more
    everything: dict = {}
    assert [d["seq"] for d in await deadletters.read(nats_url, "orchestrator", limit=1000, counts=everything)
            ][-12:] == seqs
    assert everything["read"] >= 12
