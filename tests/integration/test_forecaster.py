"""The forecaster as a real service on real NATS and Postgres: windows, restarts, history import."""

import asyncio
import json
import time

import pytest
from sqlalchemy import text

from services.forecaster.main import Forecaster
from shared import bus
from tooling.cli.main import main as cli
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import AdminReply, AdminRequest, DemandSample, Forecast, ModelSpec
from shared.settings import ForecasterSettings
from shared.subjects import CATALOG_BUCKET, DEMAND, FORECAST_ADMIN

from tests.helpers import eventually

pytestmark = pytest.mark.integration

W = 2.0  # seconds per window: rounds every 2 s keep the test short


async def register(nc, database_url, slug):
    spec = ModelSpec(slug=slug, path=f"/models/{slug}", parameter_bytes=1000)
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as s:
        await repo.upsert_model(s, spec)
        await s.commit()
    await engine.dispose()
    buckets = await bus.ensure_all(nc.jetstream())
    await buckets[CATALOG_BUCKET.name].put(slug, spec.encode())


def settings(nats_url, database_url, window_s=W, **kw):
    base = dict(close_grace_s=0.2, min_history_windows=3, startup_backtest_windows=2, retry_interval_s=0.3,
                forecast_methods="naive,autoets")
    return ForecasterSettings(nats_url=nats_url, database_url=database_url, window_s=window_s, **{**base, **kw})


async def start(s):
    svc, stop = Forecaster(s), asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    return svc, stop, task


async def demand(js, model, start_s, area, gw="gw-a"):
    """A sample whose time-weighted concurrency integrates to ``area`` (concurrency x seconds)."""
    sample = DemandSample(gateway_id=gw, model=model, start_s=start_s, interval_s=1.0, arrivals=1, completions=1,
                          concurrency_avg=area, concurrency_peak=int(area))
    await bus.js_publish(js, DEMAND.format(model=model), sample, msg_id=f"{gw}:{model}:{start_s:.3f}")


async def stored(database_url, model):
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as s:
        rows = (await s.execute(text("select extract(epoch from window_start), avg, arrivals from observed_load "
                                     "where model = :m order by window_start"), {"m": model})).all()
    await engine.dispose()
    return {round(float(t), 3): (avg, n) for t, avg, n in rows}


