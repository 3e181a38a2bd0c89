"""Routing, placement, reconcile and forecast policies on hand-built snapshots."""

import pytest

from shared.messages import CommandKind, CopyState, ModelCopy, ModelSpec, ModelStatus, PlannedCopy, WorkerState
from shared.policy.cluster import ClusterView, live_workers
from shared.policy.reconcile import Action, reconcile
from shared.policy.routing import Route, active_routes, pick_route

GB = 1024**3


def worker(wid, *copies, budget=10 * GB, kv=0, hb=100.0):
    return WorkerState(worker_id=wid, node="n", device="cpu:0", engine="sim", memory_budget_bytes=budget,
                       kv_bytes=kv, heartbeat_at_s=hb,
                       copies=[ModelCopy(model=m, state=s, weight_bytes=GB, instance_id=f"{wid}-{m}" if s is CopyState.ACTIVE else None,
                                         in_flight=f) for m, s, f in copies])


def spec(slug, size=GB, tp=1, status=ModelStatus.ACTIVE):
    return ModelSpec(slug=slug, path=f"/m/{slug}", parameter_bytes=size, tensor_parallel_size=tp, status=status)


# ---------------------------------------------------------------- cluster


def test_live_workers_drops_silent_ones():
    ws = [worker("b", hb=99.0), worker("a", hb=100.0), worker("c", hb=80.0)]
    assert [w.worker_id for w in live_workers(ws, now_s=101.0, timeout_s=5.0)] == ["a", "b"]


def test_live_workers_do_not_count_silence_the_reader_could_not_see():
    # the reader was blind 90..98 (a NATS restart): b's 10 s of silence hold only 2 s it could have heard
    ws = [worker("a", hb=100.0), worker("b", hb=90.0), worker("c", hb=80.0)]
    blind = [(90.0, 98.0)]
    assert [w.worker_id for w in live_workers(ws, now_s=100.0, timeout_s=5.0, blind=blind)] == ["a", "b"]
    # time before the worker's last heartbeat is no excuse, and silence after the outage counts again
    assert [w.worker_id for w in live_workers(ws, now_s=104.0, timeout_s=5.0, blind=blind)] == ["a"]
    # an outage still under way (ending now) freezes a worker's silence where it stood
    assert [w.worker_id for w in live_workers(ws, now_s=200.0, timeout_s=5.0, blind=[(100.0, 200.0)])] == ["a"]
    assert live_workers(ws, now_s=200.0, timeout_s=5.0) == []


# ---------------------------------------------------------------- routing


def test_route_picks_least_loaded_below_capacity():
    ws = [worker("w1", ("m", CopyState.ACTIVE, 5)), worker("w2", ("m", CopyState.ACTIVE, 2)),
          worker("w3", ("m", CopyState.PREWARMED, 0))]
    routes = active_routes("m", ws)
    assert {r.worker_id for r in routes} == {"w1", "w2"}
    assert pick_route(routes).worker_id == "w2"
    assert pick_route(routes, pending={"w2-m": 4}).worker_id == "w1"


def test_route_none_when_all_full_or_none_active():
    assert pick_route([Route("w1", "i1", 32, capacity=32)]) is None
    assert pick_route([]) is None
    assert pick_route([Route("w2", "i2", 1), Route("w1", "i1", 1)]).worker_id == "w1"  # ties: lowest id
    # each instance is judged by its own worker's capacity
    small, big = Route("w1", "i1", 4, capacity=4), Route("w2", "i2", 10, capacity=64)
    assert pick_route([small, big]) == big


# placement: tests/unit/test_prewarm_placement.py and test_placement_service.py


# ---------------------------------------------------------------- reconcile


def test_reconcile_prewarms_then_activates_then_evicts():
    plan = [PlannedCopy(model="a", worker_id="w1")]
    assert reconcile(plan, ClusterView.from_workers([worker("w1")]), min_active=1) == [Action(CommandKind.PREWARM, "w1", "a")]
    assert reconcile(plan, ClusterView.from_workers([worker("w1", ("a", CopyState.PREWARMED, 0))]), min_active=1) == [
        Action(CommandKind.ACTIVATE, "w1", "a")]
    assert reconcile(plan, ClusterView.from_workers([worker("w1", ("a", CopyState.ACTIVE, 0))]), min_active=1) == []
    stale = [worker("w1", ("a", CopyState.ACTIVE, 0), ("old", CopyState.PREWARMED, 0))]
    assert reconcile(plan, ClusterView.from_workers(stale), min_active=1) == [Action(CommandKind.EVICT, "w1", "old")]


def test_reconcile_one_instance_per_worker_and_respects_busy():
    plan = [PlannedCopy(model="a", worker_id="w1"), PlannedCopy(model="b", worker_id="w1")]
    ws = [worker("w1", ("a", CopyState.PREWARMED, 0), ("b", CopyState.PREWARMED, 0))]
    actions = reconcile(plan, ClusterView.from_workers(ws), min_active=1)
    assert [a.kind for a in actions] == [CommandKind.ACTIVATE]
    assert reconcile(plan, ClusterView.from_workers(ws), min_active=1, busy={("w1", "a")}) == []
    assert reconcile(plan, ClusterView.from_workers(ws), min_active=0) == []


def test_reconcile_ignores_plan_entries_for_unknown_workers():
    assert reconcile([PlannedCopy(model="a", worker_id="gone")], ClusterView.from_workers([worker("w1")]), min_active=1) == []


# ---------------------------------------------------------------- forecast


# forecasting has its own module: tests/unit/test_forecast.py


# ---------------------------------------------------------------- KV reservation

from shared.policy.kv import free_blocks_target, kv_bytes_to_keep, reclaimable_bytes  # noqa: E402


