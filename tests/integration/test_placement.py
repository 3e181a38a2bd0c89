"""Placement as a real service on real NATS and Postgres: plans from forecasts, history written once
across restarts and replays, operator drains and pins, bad admin requests."""

import asyncio
import json
import re
import time

import pytest
from sqlalchemy import text

from services.placement.main import Placement
from shared import bus
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.messages import AdminReply, AdminRequest, Forecast, ModelSpec, PlacementPlan, WorkerState
from shared.settings import PlacementSettings
from shared.subjects import ADMIN, FORECAST, PLACEMENT_BUCKET, PLACEMENT_KEY, WORKERS_BUCKET

from tests.helpers import eventually

pytestmark = pytest.mark.integration

GB = 2**30


async def rows(database_url, sql):
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as s:
        out = (await s.execute(text(sql))).all()
    await engine.dispose()
    return out


@pytest.fixture
async def cluster(nats_url, database_url, nc):
    """Two models in the catalog and two live (fake) workers heartbeating into the workers bucket."""
    engine = create_engine(database_url)
    async with sessionmaker(engine)() as s:
        for slug in ("pl-hot", "pl-idle"):
            await repo.upsert_model(s, ModelSpec(slug=slug, path=f"/m/{slug}", parameter_bytes=GB))
        await s.commit()
    await engine.dispose()
    buckets = await bus.ensure_all(nc.jetstream())
    workers = buckets[WORKERS_BUCKET.name]

    async def beat():
        while True:
            for wid in ("pl-w0", "pl-w1"):
                await workers.put(wid, WorkerState(worker_id=wid, node="n0", device=f"cpu:{wid[-1]}", engine="sim",
                                                   memory_budget_bytes=4 * GB, heartbeat_at_s=time.time()).encode())
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(beat())
    yield buckets
    beating.cancel()
    for wid in ("pl-w0", "pl-w1"):
        await workers.delete(wid)


async def start(nats_url, database_url):
    svc, stop = Placement(PlacementSettings(nats_url=nats_url, database_url=database_url, replan_interval_s=0.2,
                                            catalog_sync_interval_s=0.5)), asyncio.Event()
    return svc, stop, asyncio.create_task(svc.run(stop))


async def admin(nc, verb, args=None, raw=None):
    msg = await nc.request(ADMIN.format(verb=verb), raw if raw is not None else AdminRequest(args=args or {}).encode(),
                           timeout=10)
    return AdminReply.decode(msg.data)


def planned(buckets):
    async def get():
        entry = await buckets[PLACEMENT_BUCKET.name].get(PLACEMENT_KEY)
        return sorted((c.model, c.worker_id) for c in PlacementPlan.decode(entry.value).copies)
    return get


async def test_plans_follow_forecasts_and_history_is_written_once(nats_urls, database_url, nc, cluster):
    js = nc.jetstream()
    fc = Forecast(model="pl-hot", window_start_s=0, window_s=300, predicted_avg=40.0, predicted_peak=60.0,
                  predicted_peak_upper=90.0, method="naive", made_at_s=time.time())
    await bus.js_publish(js, FORECAST.format(model="pl-hot"), fc, msg_id="pl-hot-1")
    svc, stop, task = await start(nats_urls["placement"], database_url)
    try:
        get = planned(cluster)
        # 40 / 32 -> 2 foundation replicas; one copy per worker at most; pl-idle has no forecast: no copy
        await eventually(lambda: _eq(get, [("pl-hot", "pl-w0"), ("pl-hot", "pl-w1")]), what="pl-hot on both workers")
        first = await rows(database_url, "select plan_id, prewarm_set from placement_decisions")
        assert len(first) == 1 and {c["model"] for c in first[0].prewarm_set} == {"pl-hot"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)

    svc, stop, task = await start(nats_urls["placement"], database_url)  # restarted: same plan, no new history
    try:
        replayed = fc.model_copy(update={"made_at_s": time.time()})
        await bus.js_publish(js, FORECAST.format(model="pl-hot"), replayed,
                             msg_id="pl-hot-2")  # a replayed forecast with the same numbers

        async def replanned():  # placement has the replayed forecast and has planned again since
            seen = svc.forecasts.get("pl-hot")
            return (seen is not None and seen.made_at_s == replayed.made_at_s and svc.latest is not None
                    and svc.latest.created_at_s > replayed.made_at_s)

        await eventually(replanned, timeout=10, every=0.05, what="a replan on the replayed forecast")
        assert svc.latest.same_copies(svc.current)  # same inputs, same copies: nothing to publish or store
        assert len(await rows(database_url, "select id from placement_decisions")) == 1

        # an operator drains a worker: its copy leaves the plan; undrain brings it back
        reply = await admin(nc, "worker-drain", {"worker_id": "pl-w1", "reason": "maintenance"})
        assert reply.ok and reply.result["target"] == "pl-w1"
        await eventually(lambda: _eq(planned(cluster), [("pl-hot", "pl-w0")]), what="the drained worker out of the plan")
        assert (await admin(nc, "worker-undrain", {"worker_id": "pl-w1"})).ok
        await eventually(lambda: _eq(planned(cluster), [("pl-hot", "pl-w0"), ("pl-hot", "pl-w1")]), what="undrained")

        # a pin keeps a model with no forecast prewarmed, and placement-show explains it
        assert (await admin(nc, "prewarm-pin", {"slug": "pl-idle"})).ok
        await eventually(lambda: _contains(planned(cluster), "pl-idle"), what="the pinned model in the plan")
        show = await admin(nc, "placement-show")
        assert "pinned" in show.result["inputs"]["scores"].values()
        assert [h["target"] for h in show.result["holds"]] == ["pl-idle"]
        assert (await admin(nc, "prewarm-unpin", {"slug": "pl-idle"})).ok

        history = await rows(database_url, "select prewarm_set from placement_decisions order by id")
        assert len(history) >= 4  # drained, undrained, pinned: each a plan of its own, none repeated
        assert len({str(sorted((c["model"], c["worker_id"]) for c in r.prewarm_set)) for r in history[:2]}) == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _eq(get, expected):
    try:
        return await get() == expected
    except Exception:
        return False


