"""Migrations and queries against a real Postgres."""

import time

import pytest
from sqlalchemy import inspect, text

from shared.db import repo
from shared.db.engine import create_engine, sessionmaker, sqlalchemy_url
from shared.db.migrate import downgrade, upgrade
from shared.policy.forecast import WindowObservation
from shared.messages import (
    CopyState, Forecast, ForecastPoint, ModelSpec, ModelStatus, PlacementPlan, PlannedCopy, WorkerEvent, WorkerState,
)

pytestmark = pytest.mark.integration


def test_url_mapping():
    assert sqlalchemy_url("postgres://u:p@h/db").startswith("postgresql+psycopg://u:p@h/db")
    from sqlalchemy.engine import make_url

    socket_url = make_url(sqlalchemy_url("postgresql://postgres:@/x?host=/tmp/s"))
    assert socket_url.drivername == "postgresql+psycopg" and socket_url.query["host"] == "/tmp/s"
    with pytest.raises(ValueError, match="PostgreSQL"):
        sqlalchemy_url("sqlite:///x.db")


def test_migrations_create_every_table_and_downgrade_cleanly(database_url):
    from sqlalchemy import create_engine as sync_engine

    engine = sync_engine(sqlalchemy_url(database_url))
    tables = set(inspect(engine).get_table_names())
    assert {"models", "workers", "placement_decisions", "model_events", "forecasts", "observed_load", "api_keys",
            "alembic_version"} <= tables
    downgrade(database_url, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(database_url, "0005")  # 0006 adds models.tool_parser, nullable: rows from before it have none
    assert "tool_parser" not in {c["name"] for c in inspect(engine).get_columns("models")}
    with engine.begin() as conn:
        conn.execute(text("insert into models (slug, path, parameter_bytes, tensor_parallel_size, "
                          "max_context_tokens, status) values ('old', '/m/old', 1, 1, 16, 'active')"))
    upgrade(database_url)
    [column] = [c for c in inspect(engine).get_columns("models") if c["name"] == "tool_parser"]
    assert column["nullable"]
    with engine.connect() as conn:
        assert conn.execute(text("select tool_parser from models where slug = 'old'")).one() == (None,)
    downgrade(database_url, "0005")
    assert "tool_parser" not in {c["name"] for c in inspect(engine).get_columns("models")}
    upgrade(database_url)
    upgrade(database_url)  # already at head: nothing to do
    with engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0006"
    engine.dispose()


async def test_catalog_history_and_forecasts(database_url):
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    spec = ModelSpec(slug="m1", path="/models/m1", parameter_bytes=123, max_context_tokens=512)
    async with sessions() as s:
        await repo.upsert_model(s, spec)
        await repo.upsert_model(s, spec.model_copy(update={"parameter_bytes": 456, "status": ModelStatus.DISABLED}))
        await s.commit()
    async with sessions() as s:
        [got] = await repo.list_models(s)
    assert got.parameter_bytes == 456 and got.status is ModelStatus.DISABLED and got.tool_parser is None

    now = time.time()
    event = WorkerEvent(worker_id="w0", model="m1", from_state=CopyState.LOADING, to_state=CopyState.PREWARMED,
                        bytes=456, seconds=0.5, reason="test", at_s=now)
    plan = PlacementPlan(created_at_s=now, copies=[PlannedCopy(model="m1", worker_id="w0")], inputs={"k": 1})
    fc = Forecast(model="m1", window_start_s=600.0, window_s=300.0, predicted_avg=1.0, predicted_peak=2.0,
                  predicted_peak_upper=3.0, method="naive", made_at_s=now, points=[
                      ForecastPoint(window_start_s=600.0, avg=1.0, avg_upper=1.5, peak=2.0, peak_upper=3.0),
                      ForecastPoint(window_start_s=900.0, avg=1.0, avg_upper=1.7, peak=2.0, peak_upper=3.4)])
    state = WorkerState(worker_id="w0", node="n", device="cpu:0", engine="sim", memory_budget_bytes=10,
                        heartbeat_at_s=now)
    async with sessions() as s:
        await repo.record_event(s, event)
        await repo.record_event(s, event)  # replayed delivery: stored once
        await repo.record_plan(s, plan)
        await repo.record_forecast(s, fc)
        fresh = fc.model_copy(update={"points": [fc.points[0].model_copy(update={"peak": 5.0}), fc.points[1]]})
        await repo.record_forecast(s, fresh)  # refresh: same windows and leads
        await repo.record_observed(s, "m1", 600.0, 0.8, 4.0)
        await repo.touch_worker(s, state)
        await repo.touch_worker(s, state)
        await s.commit()
    async with sessions() as s:
        counts = {t: (await s.execute(text(f"select count(*) from {t}"))).scalar()
                  for t in ("model_events", "placement_decisions", "forecasts", "workers")}
        row = (await s.execute(text("select predicted_peak, observed_avg, observed_peak from forecasts "
                                    "where lead = 1"))).one()
        [p] = await repo.recent_plans(s)
    assert counts == {"model_events": 1, "placement_decisions": 1, "forecasts": 2, "workers": 1}
    assert tuple(row) == (5.0, 0.8, 4.0)
    assert p.prewarm_set == [{"model": "m1", "worker_id": "w0"}]
    # observed history: live rows replace (a replayed window is the same window), imports never overwrite
    live = [WindowObservation(600.0, 1.0, 2.0, 10), WindowObservation(900.0, 2.0, 3.0, 20)]
    async with sessions() as s:
        assert await repo.record_observations(s, "m1", 300.0, live) == 2
        assert await repo.record_observations(s, "m1", 300.0, live) == 2  # upsert, not a second row
        imported = [WindowObservation(300.0, 9.0, 9.0, 9), WindowObservation(600.0, 9.0, 9.0, 9)]
        assert await repo.record_observations(s, "m1", 300.0, imported, source="import") == 1
        await s.commit()
    async with sessions() as s:
        history = await repo.observed_history(s, since_s=0.0)
        assert await repo.first_observed(s, "m1") == 300.0
        [acc] = await repo.forecast_accuracy(s, since_s=0.0)
    assert [(o.start_s, o.avg, o.arrivals) for o in history["m1"]] == [(300.0, 9.0, 9), (600.0, 1.0, 10), (900.0, 2.0, 20)]
    assert (acc["predicted_peak"], acc["observed_peak"]) == (5.0, 4.0)
    async with sessions() as s:
        assert await repo.remove_model(s, "m1")
        assert not await repo.remove_model(s, "m1")
        await s.commit()
        assert (await s.execute(text("select count(*) from model_events"))).scalar() == 0  # cascades
    await engine.dispose()


async def test_tool_parser_is_stored_kept_on_reregistration_changed_and_cleared(database_url):
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    spec = ModelSpec(slug="tp", path="/models/tp", parameter_bytes=1, tool_parser="hermes")
    try:
        async with sessions() as s:
            assert (await repo.upsert_model(s, spec)).tool_parser == "hermes"
            again = spec.model_copy(update={"tool_parser": None, "parameter_bytes": 2})
            stored = await repo.upsert_model(s, again, keep_tool_parser=True)  # as `warmserve up` registers
            assert (stored.parameter_bytes, stored.tool_parser) == (2, "hermes")
            await s.commit()
        async with sessions() as s:
            [got] = await repo.list_models(s)
            assert got.tool_parser == "hermes"
            assert (await repo.set_tool_parser(s, "tp", "llama3_json")).tool_parser == "llama3_json"
            assert await repo.set_tool_parser(s, "missing", "hermes") is None
            await s.commit()
        async with sessions() as s:
            entries, bad = await repo.catalog_entries(s)
            assert entries["tp"].tool_parser == "llama3_json" and bad == {}
            assert (await repo.upsert_model(s, spec.model_copy(update={"tool_parser": None}))).tool_parser is None
            await s.commit()
        async with sessions() as s:
            [got] = await repo.list_models(s)
            assert got.tool_parser is None
            # a row written around the admin verbs with a malformed parser is no catalog entry
            await s.execute(text("update models set tool_parser = 'Bad Name' where slug = 'tp'"))
            entries, bad = await repo.catalog_entries(s)
            assert entries == {} and "invalid tool parser 'Bad Name'" in bad["tp"]
    finally:
        await engine.dispose()
