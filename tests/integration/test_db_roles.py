"""Each service's database role, on a real Postgres: it can do what its service does and nothing else
(a compromised forecaster cannot add an API key that placement would publish to every gateway)."""

import time

import psycopg
import pytest
from sqlalchemy import create_engine as sync_engine
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from shared.db import repo
from shared.db.engine import create_engine, sessionmaker, sqlalchemy_url
from shared.db.migrate import downgrade, upgrade
from shared.db.roles import SERVICES, ensure_login, group_role, login_role
from shared.messages import (
    CopyState, Forecast, ForecastPoint, ModelSpec, PlacementPlan, PlannedCopy, WorkerEvent, WorkerState,
)
from shared.policy.forecast import WindowObservation

pytestmark = pytest.mark.integration


async def run(url: str, work):
    """``work(session)`` in one committed transaction, connected with ``url``."""
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await engine.dispose()


async def refused(url: str, work) -> None:
    with pytest.raises(DBAPIError) as info:
        await run(url, work)
    assert isinstance(info.value.orig, psycopg.errors.InsufficientPrivilege), info.value


def roles(url: str) -> set[str]:
    engine = sync_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("select rolname from pg_roles")).scalars())
    finally:
        engine.dispose()


@pytest.fixture
def urls(database_url, tmp_path) -> dict[str, str]:
    """Each service's URL (its login user, made as `warmserve up` makes them), and the model every test
    uses, registered by the owner."""
    import asyncio

    from tooling.localcluster.db_users import service_urls

    asyncio.run(run(database_url, lambda s: repo.upsert_model(s, ModelSpec(slug="m", path="/m", parameter_bytes=1))))
    urls = service_urls(database_url, tmp_path / "db-users.json")
    assert urls == service_urls(database_url, tmp_path / "db-users.json")  # a restart: the same users
    return urls


def key_insert(session):
    return repo.create_key(session, "planted")