async def _contains(get, model):
    try:
        return any(m == model for m, _ in await get())
    except Exception:
        return False


async def test_bad_operator_requests_get_clear_errors_and_change_nothing(nats_urls, database_url, nc, cluster):
    svc, stop, task = await start(nats_urls["placement"], database_url)
    try:
        await eventually(lambda: _has_workers(svc), what="placement to see the workers")
        cases = [
            ("worker-drain", {"worker_id": "nobody"}, None, "not_found"),
            ("worker-drain", {"worker_id": "Bad.Id"}, None, "bad_request"),
            ("worker-drain", {"worker_id": "pl-w0", "extra": 1}, None, "bad_request"),
            ("prewarm-pin", {"slug": "pl-hot", "copies": 0}, None, "bad_request"),
            ("prewarm-pin", {"slug": "missing"}, None, "not_found"),
            ("prewarm-unpin", {"slug": "pl-hot"}, None, "not_found"),
            ("worker-undrain", {"worker_id": "pl-w0"}, None, "not_found"),
            ("prewarm-pin", None, b"{not json", "bad_request"),
        ]
        for verb, args, raw, code in cases:
            reply = await admin(nc, verb, args, raw)
            assert not reply.ok and reply.error.code == code, (verb, args, reply)
        assert (await admin(nc, "hold-list")).result == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _has_workers(svc):
    return hasattr(svc, "workers") and {"pl-w0", "pl-w1"} <= set(svc.workers.items)


async def test_a_tool_parser_reaches_the_catalog_bucket_changes_and_bad_names_change_nothing(nats_urls, database_url,
                                                                                              nc):
    """Operator -> Postgres -> catalog bucket: the ModelSpec a worker reads carries the model's tool parser."""
    from shared.subjects import CATALOG_BUCKET

    catalog = (await bus.ensure_all(nc.jetstream()))[CATALOG_BUCKET.name]

    async def published(expected):
        try:
            return ModelSpec.decode((await catalog.get("tp-m")).value).tool_parser == expected
        except Exception:  # not there (yet)
            return False

    async def stored():
        return (await rows(database_url, "select tool_parser from models where slug = 'tp-m'"))[0][0]

    register = {"slug": "tp-m", "path": "/m/tp", "parameter_bytes": GB, "max_context_tokens": 512}
    svc, stop, task = await start(nats_urls["placement"], database_url)
    try:
        await eventually(lambda: _answers(nc), what="placement to answer admin requests")
        made = await admin(nc, "model-register", register | {"tool_parser": "hermes"})
        assert made.ok and made.result["tool_parser"] == "hermes", made
        await eventually(lambda: published("hermes"), what="the tool parser in the catalog bucket")

        again = await admin(nc, "model-register", register | {"parameter_bytes": 2 * GB})  # none named: kept
        assert again.ok and again.result["tool_parser"] == "hermes", again
        assert (await admin(nc, "model-update", {"slug": "tp-m", "tool_parser": "llama3_json"})).ok
        await eventually(lambda: published("llama3_json"), what="the updated tool parser in the catalog bucket")
        assert [m["tool_parser"] for m in (await admin(nc, "model-list")).result if m["slug"] == "tp-m"] == \
            ["llama3_json"]

        for verb, args, code in [
            ("model-update", {"slug": "tp-m", "tool_parser": "Hermes"}, "bad_request"),
            ("model-update", {"slug": "tp-m", "tool_parser": "hermes\n"}, "bad_request"),
            ("model-update", {"slug": "tp-m", "tool_parser": "a" * 65}, "bad_request"),
            ("model-update", {"slug": "tp-m", "tool_parser": ""}, "bad_request"),
            ("model-update", {"slug": "tp-m"}, "bad_request"),  # nothing to change: say so
            ("model-update", {"slug": "nope", "tool_parser": "hermes"}, "not_found"),
            ("model-register", register | {"tool_parser": "my parser"}, "bad_request"),
        ]:
            reply = await admin(nc, verb, args)
            assert not reply.ok and reply.error.code == code, (verb, args, reply)
            if code == "bad_request" and "tool_parser" in args:
                assert "invalid tool parser" in reply.error.message, reply
        assert await stored() == "llama3_json"
        assert (await rows(database_url, "select parameter_bytes from models where slug = 'tp-m'"))[0][0] == 2 * GB
        assert await published("llama3_json")

        cleared = await admin(nc, "model-update", {"slug": "tp-m", "tool_parser": None})
        assert cleared.ok and cleared.result["tool_parser"] is None
        await eventually(lambda: published(None), what="the cleared tool parser in the catalog bucket")
        assert await stored() is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await catalog.delete("tp-m")


