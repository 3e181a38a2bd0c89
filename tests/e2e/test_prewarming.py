"""Forecast-driven prewarming end to end on a local cluster of sim workers: a forecast rise prewarms
copies before the load arrives, the load is served by prewarm hits (never cold), the autoscaler drains
and stops the instances when it ends, and Postgres history tells the same story."""

import asyncio
import concurrent.futures
import json

import pytest
from openai import OpenAI
from sqlalchemy import text

from shared.db.engine import create_engine, sessionmaker
from tests.e2e.conftest import cli, start_cluster, until

pytestmark = pytest.mark.e2e

B = 2  # requests per instance: a handful of streams needs both workers




def workers(env) -> dict[str, dict[str, str]]:
    out = cli(env, "workers", "--json")
    assert out.returncode == 0, out.stderr
    return {w["worker_id"]: {c["model"]: c["state"] for c in w["copies"]} for w in json.loads(out.stdout)}




def placement(env) -> dict:
    out = cli(env, "placement", "show", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("prewarm")
    up = start_cluster(state, "--engine", "sim", "--workers", "2", "--no-smoke", timeout_s=180, extra_env={
        "WARMSERVE_BATCH_CAPACITY": str(B), "WARMSERVE_WINDOW_S": "300", "WARMSERVE_HEARTBEAT_TIMEOUT_S": "3",
        "WARMSERVE_QUEUE_WAIT_S": "20",
        # the forecast imported below says burst is busy all day, so forecast-driven scale-down would rightly
        # keep its instances; this test follows the reactive drain when the load ends (the orchestrator core's
        # unit tests cover the keep)
        "WARMSERVE_FORECAST_SCALE_DOWN": "false"})
    info = json.loads((state / "cluster.json").read_text())
    yield {"proc": up.proc, "env": up.env, "state": state, "info": info}
    up.stop()


def test_forecast_rise_prewarms_then_prewarm_hits_then_scale_down(cluster, tmp_path):
    env, info = cluster["env"], cluster["info"]
    made = cli(env, "model", "make-tiny", "burst", "--size", "5m", "--seed", "3")
    assert made.returncode == 0, made.stderr
    # no forecast, no copy: once placement has planned with burst in its catalog (a positive marker, rather
    # than a fixed wait that a slow placement would pass too), it planned no copy of it and no worker holds one
    plan = until(lambda: (lambda p: p if "burst" in p.get("inputs", {}).get("demand", {}) else None)(placement(env)),
                 what="a plan that knows burst")
    assert not any(c["model"] == "burst" for c in plan["copies"])
    assert all("burst" not in copies for copies in workers(env).values())

    # the forecast rises: yesterday this model was busy all day (a ServeGen-format rate file)
    rates = tmp_path / "rates.csv"
    rates.write_text("model,t_start_s,rate_rps,cv\n" + "".join(f"burst,{t * 600},2.0,1.0\n" for t in range(144)))
    imported = cli(env, "forecast", "import", "--rates", str(rates))
    assert imported.returncode == 0 and "288 of 288 windows stored" in imported.stdout, imported.stderr + imported.stdout
    status = json.loads(cli(env, "forecast", "status", "--json").stdout)
    [fc] = [m for m in status["models"] if m["model"] == "burst"]
    assert fc["next"]["peak_upper"] > B and fc["history_windows"] == 288  # 144 ten-minute windows as 300 s

    # ... and before any request, placement has prewarmed it on both workers
    held = until(lambda: (lambda ws: ws if all(c.get("burst") == "prewarmed" for c in ws.values()) else None)(
        workers(env)), what="burst prewarmed on both workers")
    assert len(held) == 2
    show = cli(env, "placement", "show")
    assert show.returncode == 0 and "burst" in show.stdout

    # the load arrives: every request is served by a prewarm hit or a warm instance, none cold
    client = OpenAI(base_url=f"{info['gateway_url']}/v1", api_key=info["api_key"], max_retries=0, timeout=60)

    def one(i):
        with client.chat.completions.with_streaming_response.create(
                model="burst", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=200,
                stream=True) as r:
            for _ in r.iter_lines():
                pass
            return r.headers["x-warmserve-outcome"]

    with concurrent.futures.ThreadPoolExecutor(2 * B) as pool:
        outcomes = list(pool.map(one, range(4 * B)))
    assert "cold" not in outcomes and outcomes.count("prewarm_hit") >= 1, outcomes
    assert set(outcomes) <= {"prewarm_hit", "warm"}

    # the load ends: instances drain and stop, the copies stay prewarmed (the forecast still wants them)
    until(lambda: all(c.get("burst") == "prewarmed" for c in workers(env).values()), timeout=60,
          what="the autoscaler to stop every burst instance")

    # Postgres saw the same story: plans with burst on both workers; per worker, prewarmed before activated,
    # and the autoscaler's drain back to prewarmed
    async def history():
        engine = create_engine(cluster["info"]["database_url"])
        async with sessionmaker(engine)() as s:
            plans = (await s.execute(text("select prewarm_set from placement_decisions order by id"))).scalars().all()
            events = (await s.execute(text("select worker_id, from_state, to_state, reason from model_events "
                                           "where model = 'burst' order by at, id"))).all()
        await engine.dispose()
        return plans, events

    plans, events = until(lambda: (lambda h: h if any(e.reason.startswith("autoscaler") for e in h[1]) else None)(
        asyncio.run(history())), timeout=30, what="the autoscaler's deactivations in model_events")
    assert any({c["worker_id"] for c in p if c["model"] == "burst"} == set(held) for p in plans)
    for wid in held:
        mine = [(e.from_state, e.to_state) for e in events if e.worker_id == wid]
        assert mine.index(("loading", "prewarmed")) < mine.index(("prewarmed", "active"))
    assert any(e.from_state == "draining" and e.to_state == "prewarmed" for e in events)
    assert not any(e.from_state == "absent" and e.to_state == "loading" and "scale-up" in e.reason for e in events)



def test_drain_empties_a_worker_and_undrain_brings_it_back(cluster):
    env = cluster["env"]
    drained = cli(env, "worker", "drain", "worker-1", "--reason", "test", "--wait", "60")
    assert drained.returncode == 0 and "worker-1 is empty" in drained.stdout, drained.stdout + drained.stderr
    assert "drain    worker-1" in cli(env, "prewarm", "list").stdout
    # what worker-1 held that the plan still wants moved to worker-0 (the pinned demo model at least)
    assert until(lambda: workers(env)["worker-0"].get("tiny-llama") in ("prewarmed", "active"), what="the pin moved")
    assert cli(env, "worker", "undrain", "worker-1").returncode == 0
    until(lambda: workers(env)["worker-1"], timeout=60, what="copies placed on worker-1 again")