async def test_forecaster_cannot_add_api_keys_but_writes_its_history(urls):
    fc = urls["forecaster"]
    await refused(fc, key_insert)
    await refused(fc, repo.list_keys)
    await refused(fc, lambda s: repo.upsert_model(s, ModelSpec(slug="x", path="/x", parameter_bytes=1)))
    await refused(fc, lambda s: repo.record_plan(s, PlacementPlan(plan_id="p", created_at_s=0, copies=[])))

    t0 = (time.time() // 60) * 60
    rows = [WindowObservation(t0 + 60 * i, 1.0 + i, 2.0 + i, 3) for i in range(3)]

    async def forecaster_work(s):
        assert await repo.model_slugs(s) == ["m"]
        assert await repo.record_observations(s, "m", 60.0, rows) == 3
        assert await repo.record_observations(s, "m", 60.0, rows) == 3  # live rows replace
        assert await repo.record_observations(s, "m", 60.0, rows, source="import") == 0
        await repo.record_forecast(s, Forecast(model="m", window_start_s=t0, window_s=60.0, method="naive",
                                               predicted_avg=1, predicted_peak=2, predicted_peak_upper=3,
                                               made_at_s=t0,
                                               points=[ForecastPoint(window_start_s=t0, avg=1, avg_upper=1, peak=2, peak_upper=3)]))
        await repo.record_forecast(s, Forecast(model="m", window_start_s=t0, window_s=60.0, method="paper",
                                               predicted_avg=1, predicted_peak=2, predicted_peak_upper=3,
                                               made_at_s=t0))  # the same window again: an update
        await repo.record_observed(s, "m", t0, 1.0, 2.0)
        return await repo.observed_history(s, t0), await repo.first_observed(s, "m")

    history, first = await run(fc, forecaster_work)
    assert len(history["m"]) == 3 and first == t0
    await refused(urls["orchestrator"], key_insert)  # nor can the orchestrator


async def test_placement_role_does_what_placement_does(urls):
    pl = urls["placement"]
    spec = ModelSpec(slug="p1", path="/p1", parameter_bytes=10)

    async def admin_verbs(s):
        await repo.upsert_model(s, spec)
        await repo.upsert_model(s, spec.model_copy(update={"parameter_bytes": 20}))
        row, plaintext = await repo.create_key(s, "app", rate_limit_rps=5, max_concurrency=2)
        assert await repo.set_key_disabled(s, "app", True)
        await repo.record_plan(s, PlacementPlan(plan_id="plan1", created_at_s=100.0, inputs={"x": 1},
                                                copies=[PlannedCopy(model="p1", worker_id="w1")]))
        await repo.record_plan(s, PlacementPlan(plan_id="plan1", created_at_s=100.0, copies=[]))  # once
        return row

    await run(pl, admin_verbs)

    async def reads(s):
        return (await repo.list_models(s), [repo.key_record(k) for k in await repo.list_keys(s)],
                await repo.newest_plan_at(s), await repo.recent_plans(s))

    models, keys, newest, plans = await run(pl, reads)
    assert [m.parameter_bytes for m in models if m.slug == "p1"] == [20]
    assert [(k.name, k.disabled) for k in keys] == [("app", True)]
    assert newest == 100.0 and [p.plan_id for p in plans] == ["plan1"]

    # history of a model (written by the others) goes with it: ON DELETE CASCADE runs as the tables' owner
    await run(urls["orchestrator"], lambda s: repo.record_event(s, WorkerEvent(
        worker_id="w1", model="p1", from_state=CopyState.ABSENT, to_state=CopyState.LOADING, at_s=1.0)))
    assert await run(pl, lambda s: repo.remove_model(s, "p1"))
    await refused(pl, lambda s: s.execute(text("select count(*) from model_events")))  # not its table


async def test_orchestrator_role_records_events_and_workers(urls):
    orch = urls["orchestrator"]
    event = WorkerEvent(worker_id="w1", model="m", from_state=CopyState.ABSENT, to_state=CopyState.LOADING, at_s=1.0)
    state = WorkerState(worker_id="w1", node="n", device="cpu:0", engine="sim", memory_budget_bytes=1,
                        heartbeat_at_s=2.0)

    async def work(s):
        await repo.record_event(s, event)
        await repo.record_event(s, event)  # a replay is ignored
        await repo.touch_worker(s, state)
        await repo.touch_worker(s, state.model_copy(update={"heartbeat_at_s": 3.0}))

    await run(orch, work)
    await refused(orch, lambda s: repo.upsert_model(s, ModelSpec(slug="y", path="/y", parameter_bytes=1)))
    await refused(orch, repo.list_keys)


def test_roles_are_per_database_and_downgrade_drops_them(database_url, urls):
    from sqlalchemy.engine import make_url

    db = make_url(database_url).database
    ours = {group_role(db, s) for s in SERVICES} | {login_role(db, s) for s in SERVICES}
    assert ours <= roles(database_url)
    assert all(name.startswith(db[:20]) for name in ours)  # another database's roles are other roles
    downgrade(database_url, "0004")
    assert not ours & roles(database_url)
    upgrade(database_url)
    upgrade(database_url)  # at head: nothing to do
    assert {group_role(db, s) for s in SERVICES} <= roles(database_url)
    ensure_login(database_url, "placement", "new-pw")  # logins come back when asked for
    assert login_role(db, "placement") in roles(database_url)


def test_a_left_over_group_role_is_reused_and_a_login_role_of_that_name_is_refused(database_url):
    from sqlalchemy.engine import make_url

    db = make_url(database_url).database
    downgrade(database_url, "0004")
    engine = sync_engine(sqlalchemy_url(database_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'create role "{group_role(db, "placement")}" nologin')  # a dropped database's
            conn.exec_driver_sql(f'create role "{group_role(db, "forecaster")}" login')  # someone else's user
        with pytest.raises(RuntimeError, match="can log in"):
            upgrade(database_url)
        with engine.connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalar() == "0004"
            conn.exec_driver_sql(f'drop role "{group_role(db, "forecaster")}"')
        upgrade(database_url)
        ensure_login(database_url, "placement", "pw")
    finally:
        engine.dispose()


def test_migrate_command_creates_the_logins_whose_passwords_are_set(database_url, monkeypatch, capsys):
    from sqlalchemy.engine import make_url

    from tooling.cli.main import main as cli

    db = make_url(database_url).database
    downgrade(database_url, "0004")
    monkeypatch.setenv("WARMSERVE_DATABASE_URL", database_url)
    monkeypatch.setenv("WARMSERVE_DB_FORECASTER_PASSWORD", "fc-pw")
    with pytest.raises(SystemExit) as exit_:
        cli(["migrate"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "database user of forecaster ready" in out and "fc-pw" not in out
    have = roles(database_url)
    assert login_role(db, "forecaster") in have and login_role(db, "placement") not in have  # only those asked for
    monkeypatch.setenv("WARMSERVE_DB_PLACEMENT_PASSWORD", "")
    with pytest.raises(SystemExit) as exit_:
        cli(["migrate"])
    assert exit_.value.code == 2 and "WARMSERVE_DB_PLACEMENT_PASSWORD" in capsys.readouterr().err


def test_a_login_password_reaches_postgres_only_as_its_scram_verifier(database_url):
    """DDL lands in the server's log (log_statement=ddl): the statements ensure_login runs never hold the
    password, and what Postgres stores is the SCRAM-SHA-256 verifier of that password (checked here from
    RFC 5802's definitions, independently of the code that made it)."""
    import base64
    import hashlib
    import hmac

    from sqlalchemy import event
    from sqlalchemy.engine import Engine, make_url

    password = "s3cret-Pw-\u00e9"
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(f"{statement} {parameters!r}")

    event.listen(Engine, "before_cursor_execute", record)
    try:
        ensure_login(database_url, "placement", password)
        ensure_login(database_url, "placement", password)  # an existing login: alter role
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert sum("create role" in s for s in sent) == 1 and sum("alter role" in s for s in sent) == 1
    assert not [s for s in sent if password in s or "s3cret" in s]

    login = login_role(make_url(database_url).database, "placement")
    engine = sync_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("select rolpassword from pg_authid where rolname = :n"), {"n": login}).scalar_one()
    finally:
        engine.dispose()
    method, rest = stored.split("$", 1)
    params, keys = rest.split("$")
    iterations, salt = params.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    assert method == "SCRAM-SHA-256" and int(iterations) >= 4096
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    assert stored_key == hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    assert server_key == hmac.new(salted, b"Server Key", "sha256").digest()