def test_key_create_cli_sends_the_limits(monkeypatch):
    from tooling.cli import main as cli

    sent = []

    async def fake_admin(verb, args):
        sent.append((verb, args))
        return {}

    monkeypatch.setattr(cli, "_admin", fake_admin)
    cli.cmd_key(cli.build_parser().parse_args(["key", "create", "team-a", "--rps", "5", "--max-concurrency", "3"]))
    cli.cmd_key(cli.build_parser().parse_args(["key", "create", "team-b"]))
    assert sent == [("key-create", {"name": "team-a", "rate_limit_rps": 5.0, "max_concurrency": 3}),
                    ("key-create", {"name": "team-b"})]


def test_model_cli_sends_the_tool_parser_and_refuses_a_bad_name_before_sending(monkeypatch, capsys, tmp_path):
    from tooling.cli import main as cli

    sent = []
    catalog = [{"slug": "m", "status": "active", "tensor_parallel_size": 1, "parameter_bytes": GB,
                "max_context_tokens": 512, "path": "/m", "tool_parser": "hermes"},
               {"slug": "n", "status": "active", "tensor_parallel_size": 1, "parameter_bytes": GB,
                "max_context_tokens": 512, "path": "/n", "tool_parser": None}]

    async def fake_admin(verb, args):
        sent.append((verb, args))
        return catalog if verb == "model-list" else {}

    def run(*argv):
        cli.cmd_model(cli.build_parser().parse_args(["model", *argv]))

    monkeypatch.setattr(cli, "_admin", fake_admin)
    path = str(tmp_path.resolve())
    run("register", "m", path, "--tool-parser", "hermes")
    run("register", "m", path)
    run("register", "m", path, "--no-tool-parser")
    run("update", "m", "--tool-parser", "granite-20b-fc")
    run("update", "m", "--no-tool-parser")
    assert sent == [("model-register", {"slug": "m", "path": path, "tensor_parallel_size": 1, "tool_parser": "hermes"}),
                    ("model-register", {"slug": "m", "path": path, "tensor_parallel_size": 1}),
                    ("model-register", {"slug": "m", "path": path, "tensor_parallel_size": 1, "tool_parser": None}),
                    ("model-update", {"slug": "m", "tool_parser": "granite-20b-fc"}),
                    ("model-update", {"slug": "m", "tool_parser": None})]
    sent.clear()
    capsys.readouterr()
    for argv in (["update", "m", "--tool-parser", "Hermes"], ["update", "m", "--tool-parser", "a.b"],
                 ["register", "m", path, "--tool-parser", "x y"], ["update", "m"],
                 ["update", "m", "--tool-parser", "hermes", "--no-tool-parser"]):
        with pytest.raises(SystemExit) as exc:
            run(*argv)
        assert exc.value.code == 2, argv
    assert sent == []
    assert capsys.readouterr().err.count("invalid tool parser") == 3

    run("list")
    listed = capsys.readouterr().out.splitlines()
    assert "tool parser" in listed[0]
    assert re.search(r"^m\s+active\s+1\s.*\shermes\s+/m$", listed[1]) and re.search(r"^n\s.*\s-\s+/n$", listed[2])
    run("show", "m")
    assert json.loads(capsys.readouterr().out)["tool_parser"] == "hermes"
    with pytest.raises(SystemExit, match="no model 'zz'"):
        run("show", "zz")


