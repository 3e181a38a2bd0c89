"""KvMirror on a fake bucket: a snapshot's timestamps are the server's clock, not the reader's, and a failing
on_change does not end expiry."""

import asyncio
import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from shared.watch import KvMirror, snapshot_seen_at
from shared.messages import WorkerState
from shared.subjects import WORKERS_BUCKET
from tests.helpers import eventually


def state(wid: str) -> WorkerState:
    return WorkerState(worker_id=wid, node="n", device="cpu:0", engine="sim", memory_budget_bytes=1)


class Watcher:
    """Yields ``entries``, then the end-of-snapshot marker, then nothing (a quiet live watch)."""

    def __init__(self, entries):
        self._it = iter([*entries, None])

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._it)
        except StopIteration:
            await asyncio.Event().wait()

    async def stop(self):
        pass


def bucket(*entries, server_now_s: float | None = None):
    """A workers bucket; ``server_now_s``: the server tells its time in stream info (nats-server 2.10+)."""
    async def watchall():
        return Watcher(entries)

    async def request(subject, payload, timeout):
        assert subject == f"$JS.API.STREAM.INFO.KV_{WORKERS_BUCKET.name}"
        ts = datetime.fromtimestamp(server_now_s, timezone.utc).isoformat()
        return SimpleNamespace(data=json.dumps({"ts": ts}).encode())

    js = None if server_now_s is None else SimpleNamespace(_prefix="$JS.API", _nc=SimpleNamespace(request=request, stats={"reconnects": 0}, is_connected=True))
    return SimpleNamespace(_name=WORKERS_BUCKET.name, _stream=f"KV_{WORKERS_BUCKET.name}", _js=js, watchall=watchall)


def entry(key: str, server_time_s: float, revision: int = 1):
    return SimpleNamespace(key=key, value=state(key).encode(), operation=None, revision=revision,
                           created=datetime.fromtimestamp(server_time_s, timezone.utc))


def test_snapshot_ages_are_taken_on_the_servers_clock_and_moved_to_the_readers():
    assert snapshot_seen_at({"new": 1000.0, "old": 990.0, "none": None}, now=5000.0) == {
        "new": 5000.0, "old": 4990.0, "none": 5000.0}
    assert snapshot_seen_at({"new": 1000.0, "old": 990.0}, now=5000.0, server_now=1004.0) == {
        "new": 4996.0, "old": 4986.0}  # the server's now, where it tells it
    assert snapshot_seen_at({}, now=1.0) == {}


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0])  # the server's clock an hour behind, or ahead
@pytest.mark.parametrize("tells_time", [True, False])
async def test_a_snapshot_from_a_server_with_a_skewed_clock_keeps_live_workers_live(skew_s, tells_time):
    now = 10_000.0
    server_now = now + skew_s
    kv = bucket(entry("fresh", server_now - 0.5), entry("stale", server_now - 60.0),
                server_now_s=server_now if tells_time else None)
    mirror = KvMirror(kv, WorkerState, clock=lambda: now, expire_after_s=0).start()
    try:
        await asyncio.wait_for(mirror.ready.wait(), 5)
        # ages on the server's clock: from its now where it tells it, else from the newest entry
        assert mirror.seen_at == ({"fresh": now - 0.5, "stale": now - 60.0} if tells_time
                                  else {"fresh": now, "stale": now - 59.5})
    finally:
        await mirror.stop()


async def test_expiry_survives_an_on_change_that_raises():
    now = [100.0]
    calls = []

    def on_change():
        calls.append(now[0])
        if len(calls) == 2:  # the first expiry's
            raise RuntimeError("boom")

    mirror = KvMirror(bucket(entry("a", 100.0), entry("b", 100.0)), WorkerState, on_change=on_change,
                      clock=lambda: now[0], expire_after_s=0.2).start()
    try:
        await asyncio.wait_for(mirror.ready.wait(), 5)
        assert len(calls) == 1  # the snapshot
        now[0] = 101.0
        await eventually(lambda: len(calls) == 2)  # both expired at once; on_change raised
        mirror.items["c"], mirror.seen_at["c"] = state("c"), 101.0  # a later entry, silent from now on
        now[0] = 102.0
        await eventually(lambda: len(calls) == 3 and set(mirror.items) == set())  # expiry still runs
    finally:
        await mirror.stop()