def test_kv_reservation_follows_load():
    assert free_blocks_target(1000, in_flight=8, batch_capacity=32) == 250
    assert free_blocks_target(1000, in_flight=0, batch_capacity=32) == 32  # room for one more request
    assert free_blocks_target(1000, in_flight=64, batch_capacity=32) == 1000
    assert free_blocks_target(0, 5, 32) == 0
    assert kv_bytes_to_keep(used_blocks=10, target_free_blocks=20, block_bytes=100, max_bytes=10_000) == 3000
    assert kv_bytes_to_keep(used_blocks=10, target_free_blocks=500, block_bytes=100, max_bytes=10_000) == 10_000
    assert reclaimable_bytes(10_000, used_blocks=10, target_free_blocks=20, block_bytes=100) == 7000
    assert reclaimable_bytes(1000, used_blocks=10, target_free_blocks=20, block_bytes=100) == 0


# ---------------------------------------------------------------- scale-up placement

from shared.messages import Outcome  # noqa: E402
from shared.policy.scaleup import choose_group  # noqa: E402


def choose_worker(spec, workers, busy=()):
    """The chooser on one-device workers, as the orchestrator calls it."""
    return choose_group(ClusterView.from_workers(workers), spec.slug, spec.tensor_parallel_size, spec.parameter_bytes,
                        busy=busy)


def test_scale_up_prefers_prewarm_hits_then_loading_then_cold():
    m = spec("m")
    hit = worker("w2", ("m", CopyState.PREWARMED, 0))
    busy_hit = worker("w1", ("m", CopyState.PREWARMED, 0), ("x", CopyState.ACTIVE, 3))
    loading = worker("w3", ("m", CopyState.LOADING, 0))
    empty = worker("w4")
    crowded = worker("w5", ("y", CopyState.PREWARMED, 0), ("z", CopyState.PREWARMED, 0))
    assert choose_worker(m, [busy_hit, hit, loading, empty]) == choose_worker(m, [hit])
    assert choose_worker(m, [hit, empty]).outcome is Outcome.PREWARM_HIT
    assert choose_worker(m, [busy_hit, loading, empty]).worker_id == "w3"
    cold = choose_worker(m, [busy_hit, crowded, empty])
    assert cold.worker_id == "w4" and cold.outcome is Outcome.COLD  # fewest prewarmed copies destroyed
    assert choose_worker(m, [hit, empty], busy={"w2"}).worker_id == "w4"


def test_scale_up_counts_evictable_copies_as_room_and_gives_up_when_nothing_fits():
    m = spec("m", size=5 * GB)
    full = worker("w1", ("y", CopyState.PREWARMED, 0), budget=6 * GB)  # 5 GB free + 1 GB evictable
    assert choose_worker(m, [full]).worker_id == "w1"
    tiny = worker("w2", budget=2 * GB)
    assert choose_worker(m, [tiny]) is None
    assert choose_worker(m, [worker("w3", ("x", CopyState.ACTIVE, 0))]) is None  # one instance per worker


# ---------------------------------------------------------------- rate limit

from shared.policy.ratelimit import TokenBucket  # noqa: E402


def test_token_bucket_allows_bursts_then_the_rate():
    b = TokenBucket(rate=2.0, burst=3.0)
    assert [b.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(10.0)
    assert wait == pytest.approx(0.5)
    assert b.take(10.5) == 0.0  # one token came back
    assert b.take(10.5) > 0
    assert TokenBucket(rate=0.0, burst=1.0).take(0) == 0.0


def test_scale_up_needs_room_for_the_kv_cache_too():
    m = spec("m", size=4 * GB)
    w = worker("w1", budget=5 * GB).model_copy(update={"kv_cache_bytes": 2 * GB})
    assert choose_worker(m, [w]) is None  # weights fit, weights + KV do not
    assert choose_worker(m, [w.model_copy(update={"kv_cache_bytes": 0})]).worker_id == "w1"


def test_live_workers_count_silence_from_when_the_reader_saw_each_state_not_the_workers_clock():
    ws = [worker("behind", hb=40.0), worker("ahead", hb=160.0), worker("unseen", hb=100.0)]
    seen = {"behind": 99.0, "ahead": 90.0}  # the reader's receipt times
    assert [w.worker_id for w in live_workers(ws, now_s=100.0, timeout_s=5.0, seen_at=seen)] == ["behind"]
    assert live_workers(ws, now_s=100.0, timeout_s=5.0, seen_at=seen, blind=[(90.0, 100.0)])[0].worker_id == "ahead"


def test_a_kv_mirror_forgets_entries_silent_past_its_expiry_but_not_for_its_own_outages():
    from types import SimpleNamespace

    from shared.watch import KvMirror
    from shared.subjects import WORKERS_BUCKET

    now = [100.0]
    m = KvMirror(SimpleNamespace(_name=WORKERS_BUCKET.name), WorkerState, clock=lambda: now[0])
    assert m.expire_after_s == WORKERS_BUCKET.ttl_s  # the bucket's own TTL by default
    m.expire_after_s = 10.0
    m.ready.set()
    m.items = {"gone": worker("gone"), "here": worker("here")}
    m.seen_at = {"gone": 80.0, "here": 99.0}
    m._went_blind()  # the mirror loses its watch at 100 for 30 s: nobody's silence grows meanwhile
    now[0] = 130.0
    assert m.prune() == ["gone"] and set(m.items) == {"here"}  # 20 s silent before the outage
    m._resumed()
    now[0] = 139.0
    assert m.prune() == [] and set(m.items) == {"here"}  # 1 + 9 s seen silent
    now[0] = 141.0
    assert m.prune() == ["here"] and m.items == {} and m.seen_at == {}
