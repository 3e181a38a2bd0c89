"""API-key sync fails closed: a key whose row can no longer be published leaves the gateways' bucket."""

import asyncio

import pytest
from sqlalchemy import text

from services.placement.main import Placement
from shared import bus
from shared.apikeys import hash_key
from shared.db import repo
from shared.db.engine import create_engine, sessionmaker
from shared.settings import PlacementSettings
from shared.subjects import APIKEYS_BUCKET
from tests.helpers import eventually

pytestmark = pytest.mark.integration


async def test_a_key_whose_row_went_bad_is_removed_from_the_bucket_not_left_enabled(nats_url, database_url, nc):
    """A key synced while valid, then disabled with its hash overwritten by a value that is no digest (a
    botched rotation): the row is skipped, and its last published record, which still says enabled, must go,
    or the old key would keep authenticating at every gateway."""
    engine = create_engine(database_url)
    sessions = sessionmaker(engine)
    async with sessions() as s:
        _, plain = await repo.create_key(s, "fc-rotated")
        _, other = await repo.create_key(s, "fc-other")
        await s.commit()
    keys = (await bus.ensure_all(nc.jetstream()))[APIKEYS_BUCKET.name]

    async def present(key_hash):
        try:
            return (await keys.get(key_hash)).value is not None
        except Exception:  # not there
            return False

    async def absent(key_hash):
        return not await present(key_hash)

    svc = Placement(PlacementSettings(nats_url=nats_url, database_url=database_url, replan_interval_s=0.2,
                                      catalog_sync_interval_s=0.3))
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        await eventually(lambda: present(hash_key(plain)), what="the key in the API keys bucket")
        async with sessions() as s:
            await s.execute(text("update api_keys set key_hash = 'rotated-by-hand', disabled = true "
                                 "where name = 'fc-rotated'"))
            await s.commit()
        await eventually(lambda: "fc-rotated" in svc.skipped.get("api_keys", {}), what="the bad row skipped")
        await eventually(lambda: absent(hash_key(plain)), what="the bad key's record gone from the bucket")
        assert await present(hash_key(other))  # the other keys stay
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        async with sessions() as s:
            await s.execute(text("delete from api_keys where name in ('fc-rotated', 'fc-other')"))
            await s.commit()
        await engine.dispose()
        for k in (plain, other):
            await keys.delete(hash_key(k))