async def test_restart_loses_nothing_and_counts_nothing_twice(nats_urls, database_url, nc):
    js = nc.jetstream()
    await register(nc, database_url, "fc-restart")
    svc, stop, task = await start(settings(nats_urls["forecaster"], database_url))
    now = time.time()
    base = (now // W) * W - 6 * W
    for k in range(5):  # five past windows with concurrency k + 1
        await demand(js, "fc-restart", base + k * W + 0.5, area=(k + 1) * W)
    await eventually(lambda: _ready(svc, "fc-restart", 5), what="a forecast over the past windows")
    fc = svc.core.latest["fc-restart"]
    assert fc.history_windows >= 5 and fc.method in {"naive", "autoets"} and len(fc.points) == 3
    assert fc.predicted_peak_upper >= fc.predicted_peak >= 0

    future = (time.time() // W) * W + 4 * W
    await demand(js, "fc-restart", future + 0.1, area=3.0)  # seen by the first run, only in memory

    async def counted():
        return ("fc-restart", future) in svc.core.book.open

    await eventually(counted, timeout=10, every=0.05, what="the sample in the first run's open window")
    stop.set()
    await asyncio.wait_for(task, 20)
    await demand(js, "fc-restart", future + 0.7, area=5.0, gw="gw-b")  # arrives while the forecaster is down

    svc2, stop2, task2 = await start(settings(nats_urls["forecaster"], database_url))
    try:
        rows = await eventually(lambda: _has(database_url, "fc-restart", future), what="the future window to be stored")
        assert rows[round(future, 3)] == (pytest.approx((3.0 + 5.0) / W), 2)  # both samples, each once
        for k in range(5):  # the first run's windows were replayed from the stream but not counted again
            assert rows[round(base + k * W, 3)] == (pytest.approx(k + 1.0), 1)
        assert svc2.core.book.late >= 5
        engine = create_engine(database_url)
        async with sessionmaker(engine)() as s:
            filled = (await s.execute(text("select count(*) from forecasts where model = 'fc-restart' "
                                           "and observed_avg is not null"))).scalar()
        await engine.dispose()
        assert filled > 0  # forecasts get their observed values once their window ends
    finally:
        stop2.set()
        await asyncio.wait_for(task2, 20)


async def test_accuracy_command_reads_forecasts_against_what_happened(database_url, monkeypatch, capsys):
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as s:
        await repo.upsert_model(s, ModelSpec(slug="fc-acc", path="/m", parameter_bytes=1))
        for i, (pred, obs) in enumerate([(10.0, 10.0), (7.0, 10.0), (12.0, 10.0)]):
            t = time.time() - 3600 + i * 300
            await repo.record_forecast(s, Forecast(model="fc-acc", window_start_s=t, window_s=300, predicted_avg=pred,
                                                   predicted_peak=pred, predicted_peak_upper=pred + 5,
                                                   method="naive", made_at_s=t))
            await repo.record_observed(s, "fc-acc", t, obs, obs)
        await s.commit()
    await engine.dispose()
    monkeypatch.setenv("WARMSERVE_DATABASE_URL", database_url)
    with pytest.raises(SystemExit) as exit_:
        await asyncio.to_thread(cli, ["forecast", "accuracy", "--hours", "2"])
    assert exit_.value.code == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fc-acc")]
    # MAPE peak (0 + 30% + 20%) / 3; one window of three under-predicted by more than 20%; none with the upper
    assert line.split()[1:6] == ["3", "16.7%", "16.7%", "33.3%", "0.0%"]


async def _ready(svc, model, windows):
    fc = svc.core.latest.get(model)
    return fc is not None and fc.history_windows >= windows


async def _has(database_url, model, window_start):
    rows = await stored(database_url, model)
    return rows if round(window_start, 3) in rows else None


async def admin(nc, verb, args=None, raw=None):
    data = raw if raw is not None else AdminRequest(args=args or {}).encode()
    msg = await nc.request(FORECAST_ADMIN.format(verb=verb), data, timeout=60)
    return AdminReply.decode(msg.data)


async def test_history_import_warms_the_forecaster(nats_url, nats_urls, database_url, nc, monkeypatch, capsys):
    await register(nc, database_url, "fc-import")
    svc, stop, task = await start(settings(nats_urls["forecaster"], database_url, window_s=300.0,
                                           startup_backtest_windows=12))
    try:
        await eventually(lambda: _caught_up(svc), what="the forecaster to start")
        monkeypatch.setenv("WARMSERVE_NATS_URL", nats_url)
        with pytest.raises(SystemExit) as exit_:
            await asyncio.to_thread(cli, ["forecast", "import", "--trace", "servegen", "--map", "mm-image=fc-import"])
        assert exit_.value.code == 0
        assert "mm-image -> fc-import: 288 of 288 windows stored" in capsys.readouterr().out

        rows = await stored(database_url, "fc-import")
        starts = sorted(rows)
        assert len(starts) == 288 and starts[-1] + 300 == (time.time() // 300) * 300  # ends at the current window
        assert all(b - a == 300 for a, b in zip(starts, starts[1:]))
        fc = svc.core.latest["fc-import"]
        assert fc.history_windows == 288 and fc.method != "recent-level" and "rolling backtest" in fc.note

        status = await admin(nc, "status")
        [entry] = [m for m in status.result["models"] if m["model"] == "fc-import"]
        assert entry["history_windows"] == 288 and entry["next"]["peak_upper"] >= entry["next"]["peak"]

        again = await admin(nc, "import", {"model": "fc-import", "window_s": 300.0, "windows": [[1.0, 2.0, 3]]})
        assert again.ok and again.result["windows_written"] == 1  # goes before the oldest, overwrites nothing
        assert len(await stored(database_url, "fc-import")) == 289
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _caught_up(svc):
    return svc.caught_up.is_set() and svc.rounds["count"] > 0


async def test_bad_admin_messages_get_clear_errors_and_change_nothing(nats_urls, database_url, nc):
    await register(nc, database_url, "fc-bad")
    svc, stop, task = await start(settings(nats_urls["forecaster"], database_url, window_s=300.0))
    try:
        await eventually(lambda: _caught_up(svc), what="the forecaster to start")
        cases = [
            ("import", None, b"{not json", "bad_request"),
            ("import", {"model": "nope", "window_s": 300.0, "windows": [[1, 1, 1]]}, None, "bad_request"),
            ("import", {"model": "fc-bad", "window_s": 60.0, "windows": [[1, 1, 1]]}, None, "bad_request"),
            ("import", {"model": "fc-bad", "window_s": 300.0, "windows": [[-1, 1, 1]]}, None, "bad_request"),
            ("import", {"model": "fc-bad", "window_s": 300.0, "windows": []}, None, "bad_request"),
            ("explode", {}, None, "unknown_verb"),
        ]
        for verb, args, raw, code in cases:
            reply = await admin(nc, verb, args, raw)
            assert not reply.ok and reply.error.code == code, (verb, args, reply)
        assert await stored(database_url, "fc-bad") == {}
        assert (await admin(nc, "status")).ok  # still serving
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