async def test_key_create_carries_its_limits_to_the_gateways_bucket(nats_urls, database_url, nc):
    from shared.apikeys import hash_key
    from shared.messages import ApiKeyRecord
    from shared.subjects import APIKEYS_BUCKET

    svc, stop, task = await start(nats_urls["placement"], database_url)
    try:
        await eventually(lambda: _answers(nc), what="placement to answer admin requests")
        made = await admin(nc, "key-create", {"name": "team-a", "rate_limit_rps": 5.0, "max_concurrency": 3})
        assert made.ok, made
        plain = made.result["key"]
        keys = (await bus.ensure_all(nc.jetstream()))[APIKEYS_BUCKET.name]
        record = ApiKeyRecord.decode((await keys.get(hash_key(plain))).value)
        assert record.max_concurrency == 3 and record.rate_limit_rps == 5.0 and record.name == "team-a"
        [listed] = [k for k in (await admin(nc, "key-list")).result if k["name"] == "team-a"]
        assert listed["max_concurrency"] == 3 and plain not in str(listed)
        plain_default = (await admin(nc, "key-create", {"name": "team-b"})).result["key"]
        assert ApiKeyRecord.decode((await keys.get(hash_key(plain_default))).value).max_concurrency is None
        for bad in (0, -1, "many"):
            reply = await admin(nc, "key-create", {"name": "team-c", "max_concurrency": bad})
            assert not reply.ok and reply.error.code == "bad_request", bad
        for k in (plain, plain_default):
            await keys.delete(hash_key(k))
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _answers(nc):
    try:
        return (await admin(nc, "key-list")).ok
    except Exception:
        return False


async def test_a_bad_catalog_row_holds_back_neither_the_other_models_nor_the_api_keys(nats_urls, database_url, nc,
                                                                                       caplog):
    """Rows written around the admin verbs (a slug with a trailing newline, which once passed validation, and
    a key whose hash is no digest) cannot be KV keys: each is skipped and logged once, every other model and
    key reaches the gateways' buckets, and the periodic sync goes on publishing rows added later."""
    from shared import metrics
    from shared.apikeys import hash_key
    from shared.db.models import ApiKey
    from shared.subjects import APIKEYS_BUCKET, CATALOG_BUCKET

    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    async with sessions() as s:
        await repo.upsert_model(s, ModelSpec(slug="tiny\n", path="/m/bad", parameter_bytes=GB))
        await repo.upsert_model(s, ModelSpec(slug="br-good", path="/m/good", parameter_bytes=GB))
        s.add(ApiKey(id="br-bad", name="br-bad", key_hash="not-a-digest", prefix="x", disabled=False))
        _, key_a = await repo.create_key(s, "br-a")
        await s.commit()
    buckets = await bus.ensure_all(nc.jetstream())
    catalog, keys = buckets[CATALOG_BUCKET.name], buckets[APIKEYS_BUCKET.name]

    async def present(bucket, key):
        try:
            return (await bucket.get(key)).value is not None
        except Exception:  # not there (yet)
            return False

    key_b = None
    svc, stop, task = await start(nats_urls["placement"], database_url)
    try:
        await eventually(lambda: present(catalog, "br-good"), what="the good model in the catalog bucket")
        await eventually(lambda: present(keys, hash_key(key_a)), what="the key in the API keys bucket")
        async with sessions() as s:  # written directly: only the periodic sync publishes these
            await repo.upsert_model(s, ModelSpec(slug="br-later", path="/m/later", parameter_bytes=GB))
            _, key_b = await repo.create_key(s, "br-b")
            await s.commit()
        await eventually(lambda: present(catalog, "br-later"), what="a model added later")
        await eventually(lambda: present(keys, hash_key(key_b)), what="a key added later")
        assert set(svc.catalog.items) >= {"br-good", "br-later"} and "tiny\n" not in svc.catalog.items
        assert svc.skipped == {"models": {"tiny\n": svc.skipped["models"]["tiny\n"]},
                               "api_keys": {"br-bad": "its key_hash is not a SHA-256 hex digest"}}
        for table in ("models", "api_keys"):
            assert metrics.REGISTRY.get_sample_value("warmserve:sync_skipped_rows", {"table": table}) == 1
        logged = [r.getMessage() for r in caplog.records if r.name == "warmserve.placement" and "skipped" in r.getMessage()]
        assert sum("'tiny\\n'" in m for m in logged) == 1 and sum("'br-bad'" in m for m in logged) == 1, logged
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await engine.dispose()
        for slug in ("br-good", "br-later"):
            await catalog.delete(slug)
        for k in filter(None, (key_a, key_b)):
            await keys.delete(hash_key(k))
